"""`lathe doctor`: the real report on this machine, and the known-bad combinations it flags."""

from __future__ import annotations

import json

import torch

from lathe.doctor import known_bad, requirement_problems, versions
from tests.conftest import run_cli


def test_the_report_says_what_this_machine_has(tmp_path):
    proc = run_cli("doctor", "--json", "--strict", "--output-dir", str(tmp_path))
    report = json.loads(proc.stdout)
    assert proc.returncode == (1 if report["problems"] else 0), proc.stderr[-2000:]
    assert report["versions"]["torch"] == torch.__version__.split("+")[0] or \
        report["versions"]["torch"] == torch.__version__
    assert report["torch_build"] == ("CPU only" if not torch.version.cuda else report["torch_build"])
    cpu = report["devices"][0]
    assert cpu["device"] == "cpu" and cpu["cores"] >= 1 and cpu["memory_gib"] > 0
    assert len(report["devices"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    # tried, not guessed: eager and sdpa run everywhere; FlashAttention needs its package and a GPU
    assert report["kernels"]["eager"] == "loads" and report["kernels"]["sdpa"] == "loads"
    if not torch.cuda.is_available():
        assert report["kernels"]["flash_attention_2"].startswith("no: ")
    assert {d["what"] for d in report["disk"]} >= {"hub cache", "runs (here)"}
    assert all(d["free_gib"] >= 0 for d in report["disk"])
    assert report["network"]["hub"].startswith("offline by choice")  # the tests set HF_HUB_OFFLINE
    text = run_cli("doctor", "--output-dir", str(tmp_path))
    assert text.returncode == 0  # problems are reported; only --strict fails on them
    assert "attention kernels" in text.stdout and "sdpa               loads" in text.stdout


def test_installed_versions_fit_what_lathe_asks_for():
    assert requirement_problems(versions()) == []


def test_known_bad_combinations_are_flagged_with_what_to_do():
    cpu = [{"device": "cpu"}]
    gpu = cpu + [{"device": "cuda:0"}]
    disks = [{"what": "hub cache", "path": "/x", "free_gib": 3.0}]
    found = {"flash-attn": "2.7.0", "torch": "2.5.1", "bitsandbytes": "0.43.0", "deepspeed": None}
    said = known_bad(found, "CUDA 12.4, cuDNN 90100", cpu, {"flash_attention_2": "no: x"}, disks)
    assert any("no GPU is visible" in s and "nvidia-smi" in s for s in said)
    assert any("flash-attn is installed but there is no GPU" in s for s in said)
    assert any("bitsandbytes 0.43.0 has no CPU kernels" in s for s in said)
    assert any("only 3.0 GiB free" in s for s in said)
    said = known_bad(found, "CUDA 12.4", gpu, {"flash_attention_2": "no: undefined symbol"}, [])
    assert any("FlashAttention 2 does not load (undefined symbol)" in s and "reinstall" in s for s in said)
    assert known_bad({"torch": "2.5.1"}, "CPU only", cpu, {}, []) == []
