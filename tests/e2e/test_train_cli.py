"""`lathe train` end to end on the tiny model: lora, full and freeze, outputs, safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, write_yaml


def _losses(run: Path) -> list[float]:
    lines = (run / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def _train(tmp_path: Path, args: dict, *extra: str):
    cfg = write_yaml(tmp_path / "cfg.yaml", args)
    proc = run_cli("train", str(cfg), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_full_finetuning_changes_every_weight(tmp_path, base_args, tiny_model):
    args = {**base_args, "finetuning_type": "full", "learning_rate": 1e-3, "plot_loss": True}
    _train(tmp_path, args)
    run = Path(args["output_dir"])
    for name in ("model.safetensors", "config.json", "tokenizer.json", "config.yaml",
                 "trainer_state.json", "train_results.json", "all_results.json",
                 "trainer_log.jsonl", "training_loss.png"):
        assert (run / name).is_file(), name
    losses = _losses(run)
    assert losses[-1] < losses[0]
    before, after = load_file(tiny_model / "model.safetensors"), load_file(run / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert sorted(changed) == sorted(before)  # every parameter trained


def test_freeze_trains_only_the_last_block(tmp_path, base_args, tiny_model):
    args = {**base_args, "finetuning_type": "freeze", "freeze_trainable_layers": 1,
            "learning_rate": 1e-3}
    proc = _train(tmp_path, args)
    run = Path(args["output_dir"])
    assert _losses(run)[-1] < _losses(run)[0]
    before, after = load_file(tiny_model / "model.safetensors"), load_file(run / "model.safetensors")
    for key in before:
        same = torch.equal(before[key], after[key])
        if key.startswith("model.layers.1."):
            assert not same, f"{key} should have trained"
        else:
            assert same, f"{key} should be frozen"
    assert "trainable" in proc.stdout


def test_lora_via_cli_saves_a_plain_peft_adapter(tmp_path, base_args):
    args = {**base_args, "finetuning_type": "lora", "lora_rank": 4, "lora_target": "q_proj,v_proj",
            "val_size": 0.25, "plot_loss": True}
    proc = _train(tmp_path, args)
    run = Path(args["output_dir"])
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["r"] == 4
    assert (run / "adapter_model.safetensors").is_file()
    assert not (run / "model.safetensors").exists()  # only the adapter is saved
    assert (run / "training_eval_loss.png").is_file()
    results = json.loads((run / "all_results.json").read_text())
    assert "eval_loss" in results and "train_loss" in results
    assert _losses(run)[-1] < _losses(run)[0]
    # the summary at start: parameters, data sizes, a marked example
    assert "trainable" in proc.stdout and "train 24, eval 8" in proc.stdout and "[[" in proc.stdout


def test_existing_output_dir_is_refused_then_overwritten_or_resumed(tmp_path, base_args):
    args = {**base_args, "max_steps": 4, "save_steps": 2}
    _train(tmp_path, args)
    run = Path(args["output_dir"])
    marker = run / "mine.txt"
    marker.write_text("keep me")

    again = run_cli("train", str(tmp_path / "cfg.yaml"))
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "already holds a run" in again.stderr
    assert marker.exists()  # nothing lost

    resumed = run_cli("train", str(tmp_path / "cfg.yaml"), "resume_from_checkpoint=true", "max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 6

    over = run_cli("train", str(tmp_path / "cfg.yaml"), "overwrite_output_dir=true")
    assert over.returncode == 0, over.stderr[-2000:]
    assert not marker.exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, base_args):
    proc = run_cli("train", str(write_yaml(tmp_path / "c.yaml", base_args)), "resume_from_checkpoint=true")
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


def test_saved_config_repeats_the_run_into_a_new_folder(tmp_path, base_args):
    args = {**base_args, "max_steps": 2}
    _train(tmp_path, args)
    run = Path(args["output_dir"])
    proc = run_cli("train", str(run / "config.yaml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    repeat = Path(f"{run}-repeat1")
    assert (repeat / "adapter_model.safetensors").is_file()
    # same seed, same data, same config: the same losses
    assert _losses(repeat) == pytest.approx(_losses(run), rel=1e-4)


def test_command_line_overrides_win_and_are_saved(tmp_path, base_args):
    _train(tmp_path, {**base_args, "max_steps": 2}, "learning_rate=2e-4", "lora_rank=2")
    import yaml

    saved = yaml.safe_load((Path(base_args["output_dir"]) / "config.yaml").read_text())
    assert saved["learning_rate"] == 2e-4 and saved["lora_rank"] == 2 and saved["max_steps"] == 2


def test_tensorboard_logs_when_asked(tmp_path, base_args):
    _train(tmp_path, {**base_args, "max_steps": 2, "logging_steps": 1, "report_to": "tensorboard"})
    events = list(Path(base_args["output_dir"]).rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
