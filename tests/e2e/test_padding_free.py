"""Padding-free batches through the CLI: the default for sft, the same run as padded batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import logged, one_error, run_cli, run_main, write_yaml


def test_padding_free_batches_train_as_padded_batches_do(tmp_path, base_args):
    """The same 6 steps with padding (padding_free: false) and without (the default): every logged
    loss, the eval loss and the saved adapter agree to float32 rounding (the batches hold the same
    examples; only padding and its masking are gone), and the summary says what was saved."""
    from safetensors.torch import load_file

    procs = {}
    for name, extra in (("padded", {"padding_free": False}), ("free", {})):
        args = {**base_args, "max_steps": 6, "logging_steps": 1, "val_size": 8, "output_dir": str(tmp_path / name),
                **extra}
        procs[name] = run_cli("train", str(write_yaml(tmp_path / f"{name}.yaml", args)))
        assert procs[name].returncode == 0, procs[name].stderr[-3000:]
    summary = procs["free"].stdout
    assert "padding-free batches: one row per batch (varlen attention); padding" in summary  # sdpa cut per example
    assert "0.0% now" in summary
    assert "padding-free" not in procs["padded"].stdout
    padded, free = tmp_path / "padded", tmp_path / "free"
    assert len(logged(free, "loss")) == 6
    assert logged(free, "loss") == pytest.approx(logged(padded, "loss"), rel=1e-5)
    assert logged(free, "eval_loss") == pytest.approx(logged(padded, "eval_loss"), rel=1e-5)
    a, b = load_file(padded / "adapter_model.safetensors"), load_file(free / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.parametrize(("keys", "says"), [
    ({"stage": "pt", "padding_free": True}, "padding_free: true with stage pt"),
    ({"finetuning_type": "prefix", "padding_free": True}, "padding_free: true with finetuning_type: prefix"),
])
def test_padding_free_where_it_cannot_apply_is_one_line(keys, says, base_args, tmp_path):
    r = run_main("train", str(write_yaml(tmp_path / "cfg.yaml", {**base_args, **keys})))
    assert says in one_error(r)
    assert not Path(base_args["output_dir"]).exists()


def test_the_fused_loss_trains_as_the_models_own_loss_does(tmp_path, base_args):
    """pt and sft with the output layer fused into the loss (the default) and without it: the same
    logged losses and saved weights; full fine-tuning, so the output layer's own gradient counts."""
    from safetensors.torch import load_file

    for stage, extra in (("sft", {"finetuning_type": "full", "learning_rate": 1e-3}),
                         ("pt", {"dataset": "identity", "stage": "pt"})):
        runs = {}
        for name, keys in (("own", {"fused_loss": False}), ("fused", {})):
            out = tmp_path / f"{stage}-{name}"
            args = {**base_args, **extra, **keys, "max_steps": 4, "logging_steps": 1, "output_dir": str(out)}
            proc = run_cli("train", str(write_yaml(tmp_path / f"{stage}-{name}.yaml", args)))
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[name] = (out, proc.stdout)
        (own, own_out), (fused, fused_out) = runs["own"], runs["fused"]
        assert "fused loss: the output layer and cross-entropy" in fused_out and "fused loss" not in own_out
        assert logged(fused, "loss") == pytest.approx(logged(own, "loss"), rel=1e-5), stage
        name = "model.safetensors" if stage == "sft" else "adapter_model.safetensors"
        a, b = load_file(own / name), load_file(fused / name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, stage


def test_fused_loss_with_a_stage_that_does_not_read_it_is_one_line(base_args, tmp_path):
    r = run_main("train", str(write_yaml(tmp_path / "cfg.yaml", {**base_args, "fused_loss": True, "stage": "rm"})))
    assert "fused_loss: true with stage rm" in one_error(r)
