"""Multi-turn sharegpt data, dataset mixing and cleaning through the real `lathe train`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import run_cli, write_yaml


def test_sharegpt_multi_turn_mixed_with_alpaca(tmp_path, base_args):
    args = {**base_args, "dataset": "identity_sharegpt,identity_jsonl", "max_samples": 16,
            "max_steps": 4}
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "identity_sharegpt: 16, identity_jsonl: 16 rows" in proc.stdout
    # every assistant turn is trained: the second reply of the chat shows up in brackets
    assert "[[You are welcome.<|im_end|>" in proc.stdout
    # tokenized once, by the plan that decides gradient checkpointing; the run reads that cache
    assert "(tokenized data: cache hit)" in proc.stdout
    state = json.loads((Path(args["output_dir"]) / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_cleaning_counts_are_reported(tmp_path, base_args):
    args = {**base_args, "dataset": "identity_jsonl", "max_samples": 100, "max_steps": 2,
            "min_response_chars": 60, "dedup": True}
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dropped = int(re.search(r"cleaning   dropped short rows: (\d+)", proc.stdout).group(1))
    kept = int(re.search(r"identity_jsonl: (\d+) rows", proc.stdout).group(1))
    assert dropped > 0 and kept + dropped == 100


def test_streaming_run_trains_for_max_steps(tmp_path, base_args):
    args = {**base_args, "dataset": "identity_jsonl", "streaming": True, "max_steps": 3,
            "val_size": 8, "logging_steps": 1}
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streamed from identity_jsonl" in proc.stdout
    state = json.loads((Path(args["output_dir"]) / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and any("eval_loss" in h for h in state["log_history"])
