"""Every command the README shows works as written.

The ```bash blocks (and the Python snippet) are read from README.md and run in the
README's order, in a fresh folder that holds the repository's examples, data and
benchmarks, with `lathe` on PATH: a command the README adds is run here without anyone
listing it. Only the commands in SKIP are not run, each for the reason given (they need
the network, eight GPUs, or are the test suite itself).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SKIP = {
    "make demo": "tests/e2e/test_demo.py runs the demo; the install step is what CI's make test does",
    "make test": "the test suite itself",
    "examples/qwen2.5_lora_sft.yaml": "downloads Qwen2.5-0.5B from the hub (online machines)",
    "torchrun --nproc_per_node 8": "eight processes; tests/e2e/test_distributed.py runs two",
    "accelerate launch --multi_gpu --num_processes 8": "eight GPUs",
}
_TASKS = "the task examples name hub models; tests/e2e/test_task_examples.py runs each with a local copy"
SKIP.update({f"examples/{name}.yaml": _TASKS for name in
             ("cls_sentiment", "regression", "ner", "seq2seq_t5", "qa", "embed")})


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def commands() -> list[tuple[str, str]]:
    """("bash", line) for every command line of the bash blocks; ("python", code) for the
    Python snippets. `source` lines are kept with the commands after them in their block."""
    out: list[tuple[str, str]] = []
    for lang, body in readme_blocks():
        if lang == "python":
            out.append(("python", body))
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
            out.append(("bash", prefix + line))
    return out


def skip_reason(command: str) -> str | None:
    return next((why for key, why in SKIP.items() if key in command), None)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh working folder like a clone (examples, data, evaluation, src, benchmarks as
    links) with `lathe` and `python` commands on PATH that run this interpreter (as after
    `source .venv/bin/activate`)."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("examples", "data", "evaluation", "src", "benchmarks"):
        (work / name).symlink_to(REPO / name)
    if (REPO / ".venv").is_dir():
        (work / ".venv").symlink_to(REPO / ".venv")
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "lathe"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lathe "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    python = bin_dir / "python"  # the README's `python` is the one Lathe is installed in (.venv's)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(REPO / "src")
    return work, env


def test_the_readme_shows_commands_and_skips_few():
    cmds = commands()
    assert len(cmds) >= 20
    ran = [c for _, c in cmds if skip_reason(c) is None]
    assert len({skip_reason(c) for _, c in cmds} - {None}) <= 7  # few reasons to skip, each a test elsewhere
    assert len(ran) >= len(cmds) - 16
    assert all(any(key in c for _, c in cmds) for key in SKIP), "a SKIP entry no longer matches the README"


def test_every_readme_command_runs(sandbox):
    work, env = sandbox
    outputs: dict[str, str] = {}
    servers: list[tuple[str, subprocess.Popen]] = []  # `... &` lines: servers the next lines talk to
    try:
        for kind, command in commands():
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
            argv = ["bash", "-c", command] if kind == "bash" else [sys.executable, "-c", command]
            proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900,
                                  stdin=subprocess.DEVNULL)
            assert proc.returncode == 0, f"README command failed: {command}\n{proc.stderr[-3000:]}"
            assert "Traceback" not in proc.stderr, f"{command}\n{proc.stderr[-3000:]}"
            outputs[command] = proc.stdout + proc.stderr
    finally:
        for command, server in servers:
            alive = server.poll() is None
            server.terminate()
            server.wait(30)
            assert alive, f"README server exited early: {command}"
    for k in range(len(servers)):
        assert "Traceback" not in (work / f"background-{k}.log").read_text()

    # what the commands promise, checked where it matters
    assert (work / "runs" / "sft_lora" / "adapter_model.safetensors").is_file()
    assert (work / "runs" / "try2-repeat1" / "config.yaml").is_file()  # the repeat went to a sibling
    assert (work / "runs" / "predict_sft_lora" / "generated_predictions.jsonl").is_file()
    assert (work / "exports" / "sft_lora" / "export_verification.json").is_file()
    assert (work / "runs" / "eval-sft" / "results.json").is_file()
    assert (work / "report.json").is_file()
    prefix_export = work / "exports" / "sft_prefix"  # a prompt-learning run exports as base + adapter
    assert (prefix_export / "adapter" / "adapter_config.json").is_file()
    assert '"passed": true' in (prefix_export / "export_verification.json").read_text()
    assert '"use_dora": true' in (work / "runs" / "sft_dora" / "adapter_config.json").read_text()
    assert '"adalora_rank"' in (work / "runs" / "sft_adalora" / "trainer_log.jsonl").read_text()
    quantized = json.loads((work / "quantized" / "sft_lora-static" / "quantize_report.json").read_text())
    assert [m["model"].split(" ")[0] for m in quantized["models"]] == ["float32", "int8_static", "int8_dynamic"]
    assert (work / "quantized" / "sft_lora-mixed" / "sensitivity.json").is_file()
    assert (work / "runs" / "predict_int8" / "generated_predictions.jsonl").is_file()
    assert '"origin": "qat"' in (work / "runs" / "sft_qat" / "quantized" / "quantization.json").read_text()
    assert "test_loss" in (work / "runs" / "sft_tested" / "test_results.json").read_text()
    cv = json.loads((work / "runs" / "sft_cv" / "cv_results.json").read_text())
    assert len(cv["metrics"]["loss"]["per_fold"]) == 3
    tuned = json.loads((work / "runs" / "tune-lora" / "tune_results.json").read_text())
    assert len(tuned["trials"]) == 8 and (work / "runs" / "tune-lora" / "best" / "run" / "eval_results.json").is_file()
    served = [v for k, v in outputs.items() if "examples/api_client.py" in k]
    assert len(served) == 2 and all("chat: I am Lathe" in v and "stream: I am Lathe" in v for v in served)
    chat = next(v for k, v in outputs.items() if "lathe chat examples/chat.yaml" in k)
    assert "Assistant:" in chat and "Generation: greedy" in chat
    lf = next(v for k, v in outputs.items() if "--from-llamafactory" in k)
    assert "export_quantization_bit" in lf and "lathe quantize" in lf
