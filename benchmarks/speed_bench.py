"""Training speed and memory of LoRA SFT on a ~33M-parameter Llama, on CPU: Lathe's settings side by side.

    python benchmarks/speed_bench.py                      # padded vs padding-free -> results/local/speed.json
    python benchmarks/speed_bench.py --record             # replaces the recorded results/speed.json
    python benchmarks/speed_bench.py --steps 10 --repeats 1

The setting is the one the speed issue names: LoRA (r16, every linear layer) on a Llama of hidden
512, 8 layers (about 33M parameters with its 32k vocabulary), alpaca-shaped rows (an instruction,
sometimes an input, a reply; lengths drawn from a long-tailed distribution like alpaca's, seeded,
about 46% padding at batch 4), batch 4, cutoff_len 512, gradient checkpointing off, fp32.

Each configuration trains in a fresh process, the configurations alternate (A B A B ...), and the
median of the repeats is reported, so a busy shared machine slows both alike. Tokens/s is honest:
the non-padding tokens of the training rows the run went through (counted from the tokenized
rows, not the batches' shapes) over the training time (Trainer's train_runtime, which excludes
loading). MFU: achieved FLOP/s over the machine's peak, with the FLOPs of a step taken as
6 x trainable-and-frozen-forward parameters x tokens for the forward and backward of the base
(2 forward + 4 backward, where the backward of frozen weights still computes input gradients:
written here as 6 N T for the matmuls, as the PaLM paper counts, plus attention 12 L d T s_avg),
and the peak measured by a float32 matmul on this machine in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "before": {"padding_free": False, "fused_loss": False},  # padded batches, the model's own loss
    "padding_free": {"fused_loss": False},
    "defaults": {},  # Lathe's defaults: padding-free batches and the fused loss
    "defaults_bf16": {"bf16": True},  # and bf16 autocast (CPUs that compute it natively)
}


def build_assets(root: Path, rows: int) -> dict[str, str]:
    """The model and `rows` alpaca-shaped examples."""
    from lathe.demo.build import DATA_DIR, TinySpec, build_tiny_model

    spec = TinySpec(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, initializer_range=0.02)
    model = build_tiny_model(root / "model", spec)
    words = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").split()
    rng = random.Random(0)

    def text(n: int) -> str:
        start = rng.randrange(len(words) - n) if len(words) > n else 0
        return " ".join((words * (1 + n // max(1, len(words))))[start:start + n])

    examples = []
    for _ in range(rows):  # alpaca: short instructions, an input a third of the time, replies with a long tail
        reply = int(min(380, rng.lognormvariate(4.2, 0.8)))
        examples.append({"instruction": text(rng.randint(6, 30)),
                         "input": text(rng.randint(5, 40)) if rng.random() < 0.35 else "",
                         "output": text(max(3, reply))})
    data = root / "data"
    data.mkdir()
    (data / "alpaca.json").write_text(json.dumps(examples))
    (data / "dataset_info.json").write_text(json.dumps({"alpaca": {"file_name": "alpaca.json"}}))
    return {"model": str(model), "data": str(data)}


def train_config(assets: dict[str, str], out: Path, steps: int, extra: dict) -> dict:
    return {"model_name_or_path": assets["model"], "dataset": "alpaca", "dataset_dir": assets["data"],
            "template": "alpaca", "cutoff_len": 512, "finetuning_type": "lora", "lora_rank": 16,
            "lora_target": "all", "per_device_train_batch_size": 4, "learning_rate": 1e-4,
            "max_steps": steps, "logging_steps": steps, "save_steps": 100000, "output_dir": str(out),
            "seed": 0, "report_to": "none", "plot_loss": False, **extra}


def run_one(config: dict) -> dict:
    """In a fresh process: train, then report time, tokens and peak memory."""
    import resource

    import lathe

    result = lathe.train(config)
    state = json.loads((Path(config["output_dir"]) / "trainer_state.json").read_text())
    runtime = result.metrics["train_runtime"]
    return {"train_runtime": runtime, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": [h["loss"] for h in state["log_history"] if "loss" in h][-1]}


def non_padding_tokens(assets: dict[str, str], steps: int, batch: int) -> int:
    """The tokens of the rows a run of `steps` steps trains on: the rows in the order the
    Trainer's seeded sampler draws them are not needed, the whole set's mean length is (every
    run goes through the same number of rows)."""
    from transformers import AutoTokenizer

    from lathe.config.load import load_config
    from lathe.data.loader import load_stage_data
    from lathe.data.templates import get_template

    cfg = load_config(train_config(assets, Path(tempfile.mkdtemp()) / "x", steps, {}))
    tok = AutoTokenizer.from_pretrained(assets["model"])
    data = load_stage_data("sft", cfg.data, tok, get_template("alpaca"), seed=0)
    lengths = [len(x) for x in data.train["input_ids"]]
    from lathe.data.packing import padding_fraction

    print(f"{len(lengths)} rows, mean {sum(lengths) / len(lengths):.0f} tokens, longest {max(lengths)}; "
          f"padding at batch {batch}: {padding_fraction(lengths, batch, multiple_of=8):.1%}", flush=True)
    return round(sum(lengths) / len(lengths) * steps * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config (JSON) in this process
    add_output_args(ap, "speed")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return
    names = args.configs.split(",")
    with tempfile.TemporaryDirectory(prefix="lathe-speed-") as tmp:
        root = Path(tmp)
        assets = build_assets(root, args.rows)
        tokens = non_padding_tokens(assets, args.steps, 4)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.repeats):
            for name in names:
                cfg = train_config(assets, root / f"{name}-{r}", args.steps, CONFIGS[name])
                t = time.time()
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True,
                                      text=True, cwd=REPO, env={**os.environ, "LATHE_QUIET": "1"})
                if proc.returncode != 0:
                    sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
                result["wall_s"] = round(time.time() - t, 1)
                runs[name].append(result)
                print(f"{name} #{r + 1}: {tokens / result['train_runtime']:,.0f} tokens/s, "
                      f"peak {result['peak_rss_mb']:,.0f} MB", flush=True)
    summary = {}
    for name, rs in runs.items():
        runtime = statistics.median(x["train_runtime"] for x in rs)
        summary[name] = {"tokens_per_s": round(tokens / runtime, 1), "train_runtime_s": round(runtime, 2),
                         "peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in rs)),
                         "final_loss": rs[0]["loss"], "runs": rs}
    base = summary[names[0]]
    for name in names:
        s = summary[name]
        s["speed_vs_" + names[0]] = round(s["tokens_per_s"] / base["tokens_per_s"], 3)
        s["memory_vs_" + names[0]] = round(s["peak_rss_mb"] / base["peak_rss_mb"], 3)
        print(f"{name:>14}: {s['tokens_per_s']:>8,.0f} tokens/s ({s['speed_vs_' + names[0]]:.2f}x), "
              f"peak {s['peak_rss_mb']:,} MB ({s['memory_vs_' + names[0]]:.2f}x), loss {s['final_loss']}")
    out = output_path(args, "speed")
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "steps": args.steps, "repeats": args.repeats, "non_padding_tokens": tokens,
                               "results": summary}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
