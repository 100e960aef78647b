"""Templates through the real CLI: `template: auto` trains on the tokenizer's own Jinja
template, and a template that disagrees with the tokenizer is called out at start."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli, write_yaml


def _train(tmp_path: Path, args: dict):
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_auto_template_trains_replies_only(tmp_path, base_args):
    args = {**base_args, "template": "auto", "dataset": "identity_sharegpt", "max_steps": 4}
    out = _train(tmp_path, args).stdout
    assert "renders differently" not in out
    # the tiny tokenizer's Jinja is ChatML: each reply and its end token are trained, prompts not
    shown = out.split("example    (trained tokens marked)", 1)[1].split("\nSaved ", 1)[0]
    example = "\n".join(line.removeprefix("    ") for line in shown.splitlines())
    assert example.count("<|im_start|>assistant\n[[") == 2  # both replies of the two-turn chat
    assert example.count("<|im_end|>\n]]") == 2 and "[[<|im_start|>user" not in example
    log = (Path(args["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()
    assert any("loss" in json.loads(x) for x in log)


def test_template_that_disagrees_with_the_tokenizer_is_noted(tmp_path, base_args):
    out = _train(tmp_path, {**base_args, "template": "llama3", "max_steps": 1}).stdout
    note = [line for line in out.splitlines() if "renders differently" in line]
    assert len(note) == 1 and "'llama3'" in note[0] and "template: auto" in note[0]
