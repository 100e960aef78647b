"""Every command the README shows works as written.

The ```bash blocks (and the Python snippets) are read from README.md and run as written, in
a fresh folder that holds the repository's examples, data and benchmarks, with `lathe` on
PATH: a command the README adds is run here without anyone listing it. Each README section
(a `###` heading, or a `##` one without) is its own test, in its own folder, so the sections
run in parallel; what a section reads that another one makes (the `runs/sft_lora` adapter,
its export, its int8 model) is made once per session by the README's own commands and
copied in. Only the commands in SKIP are not run, each for the reason given (they need
the network, eight GPUs, or are the test suite itself).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

_OFFLINE = "a wheelhouse of every wheel, then an install from it: tests/e2e/test_offline.py does both"
SKIP = {
    "make demo": "tests/e2e/test_demo.py runs the demo; the install step is what CI's make test does",
    "make test": "the test suite itself",
    "examples/qwen2.5_lora_sft.yaml": "downloads Qwen2.5-0.5B from the hub (online machines)",
    "torchrun --nproc_per_node 8": "eight processes; tests/e2e/test_distributed.py runs two",
    "NNODES=2": "two machines; tests/e2e/test_distributed.py joins two launches on this one",
    "make wheelhouse": _OFFLINE,
    "make install-offline": _OFFLINE,
    "docker build": "needs a Docker daemon; tests/e2e/test_offline.py lints the Dockerfiles and their steps",
    "lathe download": "needs the hub; tests/e2e/test_download.py downloads from a hub on localhost",
}
_TASKS = "the task examples name hub models; tests/e2e/test_task_examples.py runs each with a local copy"
SKIP.update({f"examples/{name}.yaml": _TASKS for name in
             ("cls_sentiment", "regression", "ner", "seq2seq_t5", "qa", "embed")})

# What sections read that another section makes: the folder, and the README command that makes it
# (in this order, once per session).
SHARED = {
    "runs/sft_lora": "lathe train examples/sft_lora.yaml",
    "exports/sft_lora": "lathe export examples/export.yaml",
    "quantized/sft_lora-int8": "lathe quantize examples/quantize_dynamic.yaml",
}
# Sections (by heading) and the shared folders they read without making them.
NEEDS = {
    "Predict and score": ["runs/sft_lora"],
    "Benchmarks": ["runs/sft_lora"],
    "Export, verified": ["runs/sft_lora"],
    "Chat": ["runs/sft_lora", "exports/sft_lora"],
    "Quantize": ["runs/sft_lora"],
    "Serve over the OpenAI API": ["runs/sft_lora", "quantized/sft_lora-int8"],
}


def readme_blocks() -> list[tuple[str, str, str]]:
    """(section heading, language, text) of every fenced block, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    out, heading = [], ""
    for m in re.finditer(r"^(#{2,3}) ([^\n]+)$|^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1):
            heading = m.group(2).strip()
        else:
            out.append((heading, m.group(3), m.group(4)))
    return out


def commands() -> list[tuple[str, str, str]]:
    """(section, "bash", line) for every command line of the bash blocks; (section, "python",
    code) for the Python snippets. `source` lines are kept with the commands after them."""
    out: list[tuple[str, str, str]] = []
    for section, lang, body in readme_blocks():
        if lang == "python":
            out.append((section, "python", body))
        if lang != "bash":
            continue
        prefix = ""
        for line in body.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("source "):
                prefix += line + " && "
                continue
            out.append((section, "bash", prefix + line))
    return out


def skip_reason(command: str) -> str | None:
    return next((why for key, why in SKIP.items() if key in command), None)


def sections() -> list[str]:
    """Headings of the sections with at least one command that runs."""
    return list(dict.fromkeys(s for s, _, c in commands() if skip_reason(c) is None))


def make_sandbox(work: Path, bin_dir: Path) -> dict:
    """A working folder like a clone (examples, data, evaluation, src, benchmarks as links) with
    `lathe`, `python` and `accelerate` commands on PATH that run this interpreter (as after
    `source .venv/bin/activate`); returns the environment to run commands in."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("examples", "data", "evaluation", "src", "benchmarks"):
        (work / name).symlink_to(REPO / name)
    if (REPO / ".venv").is_dir():
        (work / ".venv").symlink_to(REPO / ".venv")
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("lathe", f'"{sys.executable}" -m lathe'), ("python", f'"{sys.executable}"'),
                         ("accelerate", f'"{sys.executable}" -m accelerate.commands.accelerate_cli')):
        shim = bin_dir / name  # the README's `python` is the one Lathe is installed in (.venv's)
        shim.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(REPO / "src")
    return env


def run_command(kind: str, command: str, work: Path, env: dict) -> str:
    argv = ["bash", "-c", command] if kind == "bash" else [sys.executable, "-c", command]
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"README command failed: {command}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"{command}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> Path:
    """The folders of SHARED, made once per session by their README commands (one xdist worker
    makes them, under a lock; the others wait and reuse them)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "readme-shared"
    with FileLock(str(root) + ".lock"):
        if not (root / "done").is_file():
            shutil.rmtree(root, ignore_errors=True)
            env = make_sandbox(root / "work", root / "bin")
            readme = [c.split("#")[0].strip() for _, _, c in commands()]
            for folder, command in SHARED.items():
                assert command in readme, f"SHARED names a command the README no longer shows: {command}"
                run_command("bash", command, root / "work", env)
                assert (root / "work" / folder).is_dir(), f"{command} did not make {folder}"
            (root / "done").write_text("ok")
    return root / "work"


# What the commands promise, checked where it matters: (section, check of the folder and outputs).
Check = Callable[[Path, dict[str, str]], None]
CHECKS: list[tuple[str, Check]] = []


def checks(section: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS.append((section, fn))
        return fn
    return register


@checks("Train")
def _train(work, outputs):
    assert (work / "runs" / "sft_lora" / "adapter_model.safetensors").is_file()
    assert (work / "runs" / "try2-repeat1" / "config.yaml").is_file()  # the repeat went to a sibling


@checks("Coming from LLaMA-Factory")
def _llamafactory(work, outputs):
    lf = next(v for k, v in outputs.items() if "--from-llamafactory" in k)
    assert "export_quantization_bit" in lf and "lathe quantize" in lf


@checks("See what the model is trained on")
def _inspect(work, outputs):
    assert (work / "report.json").is_file()


@checks("Methods")
def _methods(work, outputs):
    prefix_export = work / "exports" / "sft_prefix"  # a prompt-learning run exports as base + adapter
    assert (prefix_export / "adapter" / "adapter_config.json").is_file()
    assert '"passed": true' in (prefix_export / "export_verification.json").read_text()
    assert '"use_dora": true' in (work / "runs" / "sft_dora" / "adapter_config.json").read_text()
    assert '"adalora_rank"' in (work / "runs" / "sft_adalora" / "trainer_log.jsonl").read_text()


@checks("Predict and score")
def _predict(work, outputs):
    assert (work / "runs" / "predict_sft_lora" / "generated_predictions.jsonl").is_file()


@checks("Train, validation and test splits")
def _splits(work, outputs):
    assert "test_loss" in (work / "runs" / "sft_tested" / "test_results.json").read_text()
    cv = json.loads((work / "runs" / "sft_cv" / "cv_results.json").read_text())
    assert len(cv["metrics"]["loss"]["per_fold"]) == 3


@checks("Hyperparameter search")
def _tune(work, outputs):
    tuned = json.loads((work / "runs" / "tune-lora" / "tune_results.json").read_text())
    assert len(tuned["trials"]) == 8 and (work / "runs" / "tune-lora" / "best" / "run" / "eval_results.json").is_file()


@checks("Benchmarks")
def _eval(work, outputs):
    assert (work / "runs" / "eval-sft" / "results.json").is_file()


@checks("Export, verified")
def _export(work, outputs):
    assert (work / "exports" / "sft_lora" / "export_verification.json").is_file()


@checks("Chat")
def _chat(work, outputs):
    chat = next(v for k, v in outputs.items() if "lathe chat examples/chat.yaml" in k)
    assert "Assistant:" in chat and "Generation: greedy" in chat


@checks("Quantize")
def _quantize(work, outputs):
    quantized = json.loads((work / "quantized" / "sft_lora-static" / "quantize_report.json").read_text())
    assert [m["model"].split(" ")[0] for m in quantized["models"]] == ["float32", "int8_static", "int8_dynamic"]
    assert (work / "quantized" / "sft_lora-mixed" / "sensitivity.json").is_file()
    assert (work / "runs" / "predict_int8" / "generated_predictions.jsonl").is_file()
    assert '"origin": "qat"' in (work / "runs" / "sft_qat" / "quantized" / "quantization.json").read_text()


@checks("Before training")
def _plan(work, outputs):
    plan = json.loads((work / "plan.json").read_text())
    assert plan["processes"] == 8 and "ZeRO-3" in plan["engine"] and plan["fits"] is True
    assert all("memory per device" in v for k, v in outputs.items() if "lathe plan" in k)


@checks("Serve over the OpenAI API")
def _serve(work, outputs):
    served = [v for k, v in outputs.items() if "examples/api_client.py" in k]
    assert len(served) == 2 and all("chat: I am Lathe" in v and "stream: I am Lathe" in v for v in served)


def _matches(section: str, key: str) -> bool:
    """A heading is named by its start, up to a colon, semicolon, blank or parenthesis."""
    return section.startswith(key) and section[len(key):len(key) + 1] in ("", ":", ";", " ", "(")


def test_the_readme_shows_commands_and_skips_few():
    cmds = commands()
    assert len(cmds) >= 20
    ran = [c for _, _, c in cmds if skip_reason(c) is None]
    # few reasons to skip, each a test elsewhere (the network, eight GPUs or two machines, a Docker daemon)
    assert len({skip_reason(c) for _, _, c in cmds} - {None}) <= 9
    assert len(ran) >= len(cmds) - 24
    assert all(any(key in c for _, _, c in cmds) for key in SKIP), "a SKIP entry no longer matches the README"
    names = sections()
    for key in [k for k, _ in CHECKS] + list(NEEDS):
        assert any(_matches(s, key) for s in names), f"no README section with commands is called {key!r}"


@pytest.mark.parametrize("section", sections())
def test_every_readme_command_runs(section, tmp_path, request):
    work = tmp_path / "work"
    env = make_sandbox(work, tmp_path / "bin")
    needed = [f for key, folders in NEEDS.items() if _matches(section, key) for f in folders]
    if needed:
        shared = request.getfixturevalue("shared_runs")
        for folder in needed:
            shutil.copytree(shared / folder, work / folder, symlinks=True)
    outputs: dict[str, str] = {}
    servers: list[tuple[str, subprocess.Popen]] = []  # `... &` lines: servers the next lines talk to
    try:
        for _, kind, command in [c for c in commands() if c[0] == section]:
            if skip_reason(command):
                continue
            if kind == "bash" and command.startswith("source .venv/") and not (work / ".venv").exists():
                continue  # no virtualenv here (the suite runs outside `make`); the shim is on PATH
            if kind == "bash" and command.split("#")[0].rstrip().endswith("&"):
                log = open(work / f"background-{len(servers)}.log", "w")
                servers.append((command, subprocess.Popen(["bash", "-c", "exec " + command.split("#")[0].rstrip()[:-1]],
                                                          cwd=work, env=env, stdout=log, stderr=log,
                                                          stdin=subprocess.DEVNULL, start_new_session=True)))
                continue
            outputs[command] = run_command(kind, command, work, env)
    finally:
        for command, server in servers:
            alive = server.poll() is None
            server.terminate()
            server.wait(30)
            assert alive, f"README server exited early: {command}"
    for k in range(len(servers)):
        assert "Traceback" not in (work / f"background-{k}.log").read_text()
    for key, check in CHECKS:
        if _matches(section, key):
            check(work, outputs)
