"""Integrity checks of weights and checkpoints, file modes, plots, CPU precision, run folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lathe.errors import ConfigError
from lathe.files import respect_umask
from lathe.integrity import checkpoint_problem, safetensors_problem, weights_problem
from lathe.recipes.common import cpu_precision
from lathe.recipes.plots import smooth


def _safetensors(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64, 64)}, str(path))
    return path


def test_safetensors_checks(tmp_path):
    good = _safetensors(tmp_path / "good.safetensors")
    assert safetensors_problem(good) is None
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    assert "cut short" in safetensors_problem(cut)
    header_cut = tmp_path / "header.safetensors"
    header_cut.write_bytes(good.read_bytes()[:40])
    assert "cut short" in safetensors_problem(header_cut)
    page = tmp_path / "page.safetensors"
    page.write_text("<!DOCTYPE html><html>Log in</html>")
    assert "HTML" in safetensors_problem(page)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "empty" in safetensors_problem(empty)


def test_checkpoint_checks(tmp_path):
    import torch

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    assert "trainer_state.json" in checkpoint_problem(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert "holds no weights" in checkpoint_problem(ckpt)
    _safetensors(ckpt / "adapter_model.safetensors")
    torch.save({"state": {}}, ckpt / "optimizer.pt")
    assert checkpoint_problem(ckpt) is None and weights_problem(ckpt) is None
    (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:50])
    assert "optimizer.pt" in checkpoint_problem(ckpt)
    (ckpt / "trainer_state.json").write_text('{"global_st')
    assert "not JSON" in checkpoint_problem(ckpt)
    assert "does not exist" in checkpoint_problem(tmp_path / "nope")


def test_private_files_get_the_umask_modes(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"x")
    os.chmod(weights, 0o600)
    shared = folder / "config.json"
    shared.write_text("{}")
    os.chmod(shared, 0o640)  # a mode someone chose on purpose stays
    old = os.umask(0o022)
    try:
        respect_umask(folder)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert weights.stat().st_mode & 0o777 == 0o644
    assert shared.stat().st_mode & 0o777 == 0o640


def test_smoothing_does_not_lag():
    falling = [10.0 - 0.1 * i for i in range(100)]
    smoothed = smooth(falling)
    assert max(abs(a - b) for a, b in zip(falling, smoothed)) < 1e-9  # a centred average of a line is the line
    noisy = [float(i % 2) for i in range(40)]
    assert max(smooth(noisy)[5:-5]) < 0.75  # and it does smooth
    assert smooth([3.0, 1.0]) == [3.0, 1.0]


def test_cpu_precision_trains_where_native_and_refuses_elsewhere():
    assert cpu_precision(False, False, {"bf16": False, "fp16": False}) == {}
    assert cpu_precision(True, False, {"bf16": True, "fp16": False}) == {"use_cpu": True}
    with pytest.raises(ConfigError, match=r"bf16: true .* set bf16: false"):
        cpu_precision(True, False, {"bf16": False, "fp16": False})
    with pytest.raises(ConfigError, match=r"fp16: true"):
        cpu_precision(False, True, {"bf16": True, "fp16": False})


def test_plots_mark_evaluations_on_the_training_curve(tmp_path):
    from lathe.recipes.plots import plot_losses

    history = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 2.5}]
    written = plot_losses(str(tmp_path), history)
    assert [p.name for p in written] == ["training_loss.png", "training_eval_loss.png"]
    assert all(p.stat().st_size > 5000 for p in written)


def test_model_keys_of_a_folder(tmp_path):
    from lathe.runs import model_keys

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    assert model_keys(str(export)) == {"model_name_or_path": str(export)}
    run = tmp_path / "dpo"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere"}))
    (run / "config.yaml").write_text("model_name_or_path: lathe:demo\nadapter_name_or_path: [runs/pt, runs/sft]\n")
    assert model_keys(str(run)) == {"model_name_or_path": "lathe:demo",
                                    "adapter_name_or_path": ["runs/pt", str(run)]}
    (run / "config.yaml").unlink()
    assert model_keys(str(run))["model_name_or_path"] == "/elsewhere"
    with pytest.raises(ConfigError, match="neither a model"):
        model_keys(str(tmp_path))


def test_system_prompt_of_a_dataset_entry(tmp_path):
    from lathe.data.formats import conversation
    from lathe.data.registry import spec_from_entry
    from lathe.data.sources import Row

    spec = spec_from_entry("x", {"file_name": "x.json", "system_prompt": "You are terse."}, tmp_path, "info")
    assert conversation(Row({"instruction": "q", "output": "a"}, "r0"), spec, True).system == "You are terse."
    spec2 = spec_from_entry("x", {"file_name": "x.json", "system_prompt": "You are terse.",
                                   "columns": {"system": "sys"}}, tmp_path, "info")
    own = conversation(Row({"instruction": "q", "output": "a", "sys": "Be kind."}, "r1"), spec2, True)
    assert own.system == "Be kind."  # a row's own system message wins


def test_flash_attn_maps_to_an_attention_kernel(capsys):
    import torch

    from lathe.model.load import attention_kwargs

    assert attention_kwargs("auto") == {}
    assert attention_kwargs("disabled") == {"attn_implementation": "eager"}
    assert attention_kwargs("sdpa") == {"attn_implementation": "sdpa"}
    if not torch.cuda.is_available():
        assert attention_kwargs("fa2") == {"attn_implementation": "sdpa"}
        assert "fa2 needs a CUDA GPU" in capsys.readouterr().err
