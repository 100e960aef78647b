"""The speed options users bring from TrainingArguments and LLaMA-Factory: torch_compile trains as
the uncompiled model does, and a platform that cannot run an option says so in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import logged, one_error, run_cli, run_main, write_yaml

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the one line is for a machine without a GPU")


@pytest.mark.slow
def test_torch_compile_trains_as_the_uncompiled_model_does(base_args, tmp_path):
    """inductor's kernels (C++ on this CPU) compute the same losses as eager to float32 rounding,
    with padding-free rows and the fused loss (the defaults) in the compiled forward."""
    runs = {}
    for name, keys in (("eager", {}), ("compiled", {"torch_compile": True})):
        out = tmp_path / name
        args = {**base_args, **keys, "max_steps": 6, "logging_steps": 1, "output_dir": str(out)}
        proc = run_cli("train", str(write_yaml(tmp_path / f"{name}.yaml", args)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = logged(out, "loss")
    assert len(runs["compiled"]) == 6
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-5)


def test_torch_compile_without_a_compiler_is_one_line(base_args, tmp_path, monkeypatch):
    """inductor needs a C++ compiler on CPU: none (CXX pointing nowhere, as on a bare server)
    stops the run before anything is loaded or written."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    cfg = write_yaml(tmp_path / "cfg.yaml", {**base_args, "torch_compile": True})
    line = one_error(run_cli("train", str(cfg)))
    assert "torch_compile: true compiles with inductor, which needs a C++ compiler" in line
    assert "remove torch_compile" in line
    assert not Path(base_args["output_dir"]).exists()


@needs_no_gpu
@pytest.mark.parametrize("key", ["use_liger_kernel", "enable_liger_kernel"])
def test_liger_kernels_without_a_gpu_are_one_line(key, base_args, tmp_path):
    """TrainingArguments' use_liger_kernel and LLaMA-Factory's enable_liger_kernel alike."""
    r = run_main("train", str(write_yaml(tmp_path / "cfg.yaml", {**base_args, key: True})))
    line = one_error(r)
    assert "use_liger_kernel: true needs a CUDA GPU" in line and "fused_loss" in line
    assert not Path(base_args["output_dir"]).exists()


def test_bf16_autocast_on_this_cpu_follows_the_float32_loss_curve(base_args, tmp_path):
    """bf16: true on a CPU that computes bf16 natively (AVX512-BF16 / AMX) trains under autocast
    with float32 weights: its loss curve stays within 2% of float32's at every logged step, and
    both fall (a CPU without native bf16 refuses it in one line: test_failure_catalogue)."""
    from lathe.recipes.common import cpu_half_support

    if not cpu_half_support()["bf16"]:
        pytest.skip("this CPU has no native bf16")
    curves = {}
    for name, keys in (("fp32", {}), ("bf16", {"bf16": True})):
        out = tmp_path / name
        args = {**base_args, **keys, "max_steps": 12, "logging_steps": 2, "output_dir": str(out)}
        proc = run_cli("train", str(write_yaml(tmp_path / f"{name}.yaml", args)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[name] = logged(out, "loss")
    assert len(curves["bf16"]) == 6 and curves["bf16"][-1] < curves["bf16"][0] - 0.5
    assert curves["bf16"] == pytest.approx(curves["fp32"], rel=0.02)
    assert curves["bf16"] != curves["fp32"]  # autocast really ran: bf16 rounding moves the losses
