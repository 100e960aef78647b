"""Model selection: early stopping ends a run whose eval loss rises, and the best
checkpoint (not the last) is what the run directory holds at the end."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import IDENTITY, run_cli, write_yaml


def _data(tmp_path: Path) -> Path:
    """Train on the identity replies; evaluate on the same questions with the reply's words
    reversed: once the model learns the real replies, eval loss can only rise."""
    rows = json.loads(IDENTITY.read_text(encoding="utf-8"))[:32]
    contrary = [{"instruction": r["instruction"], "input": "", "output": " ".join(reversed(r["output"].split()))}
                for r in rows[:16]]
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(rows), encoding="utf-8")
    (d / "contrary.json").write_text(json.dumps(contrary), encoding="utf-8")
    (d / "dataset_info.json").write_text(json.dumps(
        {"train": {"file_name": "train.json"}, "contrary": {"file_name": "contrary.json"}}), encoding="utf-8")
    return d


def test_early_stopping_ends_a_run_whose_eval_loss_rises(tiny_model, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = {"model_name_or_path": str(tiny_model), "dataset": "train", "eval_dataset": "contrary",
            "dataset_dir": str(_data(tmp_path)), "template": "chatml", "cutoff_len": 128,
            "per_device_train_batch_size": 8, "learning_rate": 1e-2, "max_steps": 60, "logging_steps": 2,
            "eval_steps": 2, "save_steps": 2, "early_stopping_steps": 2, "load_best_model_at_end": True,
            "save_total_limit": 2, "output_dir": str(out), "seed": 0}
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", args)))
    assert proc.returncode == 0, proc.stderr[-2000:]

    state = json.loads((out / "trainer_state.json").read_text())
    evals: dict[int, float] = {}  # the evaluations during training (the final one re-evaluates the best)
    for h in state["log_history"]:
        if "eval_loss" in h:
            evals.setdefault(h["step"], h["eval_loss"])
    assert state["global_step"] < 60, "early stopping did not stop the run"
    best_step = int(state["best_model_checkpoint"].rsplit("-", 1)[1])
    best = min(evals.values())
    assert abs(state["best_metric"] - best) < 1e-6
    after_best = [loss for step, loss in evals.items() if step > best_step]
    assert len(after_best) >= 2 and all(loss > best for loss in after_best), evals

    # The final eval and the saved adapter are the best checkpoint's, not the last step's.
    final = json.loads((out / "eval_results.json").read_text())
    assert abs(final["eval_loss"] - best) < 1e-4
    saved = load_file(out / "adapter_model.safetensors")
    kept = load_file(Path(state["best_model_checkpoint"]) / "adapter_model.safetensors")
    assert saved.keys() == kept.keys() and all((saved[k] == kept[k]).all() for k in saved)
    assert len(list(out.glob("checkpoint-*"))) <= 2  # save_total_limit


def test_early_stopping_without_an_eval_set_is_one_line(base_args, tmp_path):
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", base_args)), "early_stopping_steps=2")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "early_stopping_steps" in proc.stderr and "val_size" in proc.stderr
