"""Training speed and memory of LoRA SFT on a 27M-parameter Llama, on CPU: Lathe's settings side by
side, and against LLaMA-Factory.

    python benchmarks/speed_bench.py                      # Lathe: padded vs padding-free vs fused loss
    python benchmarks/speed_bench.py --vs-llamafactory    # Lathe's defaults vs LLaMA-Factory's, ratios
    python benchmarks/speed_bench.py --vs-llamafactory --record   # replaces results/speed_llamafactory.json
    python benchmarks/speed_bench.py --vs-llamafactory --stage dpo   # the same for DPO (preference pairs)

The setting is the one the speed issue names: LoRA (r16, every linear layer) on a Llama of hidden
512, 8 layers (27.3M parameters with the demo tokenizer's 2k vocabulary), alpaca-shaped rows (an instruction,
an input a third of the time, a reply; lengths drawn from a long-tailed distribution, seeded; the
padding share at batch 4 is printed), batch 4, cutoff_len 512, fp32, one epoch over
steps x 4 rows, so every run trains on exactly the same examples.

Each run is the tool's own command line in a fresh process (`lathe train`, `llamafactory-cli
train`), under a small wrapper that reports the process's peak resident memory. The runs
alternate (A B C A B C ...) and the median of the repeats is reported, so a busy shared machine
slows all alike. Tokens/s is counted honestly: the non-padding tokens of the rows (as Lathe's
template renders them; LLaMA-Factory's alpaca template renders the same text, give or take a
separator) over the Trainer's train_runtime (training only, no loading).

LLaMA-Factory is installed into a venv of its own (--lf-venv; made on first use from PyPI:
llamafactory 0.9.5 with torch 2.11 and torchaudio 2.11.0, which its start-up imports; no
torchaudio build on PyPI loads beside torch 2.13, Lathe's pin, so the two tools run different
torch versions, which the ratios include). Its defaults: gradient checkpointing on; the
`llamafactory_no_gc` runs set disable_gradient_checkpointing: true.
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
from pathlib import Path

import yaml

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
LATHE_CONFIGS = {
    "lathe_padded": {"padding_free": False, "fused_loss": False},  # padded batches, the model's own loss
    "lathe_padding_free": {"fused_loss": False},
    "lathe": {},  # Lathe's defaults: padding-free batches and the fused loss
    "lathe_bf16": {"bf16": True},  # and bf16 autocast (CPUs that compute it natively)
    "lathe_compile": {"torch_compile": True},  # and torch.compile (inductor; its compile time counted)
    "lathe_padded_compile": {"padding_free": False, "fused_loss": False, "torch_compile": True},
    "lathe_joint": {"pref_split_backward": False},  # --stage dpo: both sides in one backward (more memory)
}
# LLaMA-Factory names an alpaca ranking set's reply columns only when told (Lathe reads these by default)
PAIR_COLUMNS = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
LF_VERSION = "0.9.5"
# LLaMA-Factory imports torchaudio at start; no torchaudio on PyPI loads beside torch 2.13 (Lathe's pin),
# and torchaudio 2.11.1 does not load beside torch 2.11.0: this pair does
LF_TORCH = ("torch==2.11.0", "torchaudio==2.11.0")
WRAPPER = ("import json, resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('PEAK ' + json.dumps([rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))")


def build_assets(root: Path, rows: int) -> dict[str, str]:
    """The model and `rows` alpaca-shaped examples (registered for both tools: the formats agree)."""
    from lathe.demo.build import DATA_DIR, TinySpec, build_tiny_model

    spec = TinySpec(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, initializer_range=0.02)
    model = build_tiny_model(root / "model", spec)
    words = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").split()
    rng = random.Random(0)

    def text(n: int) -> str:
        start = rng.randrange(max(1, len(words) - n))
        return " ".join((words * (1 + n // max(1, len(words))))[start:start + n])

    examples = []
    for _ in range(rows):  # alpaca: short instructions, an input a third of the time, replies with a long tail
        reply = int(min(380, rng.lognormvariate(4.0, 1.0)))
        examples.append({"instruction": text(rng.randint(6, 30)),
                         "input": text(rng.randint(5, 40)) if rng.random() < 0.35 else "",
                         "output": text(max(3, reply))})
    pairs = []
    for _ in range(rows):  # preference pairs: alpaca prompts, two replies of independent lengths
        pairs.append({"instruction": text(rng.randint(6, 30)),
                      "input": text(rng.randint(5, 40)) if rng.random() < 0.35 else "",
                      "chosen": text(max(3, int(min(380, rng.lognormvariate(4.0, 1.0))))),
                      "rejected": text(max(3, int(min(380, rng.lognormvariate(4.0, 1.0)))))})
    data = root / "data"
    data.mkdir()
    (data / "alpaca.json").write_text(json.dumps(examples))
    (data / "pairs.json").write_text(json.dumps(pairs))
    (data / "dataset_info.json").write_text(json.dumps({"alpaca": {"file_name": "alpaca.json"},
                                                        "pairs": {"file_name": "pairs.json", "ranking": True,
                                                                  "columns": PAIR_COLUMNS}}))
    return {"model": str(model), "data": str(data)}


def common_keys(assets: dict[str, str], out: Path, rows: int, stage: str = "sft") -> dict:
    """The keys both tools read the same way (LLaMA-Factory's names are Lathe's); dpo: sigmoid
    loss, beta 0.1, the LoRA policy with its adapter off as the reference (both tools' defaults)."""
    extra = {"pref_beta": 0.1, "pref_loss": "sigmoid"} if stage == "dpo" else {}
    return {**extra, "model_name_or_path": assets["model"], "stage": stage, "finetuning_type": "lora",
            "lora_rank": 16, "lora_target": "all", "dataset": "pairs" if stage == "dpo" else "alpaca",
            "dataset_dir": assets["data"], "template": "alpaca",
            "cutoff_len": 512, "max_samples": rows, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "num_train_epochs": 1,
            "lr_scheduler_type": "linear", "logging_steps": 5, "save_steps": 100000, "output_dir": str(out),
            "seed": 0, "report_to": "none", "plot_loss": False}


def non_padding_tokens(assets: dict[str, str], rows: int, batch: int, stage: str = "sft") -> int:
    """The tokens of the rows every run trains on, as Lathe renders them (dpo: chosen and
    rejected sequences both)."""
    from transformers import AutoTokenizer

    from lathe.config.load import load_config
    from lathe.data.loader import load_stage_data
    from lathe.data.packing import padding_fraction
    from lathe.data.templates import get_template

    cfg = load_config(common_keys(assets, Path(tempfile.mkdtemp()) / "x", rows, stage))
    tok = AutoTokenizer.from_pretrained(assets["model"])
    train = load_stage_data(stage, cfg.data, tok, get_template("alpaca"), seed=0).train
    if stage == "dpo":
        chosen, rejected = [len(x) for x in train["chosen_input_ids"]], [len(x) for x in train["rejected_input_ids"]]
        from lathe.data.packing import pair_padding

        before, _ = pair_padding(chosen, rejected, batch)
        print(f"{len(chosen)} pairs, mean {sum(chosen + rejected) / len(chosen):.0f} tokens a pair; padding at "
              f"batch {batch}: {before:.1%}", flush=True)
        return sum(chosen) + sum(rejected)
    lengths = [len(x) for x in train["input_ids"]]
    print(f"{len(lengths)} rows, mean {sum(lengths) / len(lengths):.0f} tokens, longest {max(lengths)}; "
          f"padding at batch {batch}: {padding_fraction(lengths, batch, multiple_of=8):.1%}", flush=True)
    return sum(lengths)


def llamafactory_venv(venv: Path) -> Path:
    """The venv's llamafactory-cli, made first if missing."""
    cli = venv / "bin" / "llamafactory-cli"
    if cli.is_file():
        return cli
    print(f"installing LLaMA-Factory {LF_VERSION} into {venv} (once, a few GB) ...", flush=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = venv / "constraints.txt"
    pins.write_text("\n".join(LF_TORCH) + "\n")
    for cmd in (["install", "-q", "--upgrade", "pip"], ["install", "-q", *LF_TORCH],
                ["install", "-q", "-c", str(pins), f"llamafactory=={LF_VERSION}"]):
        subprocess.run([str(py), "-m", "pip", *cmd], check=True)
    return cli


def run(name: str, command: list[str], cfg: dict, folder: Path) -> dict:
    """One run of a tool's command line: train_runtime, peak memory, final loss."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *command, str(path)], capture_output=True, text=True,
                          cwd=folder, env=env)
    rc, peak = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("PEAK "))[5:])
    if rc != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    out = Path(cfg["output_dir"])
    metrics = json.loads((out / "train_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    result = {"train_runtime": metrics["train_runtime"], "peak_rss_mb": round(peak), "last_loss": losses[-1]}
    steady = steady_rate(out / "trainer_log.jsonl")
    if steady:
        result["steady_tokens_per_s"] = steady
    return result


def steady_rate(log: Path) -> float | None:
    """Lathe's runs: the non-padding tokens per second of the second half of the steps, from the
    logged step records (elapsed seconds, tokens seen): the rate once one-time costs (compiling,
    warming the allocator) are paid."""
    if not log.is_file():
        return None
    steps = [r for r in map(json.loads, log.read_text().splitlines())
             if "loss" in r and "elapsed_s" in r and "num_input_tokens_seen" in r]
    if len(steps) < 3:
        return None
    last = steps[-1]
    mid = next(r for r in steps if r["step"] >= last["step"] / 2)
    if mid is last or last["elapsed_s"] <= mid["elapsed_s"]:
        return None
    seen = last["num_input_tokens_seen"] - mid["num_input_tokens_seen"]
    return round(seen / (last["elapsed_s"] - mid["elapsed_s"]), 1)


def model_flops(assets: dict[str, str], rows: int, stage: str, folder: Path) -> tuple[float, float]:
    """(the model FLOPs of one trained token, this machine's measured matmul FLOP/s), from `lathe
    plan` on Lathe's config: 2 per matmul weight forward plus attention's 4 x layers x tokens x
    hidden, as much again backward through the activations, and 2 more per trained weight (no
    recompute counted: gradient checkpointing's extra forward is not model FLOPs). The same model
    and data in both tools, so one count serves every run's MFU."""
    cfg = common_keys(assets, folder / "plan-out", rows, stage)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "lathe", "plan", str(path), "--output", str(folder / "plan.json")],
                   check=True, capture_output=True, text=True)
    plan = json.loads((folder / "plan.json").read_text())
    return plan["model_flops_per_token"], plan["device_flops"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=25, help="optimizer steps (rows = steps x 4, one epoch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default=None, help=f"Lathe configurations to run (of {', '.join(LATHE_CONFIGS)})")
    ap.add_argument("--vs-llamafactory", action="store_true", help="Lathe's defaults against LLaMA-Factory's")
    ap.add_argument("--lf-venv", default=str(Path.home() / ".cache" / "lathe-bench" / "llamafactory-venv"))
    ap.add_argument("--stage", choices=("sft", "dpo"), default="sft",
                    help="sft (alpaca rows) or dpo (alpaca-shaped preference pairs)")
    add_output_args(ap, "speed")
    args = ap.parse_args()
    rows = args.steps * 4
    lathe = [sys.executable, "-m", "lathe", "train"]
    plan: dict[str, tuple[list[str], dict]] = {}
    if args.vs_llamafactory:
        cli = llamafactory_venv(Path(args.lf_venv).expanduser())
        plan = {"lathe": (lathe, {}), "llamafactory": ([str(cli), "train"], {"do_train": True}),
                "llamafactory_no_gc": ([str(cli), "train"], {"do_train": True, "disable_gradient_checkpointing": True})}
    names = (args.configs or ("lathe" if args.vs_llamafactory else ",".join(LATHE_CONFIGS))).split(",")
    for name in names:
        if name not in plan:
            plan[name] = (lathe, LATHE_CONFIGS[name])
    order = [n for n in (["lathe_padded"] if not args.vs_llamafactory else []) + list(plan) if n in plan]
    order = list(dict.fromkeys(order))
    with tempfile.TemporaryDirectory(prefix="lathe-speed-") as tmp:
        root = Path(tmp)
        assets = build_assets(root, rows)
        tokens = non_padding_tokens(assets, rows, 4, args.stage)
        flops, device_flops = model_flops(assets, rows, args.stage, root)
        print(f"MFU = tokens/s x {flops / 1e6:,.1f} MFLOP per token / {device_flops / 1e9:,.0f} GFLOP/s "
              "(this machine's matmul rate, measured by lathe plan)", flush=True)
        results: dict[str, list[dict]] = {n: [] for n in order}
        for r in range(args.repeats):
            for name in order:
                command, keys = plan[name]
                cfg = {**common_keys(assets, root / f"{name}-{r}", rows, args.stage), **keys}
                result = run(name, command, cfg, root)
                results[name].append(result)
                steady = f" ({result['steady_tokens_per_s']:,.0f} over the second half)" \
                    if "steady_tokens_per_s" in result else ""
                print(f"{name} #{r + 1}: {tokens / result['train_runtime']:,.0f} tokens/s{steady}, "
                      f"peak {result['peak_rss_mb']:,} MB, last loss {result['last_loss']}", flush=True)
    base = order[0] if not args.vs_llamafactory else "lathe"
    summary = {}
    for name, rs in results.items():
        runtime = statistics.median(x["train_runtime"] for x in rs)
        summary[name] = {"tokens_per_s": round(tokens / runtime, 1), "train_runtime_s": round(runtime, 2),
                         "mfu": round(tokens / runtime * flops / device_flops, 4),
                         "peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in rs)), "runs": rs}
        if all("steady_tokens_per_s" in x for x in rs):
            summary[name]["steady_tokens_per_s"] = statistics.median(x["steady_tokens_per_s"] for x in rs)
    lines = []
    for name in order:
        s = summary[name]
        if args.vs_llamafactory:
            s["lathe_speedup"] = round(summary["lathe"]["tokens_per_s"] / s["tokens_per_s"], 3)
            s["lathe_memory_ratio"] = round(summary["lathe"]["peak_rss_mb"] / s["peak_rss_mb"], 3)
            lines.append(f"{name:>20}: {s['tokens_per_s']:>7,.0f} tokens/s, MFU {s['mfu']:.1%}, "
                         f"peak {s['peak_rss_mb']:>6,} MB"
                         f"  | Lathe: {s['lathe_speedup']:.2f}x the speed, {s['lathe_memory_ratio']:.2f}x the memory")
        else:
            s["speed_vs_" + base] = round(s["tokens_per_s"] / summary[base]["tokens_per_s"], 3)
            s["memory_vs_" + base] = round(s["peak_rss_mb"] / summary[base]["peak_rss_mb"], 3)
            steady = f"; second half {s['steady_tokens_per_s']:,.0f}" if "steady_tokens_per_s" in s else ""
            lines.append(f"{name:>20}: {s['tokens_per_s']:>7,.0f} tokens/s ({s['speed_vs_' + base]:.2f}x{steady}), "
                         f"MFU {s['mfu']:.1%}, "
                         f"peak {s['peak_rss_mb']:,} MB ({s['memory_vs_' + base]:.2f}x)")
    print("\n".join(lines))
    name = "speed_llamafactory" if args.vs_llamafactory else "speed"
    out = output_path(args, name + ("_dpo" if args.stage == "dpo" else ""))
    out.write_text(json.dumps({"command": "python benchmarks/speed_bench.py " + " ".join(sys.argv[1:]),
                               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "rows": rows, "non_padding_tokens": tokens, "repeats": args.repeats,
                               "model_flops_per_token": flops, "device_flops": device_flops,
                               "results": summary}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
