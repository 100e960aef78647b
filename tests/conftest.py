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
def tiny_bert_exact(tmp_path_factory) -> Path:
    """The tiny BERT without dropout, for tests that compare two runs number for number (with
    dropout each run draws its own masks)."""
    from tests.tiny_encoders import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert-exact", dropout=0.0)


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
    """Run the real `lathe` command line in a process of its own (`input` is piped to stdin):
    forked from tests/zygote.py, which has the libraries imported already, when the environment
    allows; else a fresh interpreter."""
    cmd = (launcher or [sys.executable, "-m", "lathe"]) + list(argv)
    env = dict(os.environ)
    if launcher is None and "--debug" not in argv and (zygote := _Zygote.for_env(env)) is not None:
        return zygote.run(cmd, list(argv), Path(cwd or os.getcwd()), env, input, timeout)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=env, input=input, stdin=None if input is not None else subprocess.DEVNULL)


class _Zygote:
    """This test process's fork server (tests/zygote.py), started at the first command."""

    _instance: _Zygote | None = None
    _failed = False
    VOLATILE = ("PYTEST_CURRENT_TEST",)  # set by pytest per test; nothing reads it at import

    def __init__(self, env: dict[str, str]) -> None:
        import atexit

        self.env = self._key(env)
        self.folder = Path(tempfile.mkdtemp(prefix="lathe-zygote-"))
        self.socket = str(self.folder / "socket")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote", self.socket], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            raise RuntimeError("the test fork server did not start")
        atexit.register(self.close)

    @classmethod
    def _key(cls, env: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in env.items() if k not in cls.VOLATILE}

    @classmethod
    def for_env(cls, env: dict[str, str]) -> _Zygote | None:
        if cls._failed or env.get("LATHE_TEST_FRESH_PROCESSES", "0") not in ("0", ""):
            return None
        if env.get("LATHE_DEBUG", "0") not in ("0", ""):
            return None
        if cls._instance is None:
            try:
                cls._instance = cls(env)
            except (OSError, RuntimeError):
                cls._failed = True
                return None
        return cls._instance if cls._instance.env == cls._key(env) else None

    def run(self, cmd: list[str], argv: list[str], cwd: Path, env: dict[str, str], input: str | None,
            timeout: int) -> subprocess.CompletedProcess:
        import socket

        with tempfile.TemporaryDirectory(dir=self.folder) as d:
            streams = {name: os.path.join(d, name) for name in ("stdin", "stdout", "stderr")}
            if input is not None:
                Path(streams["stdin"]).write_text(input, encoding="utf-8")
            req = {"argv": argv, "cwd": str(cwd), "env": env, **streams,
                   "stdin": streams["stdin"] if input is not None else None}
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(self.socket)
                conn.sendall(json.dumps(req).encode() + b"\n")
                reader = conn.makefile("rb")
                pid = json.loads(reader.readline())["pid"]
                conn.settimeout(timeout)
                try:
                    line = reader.readline()
                except TimeoutError:
                    os.kill(pid, 9)
                    out, err = (Path(streams[k]).read_text(errors="replace") for k in ("stdout", "stderr"))
                    raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
            out, err = (Path(streams[k]).read_text(encoding="utf-8", errors="replace")
                        for k in ("stdout", "stderr"))
        return subprocess.CompletedProcess(cmd, json.loads(line)["code"], out, err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


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


def logged(run: Path, key: str) -> list[float]:
    """Every value of `key` in a run's trainer_log.jsonl, in order."""
    rows = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


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
