"""Steps/s and peak memory per process: one process against two (DDP, DeepSpeed ZeRO-2, ZeRO-3),
on a small Llama (about 30M parameters), full fine-tuning and LoRA, on this machine's CPU.

    python benchmarks/dist_bench.py              # writes benchmarks/results/local/distributed.json
    python benchmarks/dist_bench.py --record     # replaces results/distributed.json (+ .png)
    python benchmarks/dist_bench.py --steps 10   # shorter

Every run is `lathe train` as a user starts it (`nproc_per_node=2` for two processes, which runs
torchrun), at the same global batch (8: one process at 8, two at 4 each) and the same steps.
Memory is each training process's peak resident set, sampled every 0.1 s from outside (the
launcher itself is not counted); steps/s is the Trainer's own train_steps_per_second. With two
processes on a 2-core CPU each gets one core (torchrun's OMP_NUM_THREADS=1), one process gets
both: the compute is the same, so the steps/s ratio is what the communication costs. FSDP2
runs on GPUs only (accelerate's FSDP needs an accelerator); on a GPU machine the same script
gives its figures with --engines ddp,zero2,zero3,fsdp2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
ENGINES = {"one": (1, None), "ddp": (2, None), "zero2": (2, "ds_z2"), "zero3": (2, "ds_z3"),
           "fsdp2": (2, "fsdp2")}


def build_model(root: Path) -> str:
    from lathe.demo.build import TinySpec, build_tiny_model

    spec = TinySpec(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, initializer_range=0.02)
    return str(build_tiny_model(root / "model", spec))


def _rank_processes(root_pid: int) -> dict[int, int]:
    """pid -> RANK of the training processes under root_pid (or root_pid itself, alone)."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        found = {}
        for p in [root, *root.children(recursive=True)]:
            env = p.environ()
            if "RANK" in env or p.pid == root_pid and not root.children():
                found[p.pid] = int(env.get("RANK", 0))
        return found
    except psutil.Error:
        return {}


def run(engine: str, model: str, out: Path, steps: int, method: str) -> dict:
    procs, key = ENGINES[engine]
    cfg = {"model_name_or_path": model, "dataset": "identity", "dataset_dir": str(REPO / "data"),
           "template": "chatml", "cutoff_len": 128, "finetuning_type": method, "lora_target": "all",
           "per_device_train_batch_size": 8 // procs, "max_steps": steps, "learning_rate": 1e-4,
           "logging_steps": 5, "save_steps": 100_000, "seed": 0, "output_dir": str(out)}
    argv = [sys.executable, "-m", "lathe", "train", *[f"{k}={v}" for k, v in cfg.items()]]
    if procs > 1:
        argv.append(f"nproc_per_node={procs}")
    if key and key.startswith("ds_"):
        argv.append(f"deepspeed={key}")
    env = dict(os.environ)
    if procs == 1:
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    launcher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peaks: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        from _procs import rss_mb

        while not done.is_set():
            for pid, rank in _rank_processes(launcher.pid).items():
                try:
                    peaks[rank] = max(peaks.get(rank, 0.0), rss_mb(pid))
                except OSError:
                    pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = launcher.communicate()
    done.set()
    sampler.join()
    if launcher.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {launcher.returncode}"}
    metrics = json.loads((out / "train_results.json").read_text())
    return {"processes": procs, "steps_per_s": round(metrics["train_steps_per_second"], 3),
            "peak_mb_per_process": round(max(peaks.values()), 1) if peaks else None,
            "peak_mb_all_processes": round(sum(peaks.values()), 1) if peaks else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--engines", default="one,ddp,zero2,zero3")
    ap.add_argument("--methods", default="full,lora")
    add_output_args(ap, "distributed")
    args = ap.parse_args()
    import torch

    results: dict = {"machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
                                 "torch": torch.__version__, "gpus": torch.cuda.device_count()},
                     "setup": f"Llama ~30M parameters (hidden 512, 8 layers), identity data, cutoff 128, "
                              f"global batch 8, {args.steps} steps", "runs": {}}
    if "fsdp2" in args.engines and not torch.cuda.is_available():
        results["fsdp2"] = "not run: FSDP needs GPUs (accelerate runs it on accelerators only)"
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp))
        for method in args.methods.split(","):
            for engine in args.engines.split(","):
                if engine == "fsdp2" and not torch.cuda.is_available():
                    continue
                name = f"{method}/{engine}"
                results["runs"][name] = run(engine, model, Path(tmp) / method / engine, args.steps, method)
                print(name, results["runs"][name], flush=True)
    for method in args.methods.split(","):
        one = results["runs"].get(f"{method}/one", {})
        for engine in args.engines.split(","):
            r = results["runs"].get(f"{method}/{engine}", {})
            if engine != "one" and "steps_per_s" in r and "steps_per_s" in one:
                r["speed_vs_one"] = round(r["steps_per_s"] / one["steps_per_s"], 2)
                r["memory_per_process_vs_one"] = round(r["peak_mb_per_process"] / one["peak_mb_per_process"], 2)
    path = output_path(args, "distributed")
    path.write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, path.with_suffix(".png"))
    print(f"Wrote {path}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in results["runs"].items() if "steps_per_s" in v}
    names = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].barh(names, [runs[n]["steps_per_s"] for n in names], color="#4c72b0")
    axes[0].set_xlabel("steps/s (global batch 8)")
    axes[1].barh(names, [runs[n]["peak_mb_per_process"] for n in names], color="#dd8452")
    axes[1].set_xlabel("peak resident memory per process (MB)")
    for ax in axes:
        ax.invert_yaxis()
    fig.suptitle("One process vs two (DDP, ZeRO-2, ZeRO-3), " + results["setup"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
