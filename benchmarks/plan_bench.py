"""`lathe plan`'s memory estimate against the measured peak, per fine-tuning method, on CPU.

    python benchmarks/plan_bench.py            # every variant: the estimate, the peak, the ratio
    python benchmarks/plan_bench.py --record   # replaces results/plan_memory.json (the README quotes it)

The setting is speed_bench's: a Llama of hidden 512, 8 layers (28.5M parameters with the 2k
vocabulary of the tiny tokenizer), alpaca-shaped rows up to 512 tokens, batch 4, fp32. Each
variant (a method, or LoRA with a setting that moves memory: gradient checkpointing, eager
attention, padded batches with the model's own loss; LoRA dpo with its split backward and
without) is planned with `lathe plan --output` and
then trained with `lathe train` for --steps steps, each in a fresh process; the peak is the
training process's peak resident memory (ru_maxrss). The estimate holds when it is within 20%
of the peak. A chart of both goes beside the JSON (plan_memory.png).
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

import yaml

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script
from speed_bench import WRAPPER, build_assets, common_keys

VARIANTS = {
    "full": {"finetuning_type": "full", "learning_rate": 1e-5},
    "freeze": {"finetuning_type": "freeze", "freeze_trainable_layers": 2},
    "lora": {},
    "qlora": {"quantization_bit": 4},
    "ia3": {"finetuning_type": "ia3"},
    "adalora": {"finetuning_type": "adalora"},
    "prefix": {"finetuning_type": "prefix"},
    "prompt": {"finetuning_type": "prompt"},
    "ptuning": {"finetuning_type": "ptuning"},
    "lora_gc": {"gradient_checkpointing": True},
    "lora_eager": {"flash_attn": "disabled"},
    "lora_padded": {"padding_free": False, "fused_loss": False},
    "full_padded": {"finetuning_type": "full", "learning_rate": 1e-5, "padding_free": False, "fused_loss": False},
    # stages with two sequences an example (speed_bench's preference pairs)
    "dpo": {"stage": "dpo", "dataset": "pairs", "pref_beta": 0.1, "pref_loss": "sigmoid"},
    "dpo_joint": {"stage": "dpo", "dataset": "pairs", "pref_beta": 0.1, "pref_loss": "sigmoid",
                  "pref_split_backward": False},
}
LORA_KEYS = ("lora_rank", "lora_target")


def config(assets: dict[str, str], out: Path, rows: int, keys: dict) -> dict:
    cfg = {**common_keys(assets, out, rows), **keys}
    if cfg.get("finetuning_type", "lora") != "lora":
        for k in LORA_KEYS:
            cfg.pop(k, None)
    return cfg


def lathe(args: list[str], cwd: Path, name: str) -> float:
    """Run `lathe ARGS` in a fresh process; its peak resident memory (MB)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-m", "lathe", *args],
                          capture_output=True, text=True, cwd=cwd, env=env)
    rc, peak = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("PEAK "))[5:])
    if rc != 0:
        sys.exit(f"lathe {args[0]} ({name}) failed:\n{proc.stderr[-3000:]}")
    return peak


def measure(name: str, cfg: dict, folder: Path, steps: int) -> dict:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    planned = folder / f"{name}.plan.json"
    lathe(["plan", str(path), "--output", str(planned)], folder, name)
    plan = json.loads(planned.read_text())
    peak = lathe(["train", str(path), f"max_steps={steps}"], folder, name)
    measured = peak * 2**20
    parts = {p["name"]: round(p["bytes"] / 2**20) for p in plan["parts"] if p["where"] == "device"}
    return {"estimate_mb": round(plan["total"] / 2**20), "peak_mb": round(measured / 2**20),
            "ratio": round(plan["total"] / measured, 3), "parts_mb": parts, "trainable": plan["trainable"]}


def chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [results[n]["estimate_mb"] for n in names], 0.4, label="lathe plan")
    ax.bar([i + 0.2 for i in x], [results[n]["peak_mb"] for n in names], 0.4, label="measured peak")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("MB")
    ax.set_title("Memory: estimate vs measured peak (CPU, 28.5M Llama, batch 4)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="training steps of each measured run")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    add_output_args(ap, "plan_memory")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lathe-plan-") as tmp:
        root = Path(tmp)
        assets = build_assets(root, args.rows)
        for name in args.variants.split(","):
            cfg = config(assets, root / name, args.rows, VARIANTS[name])
            results[name] = r = measure(name, cfg, root, args.steps)
            print(f"{name:>12}: estimate {r['estimate_mb']:>6,} MB, peak {r['peak_mb']:>6,} MB, "
                  f"ratio {r['ratio']:.2f}  {r['parts_mb']}", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in results.values())
    print(f"largest error: {worst:.1%} (the aim: within 20%)")
    out = output_path(args, "plan_memory")
    out.write_text(json.dumps({"command": "python benchmarks/plan_bench.py " + " ".join(sys.argv[1:]),
                               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "steps": args.steps, "rows": args.rows, "largest_error": round(worst, 3),
                               "results": results}, indent=2) + "\n")
    chart(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
