"""`lathe train` with stage pt on the bundled corpus: validation perplexity falls, outputs are complete."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli, write_yaml

CORPUS_DIR = REPO / "src" / "lathe" / "demo" / "data"


@pytest.fixture()
def pt_args(tiny_model, tmp_path) -> dict:
    return {
        "stage": "pt", "model_name_or_path": str(tiny_model),
        "dataset": "lathe_corpus", "dataset_dir": str(CORPUS_DIR), "max_samples": 80,
        "cutoff_len": 64, "val_size": 0.2,
        "per_device_train_batch_size": 8, "max_steps": 16, "learning_rate": 5e-3,
        "logging_steps": 4, "eval_steps": 8, "eval_on_start": True, "save_steps": 1000,
        "output_dir": str(tmp_path / "run"), "seed": 0,
    }


def _train(tmp_path: Path, args: dict):
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, Path(args["output_dir"])


def _eval_perplexities(run: Path) -> list[tuple[int, float]]:
    logs = [json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()]
    return [(h["step"], math.exp(h["eval_loss"])) for h in logs if "eval_loss" in h]


def test_pt_lora_lowers_validation_perplexity(tmp_path, pt_args):
    proc, run = _train(tmp_path, {**pt_args, "finetuning_type": "lora", "lora_rank": 8, "learning_rate": 2e-2})
    evals = _eval_perplexities(run)
    assert evals[0][0] == 0 and evals[-1][0] == 16  # before training, and at the end
    assert evals[-1][1] < 0.9 * evals[0][1], evals
    results = json.loads((run / "all_results.json").read_text())
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert results["eval_perplexity"] == pytest.approx(evals[-1][1], rel=1e-6)  # the last eval, not a rerun
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml",
                 "train_results.json", "eval_results.json", "trainer_state.json"):
        assert (run / name).is_file(), name
    assert not (run / "model.safetensors").exists()
    # the summary: a decoded block of cutoff_len tokens, every token trained
    assert "stage pt | lora" in proc.stdout and "one block of 64 tokens, all trained" in proc.stdout
    assert "perplexity" in proc.stdout


def test_pt_full_trains_every_weight(tmp_path, pt_args, tiny_model):
    _, run = _train(tmp_path, {**pt_args, "finetuning_type": "full", "learning_rate": 2e-3})
    evals = _eval_perplexities(run)
    assert evals[-1][1] < 0.9 * evals[0][1], evals
    before, after = load_file(tiny_model / "model.safetensors"), load_file(run / "model.safetensors")
    assert [k for k in before if torch.equal(before[k], after[k])] == []


def test_pt_refuses_packing_in_one_line(tmp_path, pt_args):
    args = {k: v for k, v in pt_args.items() if k != "eval_on_start"}  # a passthrough key imports transformers
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", {**args, "packing": True})))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "packing applies to stage sft" in proc.stderr
