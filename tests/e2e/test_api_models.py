"""`lathe api` serves every kind of model Lathe produces, and answers exactly as `lathe chat`
does (the same engine, the same template): a LoRA run directory, a prefix-tuning run (its
virtual tokens cannot be left-padded, so it decodes one row at a time), a merged export, a
QLoRA run on a 4-bit base, and an int8 quantized model. Two requests at once give the same
answers as one at a time, except on int8_dynamic, whose activation scale is computed over the
whole batch (torch's dynamic quantization), so a row's rounding depends on its neighbours."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.e2e.test_api_server import start, stop

openai = pytest.importorskip("openai")
QUESTIONS = ["Who are you?", "What can you do?"]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_64) -> Path:
    """One of the kinds is a 4-bit base: the width-64 tiny model (see conftest.tiny_model_64)."""
    return tiny_model_64


@pytest.fixture(scope="module")
def base(tiny_model, data_dir) -> dict:
    return {"model_name_or_path": str(tiny_model), "dataset": "identity", "dataset_dir": str(data_dir),
            "template": "chatml", "cutoff_len": 64, "logging_steps": 100, "save_steps": 1000, "seed": 0,
            "report_to": "none", "max_samples": 8, "per_device_train_batch_size": 4, "max_steps": 3,
            "learning_rate": 5e-3}


def _train(base: dict, out, **keys) -> str:
    import lathe

    return lathe.train({**base, "output_dir": str(out), **keys}).output_dir


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> str:
    return _train(base, tmp_path_factory.mktemp("lora") / "run")


KINDS = {
    "lora": lambda base, lora, tmp: (lora, []),
    "prefix": lambda base, lora, tmp: (_train(base, tmp / "prefix", finetuning_type="prefix",
                                              num_virtual_tokens=4), []),
    "qlora": lambda base, lora, tmp: (_train(base, tmp / "qlora", quantization_bit=4), ["quantization_bit=4"]),
    "export": lambda base, lora, tmp: (_export(lora, tmp / "export"), []),
    "int8": lambda base, lora, tmp: (_quantize(lora, tmp / "int8"), []),
}


def _export(run: str, out) -> str:
    r = run_cli("export", run, f"export_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out)


def _quantize(run: str, out) -> str:
    r = run_cli("quantize", run, f"output_dir={out}", "quantization_scheme=int8_dynamic", "quantize_report=false")
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out)


@pytest.mark.parametrize("kind", list(KINDS))
def test_api_answers_as_chat_does(kind, base, lora_run, tmp_path):
    from lathe.chat import chat_once
    from lathe.config.load import load_config
    from lathe.runs import model_keys

    folder, keys = KINDS[kind](base, lora_run, tmp_path)
    proc, url = start(folder, tmp_path / "server.log", "max_new_tokens=12", *keys)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        served = [client.chat.completions.create(model="lathe", messages=[{"role": "user", "content": q}])
                  .choices[0].message.content for q in QUESTIONS]
        # two at once share a batch (or go one by one for prefix tuning): the same answers
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda q: client.chat.completions.create(
                model="lathe", messages=[{"role": "user", "content": q}]).choices[0].message.content, QUESTIONS))
    finally:
        stop(proc)
    overrides = dict(k.split("=", 1) for k in keys)
    cfg = load_config({**model_keys(folder), "max_new_tokens": 12, **overrides}, command="chat")
    assert served == [chat_once(cfg, q) for q in QUESTIONS]
    assert all(served) and all(together)
    if kind != "int8":  # int8_dynamic scales activations per call, over the whole batch: rows may differ
        assert together == served
    assert "Traceback" not in (tmp_path / "server.log").read_text()
