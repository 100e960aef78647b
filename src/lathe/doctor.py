"""`lathe doctor`: what this machine has for Lathe, and what is known to go wrong with it.

Versions of Python and the libraries Lathe runs on (torch with its CUDA / ROCm build); devices
with their memory and the half-precision types they compute natively; which attention kernels
transformers can load here (tried on a one-layer model, not guessed from package names); the
free space where models, caches and runs are written; whether the model hubs can be reached.
Then the problems: each installed package against the versions Lathe asks for, and the
combinations known to fail, each with what to do. With --strict, exit code 1 when there is a
problem, so a setup script can stop on it.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (distribution name, what it is for): the libraries a bug report needs the versions of
LIBRARIES = (
    ("torch", "tensors and autograd"), ("transformers", "models and the Trainer"), ("peft", "adapters"),
    ("datasets", "data loading and caching"), ("accelerate", "devices and processes"),
    ("deepspeed", "ZeRO-2/3: pip install 'lathe[deepspeed]'"), ("bitsandbytes", "QLoRA: pip install 'lathe[qlora]'"),
    ("torchao", "int8/int4 quantization kernels"), ("flash-attn", "FlashAttention 2 (GPU)"),
    ("flash_attn_3", "FlashAttention 3 (Hopper GPU)"), ("modelscope", "models from ModelScope"),
    ("huggingface_hub", "the model hub"), ("tokenizers", "fast tokenizers"), ("safetensors", "weight files"),
)
KERNELS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
LOW_DISK_GB = 10.0


@dataclass
class Report:
    python: dict[str, str]
    versions: dict[str, str | None]
    torch_build: str
    devices: list[dict[str, Any]]
    kernels: dict[str, str]
    disk: list[dict[str, Any]]
    network: dict[str, str]
    problems: list[str] = field(default_factory=list)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name, _ in LIBRARIES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def torch_build() -> str:
    import torch

    if torch.version.hip:
        return f"ROCm {torch.version.hip}"
    if torch.version.cuda:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return f"CUDA {torch.version.cuda}" + (f", cuDNN {cudnn}" if cudnn else "")
    return "CPU only"


def devices() -> list[dict[str, Any]]:
    import torch

    from lathe.recipes.common import cpu_half_support

    half = cpu_half_support()
    total, free = _memory_gib()
    found = [{"device": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "memory_gib": total, "free_gib": free, "bf16": "native" if half["bf16"] else "emulated (slow)",
              "fp16": "native" if half["fp16"] else "emulated (slow)"}]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        free_b, total_b = torch.cuda.mem_get_info(i)
        found.append({"device": f"cuda:{i}", "name": p.name, "memory_gib": round(total_b / 2**30, 1),
                      "free_gib": round(free_b / 2**30, 1), "compute": f"{p.major}.{p.minor}",
                      "bf16": "native" if torch.cuda.is_bf16_supported() else "no", "fp16": "native"})
    return found


def _memory_gib() -> tuple[float, float]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return round(vm.total / 2**30, 1), round(vm.available / 2**30, 1)
    except ImportError:
        return 0.0, 0.0


def kernels() -> dict[str, str]:
    """Each attention kernel, tried: a one-layer Llama made with it (on the GPU when there is one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tiny = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    found = {}
    for name in KERNELS:
        try:
            model = LlamaForCausalLM._from_config(tiny, attn_implementation=name, dtype=dtype).to(device)
            with torch.no_grad():
                model(torch.ones(1, 4, dtype=torch.long, device=device))
            found[name] = "loads"
        except Exception as e:  # each kernel's own reason it cannot run here
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            found[name] = "no: " + why.split("due to the following error: ")[-1][:110]
    return found


def disk(output_dir: str = ".") -> list[dict[str, Any]]:
    from huggingface_hub import constants

    places = [("hub cache", constants.HF_HUB_CACHE),
              ("datasets cache", os.environ.get("HF_DATASETS_CACHE", str(Path(constants.HF_HOME) / "datasets"))),
              ("modelscope cache", os.environ.get("MODELSCOPE_CACHE", str(Path.home() / ".cache" / "modelscope"))),
              ("lathe cache", os.environ.get("LATHE_HOME", str(Path.home() / ".cache" / "lathe"))),
              ("runs (here)", output_dir)]
    found = []
    for what, where in places:
        path = Path(where).expanduser()
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        usage = shutil.disk_usage(probe)
        found.append({"what": what, "path": str(path), "used_gib": round(_du(path) / 2**30, 2) if path.is_dir()
                      and what != "runs (here)" else None, "free_gib": round(usage.free / 2**30, 1)})
    return found


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def network() -> dict[str, str]:
    from concurrent.futures import ThreadPoolExecutor

    from lathe import hub

    ms = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    with ThreadPoolExecutor(2) as pool:  # both probes at once
        hub_up = pool.submit(hub.reachable)
        ms_up = pool.submit(hub.host_reachable, ms, 443)
    found = {}
    if hub.offline_by_choice():
        found["hub"] = "offline by choice (HF_HUB_OFFLINE): local folders and the cache only"
    else:
        found["hub"] = f"{hub.endpoint()} " + ("reachable" if hub_up.result() else
                                              "cannot be reached: local folders and the cache only")
    found["modelscope"] = f"{ms} " + ("reachable" if ms_up.result() else "cannot be reached")
    return found


# --- problems: versions Lathe asks for, and combinations known to fail -----------------------

def requirement_problems(found: dict[str, str | None]) -> list[str]:
    """Every installed requirement of Lathe (and its extras) against the version range it asks for."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    problems = []
    try:
        requires = md.requires("lathe") or []
    except md.PackageNotFoundError:
        return []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and "extra" not in str(req.marker) and not req.marker.evaluate():
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            if req.marker is None:
                problems.append(f"{req.name} is not installed and Lathe needs it: pip install '{req}'")
            continue
        try:
            if req.specifier and Version(have) not in req.specifier:
                problems.append(f"{req.name} {have} is outside what Lathe asks for ({req.specifier}): "
                                f"pip install '{req.name}{req.specifier}'")
        except InvalidVersion:
            pass
    return problems


def known_bad(found: dict[str, str | None], build: str, devs: list[dict[str, Any]],
              kernels_found: dict[str, str], disks: list[dict[str, Any]]) -> list[str]:
    """Combinations seen to fail, each with what to do."""
    problems = []
    gpus = [d for d in devs if d["device"].startswith("cuda")]
    if build.startswith("CUDA") and not gpus:
        problems.append(f"torch is a {build.split(',')[0]} build but no GPU is visible (driver, "
                        "CUDA_VISIBLE_DEVICES?): training would run on the CPU; check nvidia-smi")
    if found.get("flash-attn") and not gpus:
        problems.append("flash-attn is installed but there is no GPU: flash_attn: fa2 falls back to sdpa here")
    if found.get("flash-attn") and gpus and not kernels_found.get("flash_attention_2", "").startswith("loads"):
        problems.append("flash-attn is installed but FlashAttention 2 does not load "
                        f"({kernels_found.get('flash_attention_2', '')[4:]}); it was likely built for another "
                        "torch or CUDA: reinstall it (pip install flash-attn --no-build-isolation)")
    if found.get("torchvision"):
        try:
            import torchvision  # noqa: F401  - a torchvision of another torch build breaks transformers' imports
        except Exception as e:
            problems.append(f"torchvision {found['torchvision']} does not import with torch {found['torch']} "
                            f"({str(e).splitlines()[0][:80]}): pip uninstall torchvision, or install the build "
                            "made for this torch")
    if found.get("deepspeed") and not shutil.which("g++") and not gpus:
        problems.append("DeepSpeed builds its CPU ops with g++, which is not installed: apt-get install g++ "
                        "(or use DDP without the deepspeed key)")
    if found.get("bitsandbytes") and not gpus:
        from packaging.version import Version

        if Version(found["bitsandbytes"]) < Version("0.45"):
            problems.append(f"bitsandbytes {found['bitsandbytes']} has no CPU kernels (0.45 added them): "
                            "pip install -U bitsandbytes")
    for d in disks:
        if d["free_gib"] < LOW_DISK_GB:
            problems.append(f"{d['what']} ({d['path']}): only {d['free_gib']} GiB free; a 7B model needs ~15 GiB "
                            "and each full checkpoint as much again")
    return problems


def examine(output_dir: str = ".") -> Report:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        net = pool.submit(network)  # the probes wait on the network meanwhile
        found = versions()
        found["torchvision"] = _version_or_none("torchvision")
        build = torch_build()
        devs, kern, disks = devices(), kernels(), disk(output_dir)
        report = Report(python={"version": platform.python_version(), "executable": sys.executable,
                                "platform": platform.platform()},
                        versions=found, torch_build=build, devices=devs, kernels=kern, disk=disks, network=net.result())
    report.problems = requirement_problems(found) + known_bad(found, build, devs, kern, disks)
    return report


def _version_or_none(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def render(r: Report) -> str:
    from lathe import __version__

    lines = [f"Lathe {__version__}", f"  python        {r.python['version']} ({r.python['executable']})",
             f"  platform      {r.python['platform']}", "libraries"]
    for name, what in LIBRARIES:
        v = r.versions.get(name)
        shown = v + (f" ({r.torch_build})" if name == "torch" else "") if v else f"not installed ({what})"
        lines.append(f"  {name:<16}{shown}")
    lines.append("devices")
    for d in r.devices:
        extra = f"{d['cores']} cores" if d["device"] == "cpu" else f"compute {d['compute']}"
        lines.append(f"  {d['device']:<14}{d['name']}, {extra}, {d['memory_gib']} GiB memory ({d['free_gib']} free); "
                     f"bf16 {d['bf16']}, fp16 {d['fp16']}")
    lines.append("attention kernels (tried on a one-layer model)")
    lines += [f"  {k:<19}{v}" for k, v in r.kernels.items()]
    lines.append("disk")
    for d in r.disk:
        used = f", {d['used_gib']} GiB used" if d["used_gib"] is not None else ""
        lines.append(f"  {d['what']:<17}{d['path']}: {d['free_gib']} GiB free{used}")
    lines.append("network")
    lines += [f"  {k:<14}{v}" for k, v in r.network.items()]
    if r.problems:
        lines.append(f"{len(r.problems)} problem(s)")
        lines += [f"  - {p}" for p in r.problems]
    else:
        lines.append("no known problems")
    return "\n".join(lines)


def run_doctor(as_json: bool = False, output_dir: str = ".", strict: bool = False) -> int:
    report = examine(output_dir)
    print(json.dumps(report.__dict__, indent=2) if as_json else render(report), flush=True)
    return 1 if strict and report.problems else 0
