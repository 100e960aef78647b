"""Trainable parameters, peak memory and tokens/s of every fine-tuning method on one model.

    python benchmarks/methods_bench.py                 # writes benchmarks/results/local/methods.json
    python benchmarks/methods_bench.py --record        # replaces the recorded results/methods.json
    python benchmarks/methods_bench.py --methods lora,ia3 --steps 5

The ~30M-parameter Llama and data of stages_bench.py (hidden 512, 8 layers, fp32), sft on
the same rows, batch 8, cutoff_len 128, the same number of optimizer steps, each method in
a fresh process through `lathe.train`. Memory is the peak resident set size, in total and
above the process's size once the libraries are imported (what the method costs: weights it
adds, optimizer state, activations). Tokens/s counts the real tokens of the batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script
from stages_bench import build_assets, child

REPO = Path(__file__).resolve().parents[1]
VIRTUAL = {"num_virtual_tokens": 20}
METHODS = {  # name -> keys on top of the shared config
    "lora": {"finetuning_type": "lora", "lora_rank": 16},
    "dora": {"finetuning_type": "lora", "lora_rank": 16, "use_dora": True},
    "rslora": {"finetuning_type": "lora", "lora_rank": 16, "use_rslora": True},
    "pissa": {"finetuning_type": "lora", "lora_rank": 16, "pissa_init": True, "pissa_iter": 4},
    "loraplus": {"finetuning_type": "lora", "lora_rank": 16, "loraplus_lr_ratio": 16},
    "qlora_4bit": {"finetuning_type": "lora", "lora_rank": 16, "quantization_bit": 4},
    "adalora": {"finetuning_type": "adalora", "adalora_init_r": 16, "adalora_target_r": 8},
    "ia3": {"finetuning_type": "ia3"},
    "prefix": {"finetuning_type": "prefix", **VIRTUAL},
    "ptuning": {"finetuning_type": "ptuning", **VIRTUAL},
    "prompt": {"finetuning_type": "prompt", **VIRTUAL},
    "freeze": {"finetuning_type": "freeze", "freeze_trainable_layers": 2},
    "full": {"finetuning_type": "full"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    add_output_args(ap, "methods")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "LATHE_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        assets = build_assets(root)
        for name in args.methods.split(","):
            lr = 1e-4 if METHODS[name]["finetuning_type"] in ("lora", "adalora", "full", "freeze") else 1e-2
            cfg = {"model_name_or_path": assets["model"], "stage": "sft", "dataset": "chosen",
                   "dataset_dir": assets["data"], "template": "chatml", "cutoff_len": 128,
                   "per_device_train_batch_size": args.batch, "max_steps": args.steps, "learning_rate": lr,
                   "logging_steps": 1, "save_steps": 10_000, "seed": 0, "output_dir": str(root / "runs" / name),
                   **METHODS[name]}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                                  capture_output=True, text=True, env=env, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(f"method {name} failed:\n{proc.stderr[-3000:]}")
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
            figures["method_mb"] = figures.pop("stage_mb")
            runs.append({"method": name, "keys": METHODS[name], **figures})
            print(f"{name:10} trainable {figures['trainable']:>11,}  peak {figures['peak_mb']:7.1f} MB  "
                  f"method {figures['method_mb']:7.1f} MB  {figures['tokens_per_s'] or 0:7.1f} tok/s  "
                  f"loss {figures['first_loss']} -> {figures['last_loss']}", flush=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "command": "python benchmarks/methods_bench.py " + " ".join(sys.argv[1:]),
              "model": "Llama, hidden 512, 8 layers, vocab 2048 (~30M parameters), fp32",
              "steps": args.steps, "per_device_train_batch_size": args.batch, "cutoff_len": 128, "runs": runs}
    out = output_path(args, "methods")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
