"""Offline, tiny, hermetic: every test builds its models locally and never downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="lathe-tests-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": os.path.join(_HOME, "hf"),
    "HF_DATASETS_CACHE": os.path.join(_HOME, "datasets"),
    "LATHE_HOME": os.path.join(_HOME, "lathe"),
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
})
if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker (make test runs one per core): torch's
    # threads of two workers on the same cores spin against each other, a 5x slowdown measured here
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IDENTITY = REPO / "src" / "lathe" / "demo" / "data" / "identity.json"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with a BPE tokenizer trained on the bundled text."""
    from lathe.demo.build import TinySpec, build_tiny_model

    spec = TinySpec(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", spec)


@pytest.fixture(scope="session")
def tiny_model_64(tmp_path_factory) -> Path:
    """The tiny Llama at width 64, for 4-bit (QLoRA) tests: on CPUs with AVX512-BF16,
    bitsandbytes packs 4-bit weights for inference in blocks of 64 input features, and its eval
    path fails on narrower layers (which no real model has)."""
    from lathe.demo.build import TinySpec, build_tiny_model

    spec = TinySpec(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-64", spec)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer (tests/tiny_encoders.py)."""
    from tests.tiny_encoders import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    from tests.tiny_encoders import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("models") / "tiny-t5")


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory) -> Path:
    from tests.tiny_encoders import build_tiny_bart

    return build_tiny_bart(tmp_path_factory.mktemp("models") / "tiny-bart")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """dataset_info.json with the identity set (JSON) and a copy of it as JSONL."""
    d = tmp_path_factory.mktemp("data")
    rows = json.loads(IDENTITY.read_text(encoding="utf-8"))
    (d / "identity.json").write_text(json.dumps(rows), encoding="utf-8")
    (d / "identity.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    chats = [{"conversations": [{"from": "human", "value": r["instruction"]},
                                {"from": "gpt", "value": r["output"]},
                                {"from": "human", "value": "Thanks!"},
                                {"from": "gpt", "value": "You are welcome."}]} for r in rows]
    (d / "identity_sharegpt.jsonl").write_text("\n".join(json.dumps(c) for c in chats), encoding="utf-8")
    info = {"identity": {"file_name": "identity.json"}, "identity_jsonl": {"file_name": "identity.jsonl"},
            "identity_sharegpt": {"file_name": "identity_sharegpt.jsonl", "formatting": "sharegpt"}}
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return d


@pytest.fixture()
def base_args(tiny_model, data_dir, tmp_path) -> dict:
    """A fast, valid training config on the tiny model."""
    return {
        "model_name_or_path": str(tiny_model),
        "dataset": "identity",
        "dataset_dir": str(data_dir),
        "template": "chatml",
        "cutoff_len": 128,
        "max_samples": 32,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-3,
        "max_steps": 12,
        "logging_steps": 2,
        "save_steps": 1000,
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
    }


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two OpenMP threads on a busy shared CPU spin-wait on each other (~100x slower tiny-model
    generation); what the generation tests compare does not depend on threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def as_overrides(args: dict) -> list[str]:
    return [f"{k}={v}" for k, v in args.items()]


def run_cli(*argv: str, cwd: Path | None = None, launcher: list[str] | None = None,
            timeout: int = 600, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the real `lathe` command line in a fresh process (`input` is piped to stdin)."""
    cmd = (launcher or [sys.executable, "-m", "lathe"]) + list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=dict(os.environ), input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


def run_main(*argv: str) -> subprocess.CompletedProcess:
    """The same command line through `lathe.cli.main` in this process: for the bad-input cases,
    which stop before anything slow, so a fresh interpreter's imports (seconds each) are not paid
    again and again. What it prints is captured as a process's would be."""
    import contextlib
    import io

    from lathe.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return subprocess.CompletedProcess(["lathe", *argv], code, out.getvalue(), err.getvalue())


def one_error(r: subprocess.CompletedProcess) -> str:
    """The one `...Error:` line a refused command printed (exit 2, no traceback)."""
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if "Error:" in line]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def write_pref_pairs(folder: Path) -> Path:
    """A dataset_dir with `pairs`: 8 preference pairs whose chosen reply is always the same."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [{"instruction": f"Say something nice about {t}.", "input": "", "chosen": "It is lovely.",
              "rejected": "No."} for t in ("tea", "rain", "books", "cats", "maps", "bread", "songs", "trees")]
    (folder / "pairs.json").write_text(json.dumps(pairs))
    (folder / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "pairs.json", "ranking": True}}))
    return folder


def write_yaml(path: Path, args: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(args), encoding="utf-8")
    return path


# The longest tests start first, each on its own worker, so that with `pytest -n N
# --maxschedchunk 1` (make test) they run beside the rest instead of after it: the README
# walk-through and the demo take minutes on 2 cores. xdist hands each worker two tests to
# start with, so the long ones go to positions 0, 2, 4, ...
LONGEST_FIRST = ("tests/e2e/test_readme.py::test_every_readme_command_runs[Quantize: `lathe quantize`]",
                 "tests/e2e/test_offline.py::test_the_wheelhouse_installs_with_no_network_and_runs_the_demo",
                 "tests/e2e/test_readme.py::test_every_readme_command_runs[Methods]",
                 "tests/e2e/test_readme.py::test_every_readme_command_runs[Predict and score generations "
                 "(`do_predict`)]",
                 "tests/e2e/test_readme.py::test_every_readme_command_runs[Train]",
                 "tests/e2e/test_quantize_cli.py::test_a_fine_tuned_encoder_quantizes_to_a_quarter_with_its_accuracy",
                 "tests/e2e/test_readme.py::test_every_readme_command_runs[Task types: classification, tagging, "
                 "seq2seq, QA, embeddings]",
                 "tests/e2e/test_readme.py::test_every_readme_command_runs[Hyperparameter search: `lathe tune`]",
                 "tests/e2e/test_quantize_cli.py::test_quantization_aware_training_beats_rounding_afterwards",
                 "tests/e2e/test_demo.py::test_demo_learns_its_identity",
                 "tests/e2e/test_quantize_cli.py::test_a_chat_model_in_mixed_precision_chats_and_predicts",
                 "tests/e2e/test_distributed.py::test_nproc_per_node_starts_the_processes_and_a_zero3_checkpoint_resumes")


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    long = [i for i in items if i.nodeid in LONGEST_FIRST]
    long.sort(key=lambda i: LONGEST_FIRST.index(i.nodeid))
    rest = [i for i in items if i.nodeid not in LONGEST_FIRST]
    ordered = []
    for item in long:
        ordered += [item] + rest[:1]
        rest = rest[1:]
    items[:] = ordered + rest
