"""`lathe train` with do_predict: generated replies scored against the references (sft),
predict loss and perplexity (pt), from a fresh run or from a trained adapter alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import lathe
from tests.conftest import IDENTITY, REPO, run_cli, write_yaml

N_ROWS = 12  # max_samples: the eval set holds the first 12 identity rows, in order
SCORES = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """On a shared, busy CPU two OpenMP threads spin-wait on each other: tiny-model
    generation then runs ~100x slower. One thread (in the CLI and in this process)
    keeps these runs a few seconds."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _predict_args(base_args: dict, out: Path) -> dict:
    return {**base_args, "eval_dataset": "identity", "max_samples": N_ROWS, "max_steps": 2,
            "do_predict": True, "predict_with_generate": True, "per_device_eval_batch_size": 8,
            "do_sample": False, "max_new_tokens": 12, "output_dir": str(out)}


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "generated_predictions.jsonl").read_text().splitlines()]


@pytest.fixture()
def trained(base_args, tmp_path) -> Path:
    args = _predict_args(base_args, tmp_path / "trained")
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(args["output_dir"])


def test_sft_predict_writes_replies_and_scores_then_an_adapter_alone_predicts_the_same(
        trained, base_args, tmp_path):
    rows = json.loads(IDENTITY.read_text(encoding="utf-8"))[:N_ROWS]
    lines = _lines(trained)
    assert len(lines) == N_ROWS
    for line, row in zip(lines, rows):
        assert set(line) == {"prompt", "predict", "label"}
        assert line["label"] == row["output"]  # the reference reply, stop token removed
        assert row["instruction"] in line["prompt"] and line["prompt"].endswith("assistant\n")
    results = json.loads((trained / "predict_results.json").read_text())
    assert all(isinstance(results[k], float) and 0.0 <= results[k] <= 100.0 for k in SCORES)
    assert results["predict_samples"] == N_ROWS and results["predict_samples_per_second"] > 0
    assert "predict_bleu-4" in json.loads((trained / "all_results.json").read_text())

    # No training (through the API, to spare a process start): base model + the trained
    # adapter gives the very same greedy replies.
    # No training data either: with do_train false the eval set is all a run needs.
    alone = {k: v for k, v in _predict_args(base_args, tmp_path / "from-adapter").items() if k != "dataset"}
    again = Path(lathe.train({**alone, "do_train": False, "adapter_name_or_path": str(trained)}).output_dir)
    assert _lines(again) == lines
    assert not (again / "adapter_model.safetensors").exists()  # nothing was trained or saved
    assert not (again / "train_results.json").exists()


def test_pt_predict_reports_loss_and_perplexity(tiny_model, tmp_path):
    args = {"stage": "pt", "model_name_or_path": str(tiny_model), "dataset": "lathe_corpus",
            "dataset_dir": str(REPO / "src" / "lathe" / "demo" / "data"), "max_samples": 40,
            "cutoff_len": 64, "val_size": 0.25, "do_train": False, "do_predict": True,
            "output_dir": str(tmp_path / "pt")}
    run = Path(lathe.train(args).output_dir)
    results = json.loads((run / "predict_results.json").read_text())
    assert results["predict_perplexity"] == pytest.approx(math.exp(results["predict_loss"]))
    # the same model on the same rows: predict loss is the eval loss
    assert results["predict_loss"] == pytest.approx(json.loads((run / "eval_results.json").read_text())["eval_loss"])
    assert not (run / "generated_predictions.jsonl").exists()


@pytest.mark.parametrize("extra, words", [
    ({}, ["predict_with_generate", "no eval set", "eval_dataset"]),  # the config check
    ({"stage": "pt", "val_size": 0.2}, ["predict_with_generate", "stage pt"]),  # no replies in pt
])
def test_predict_with_generate_mistakes_are_one_line(base_args, tmp_path, extra, words):
    args = {**base_args, "do_predict": True, "predict_with_generate": True, **extra}
    proc = run_cli("train", str(write_yaml(tmp_path / "bad.yaml", args)))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
