"""Peak memory and tokens/s of every training stage on one small Llama, on CPU.

    python benchmarks/stages_bench.py              # writes benchmarks/results/local/stages.json
    python benchmarks/stages_bench.py --record     # replaces the recorded results/stages.json
    python benchmarks/stages_bench.py --steps 10   # shorter

Each stage runs in a fresh process (so peaks do not mix) through `lathe.train`, with
LoRA, the same batch size, cutoff_len and number of optimizer steps, on the bundled
identity data: sft trains on the chosen replies of the preference pairs that
rm/dpo/orpo/simpo read (the same data), kto on the pairs' replies tagged good/bad, pt
on the corpus, ppo on the identity prompts. Memory is the process's peak resident set size, reported twice: in total,
and above the process's size after the libraries are imported (what the stage itself
costs: weights, optimizer state, activations, reference, reward model). Tokens/s
counts every token the stage pushes through the policy in training (chosen and
rejected both count for pairwise stages; prompt plus generated tokens for ppo).

Target (training-stages issue): DPO with LoRA uses at most 1.3x the memory of SFT
with LoRA on the same data (compared above the import baseline). `dpo_joint` runs DPO
with pref_split_backward: false (chosen and rejected in one joint pass, as TRL does)
to show what the split backward saves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
STAGES = ["sft", "pt", "rm", "dpo", "dpo_joint", "orpo", "simpo", "kto", "ppo"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_assets(root: Path) -> dict[str, str]:
    """A small Llama (about 30M parameters), and the datasets every stage reads."""
    from lathe.demo.build import DATA_DIR, TinySpec, build_tiny_model

    spec = TinySpec(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, initializer_range=0.02)
    model = build_tiny_model(root / "model", spec)
    data = root / "data"
    data.mkdir()
    identity = json.loads((DATA_DIR / "identity.json").read_text(encoding="utf-8"))
    pairs = json.loads((DATA_DIR / "identity_pref.json").read_text(encoding="utf-8"))
    tagged = [{"instruction": p["instruction"], "output": p[k], "label": k == "chosen"}
              for p in pairs for k in ("chosen", "rejected")]
    chosen = [{"instruction": p["instruction"], "input": p.get("input", ""), "output": p["chosen"]}
              for p in pairs]
    (data / "identity.json").write_text(json.dumps(identity))
    (data / "chosen.json").write_text(json.dumps(chosen))
    (data / "pairs.json").write_text(json.dumps(pairs))
    (data / "tagged.json").write_text(json.dumps(tagged))
    (data / "corpus.txt").write_text((DATA_DIR / "corpus.txt").read_text(encoding="utf-8"))
    info = {"identity": {"file_name": "identity.json"}, "chosen": {"file_name": "chosen.json"},
            "pairs": {"file_name": "pairs.json", "ranking": True},
            "tagged": {"file_name": "tagged.json", "columns": {"kto_tag": "label"}},
            "corpus": {"file_name": "corpus.txt"}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    return {"model": str(model), "data": str(data)}


def stage_config(name: str, assets: dict[str, str], out: Path, steps: int, batch: int) -> dict:
    stage = {"orpo": "dpo", "simpo": "dpo", "dpo_joint": "dpo"}.get(name, name)
    dataset = {"sft": "chosen", "pt": "corpus", "ppo": "identity", "kto": "tagged"}.get(name, "pairs")
    cfg = {"model_name_or_path": assets["model"], "stage": stage, "finetuning_type": "lora",
           "lora_rank": 16, "dataset": dataset, "dataset_dir": assets["data"], "template": "chatml",
           "cutoff_len": 128, "per_device_train_batch_size": batch, "max_steps": steps,
           "learning_rate": 1e-4, "logging_steps": 1, "save_steps": 10_000, "seed": 0,
           "output_dir": str(out / name)}
    if name in ("orpo", "simpo"):
        cfg["pref_loss"] = name
    if name == "dpo_joint":
        cfg["pref_split_backward"] = False
    if name == "ppo":
        cfg.update(reward_model=str(out / "rm"), max_new_tokens=32, ppo_epochs=1)
    return cfg


def child(cfg_json: str) -> None:
    """Run one stage (or method: methods_bench.py); print its figures as JSON on the last line."""
    import datasets  # noqa: F401  - imports first, so the baseline holds the libraries
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(2)
    baseline = _rss_mb()
    import lathe
    from lathe.model.adapters import count_parameters

    cfg = json.loads(cfg_json)
    start = time.perf_counter()
    result = lathe.train(cfg)
    seconds = time.perf_counter() - start
    metrics = result.metrics
    tokens = metrics.get("train_tokens_seen") or metrics.get("num_input_tokens_seen")
    runtime = metrics.get("train_runtime") or seconds
    trainable, total = count_parameters(result.model)
    losses = result.losses()
    print(json.dumps({"peak_mb": round(_peak_mb(), 1), "baseline_mb": round(baseline, 1),
                      "stage_mb": round(_peak_mb() - baseline, 1), "tokens": tokens,
                      "train_runtime_s": round(runtime, 2),
                      "tokens_per_s": round(tokens / runtime, 1) if tokens else None,
                      "wall_s": round(seconds, 2), "trainable": trainable, "total": total,
                      "first_loss": round(losses[0], 4) if losses else None,
                      "last_loss": round(losses[-1], 4) if losses else None}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--stages", default=",".join(STAGES))
    add_output_args(ap, "stages")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "LATHE_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        assets = build_assets(root)
        runs = []
        for name in args.stages.split(","):
            cfg = stage_config(name, assets, root / "runs", args.steps, args.batch)
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                                  capture_output=True, text=True, env=env, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(f"stage {name} failed:\n{proc.stderr[-3000:]}")
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.append({"stage": name, **figures})
            print(f"{name:6} peak {figures['peak_mb']:8.1f} MB  stage {figures['stage_mb']:7.1f} MB  "
                  f"{figures['tokens_per_s'] or 0:9.1f} tok/s", flush=True)

    by = {r["stage"]: r for r in runs}
    ratio = None
    if "sft" in by and "dpo" in by:
        ratio = round(by["dpo"]["stage_mb"] / by["sft"]["stage_mb"], 3)
        print(f"DPO/SFT memory above the import baseline: {ratio} (target <= 1.3)")
    joint = None
    if "sft" in by and "dpo_joint" in by:
        joint = round(by["dpo_joint"]["stage_mb"] / by["sft"]["stage_mb"], 3)
        print(f"DPO (joint pass)/SFT memory: {joint}")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "command": "python benchmarks/stages_bench.py " + " ".join(sys.argv[1:]),
              "model": "Llama, hidden 512, 8 layers, vocab 2048 (~30M parameters), fp32, LoRA r16 all linear",
              "steps": args.steps, "per_device_train_batch_size": args.batch, "cutoff_len": 128,
              "dpo_over_sft_memory": ratio, "dpo_joint_over_sft_memory": joint, "runs": runs}
    out = output_path(args, "stages")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
