"""Examples/s of predict_with_generate-style generation: batch 1 vs batch 16, on CPU.

    python benchmarks/predict_bench.py                 # writes benchmarks/results/local/predict.json
    python benchmarks/predict_bench.py --record        # replaces the recorded results/predict.json
    python benchmarks/predict_bench.py --threads 2     # torch threads (default 1, see below)

The demo-sized model (lathe.demo.build's TinySpec: Llama, hidden 128, 4 layers, vocab
2048), fp32, untrained, so every reply runs to max_new_tokens (the same work at each
batch size). 64 prompts from the bundled identity data with the chatml template, greedy,
max_new_tokens 32, through `lathe.infer.generate_replies` (left padding, one `generate`
call per batch, prompts sorted by length). Each batch size is timed `--repeats` times
after a warm-up; the best time counts. The replies of both batch sizes are compared
token for token.

Threads default to 1: on a shared 2-core machine two OpenMP threads spin-wait on each
other whenever another process holds a core, which makes tiny-model timings swing ~100x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]



def other_processes() -> list[str]:
    """Other processes using CPU right now (the machine is shared)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    busy = []
    for line in out:
        pid, cpu, cmd = line.split(None, 2)
        if int(pid) != os.getpid() and float(cpu) >= 10.0:
            busy.append(f"{cpu}% {cmd[:90]}")
    return busy[:8]


def prompts(tokenizer, n: int) -> list[list[int]]:
    from lathe.data.templates import get_template
    from lathe.demo.build import DATA_DIR

    rows = json.loads((DATA_DIR / "identity.json").read_text(encoding="utf-8"))
    template = get_template("chatml")
    return [template.encode_prompt([], rows[i % len(rows)]["instruction"], tokenizer) for i in range(n)]


def timed(fn, repeats: int) -> tuple[float, list, list[float]]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    add_output_args(ap, "predict")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lathe.config.schema import GenerateConfig
    from lathe.demo.build import TinySpec, build_tiny_model
    from lathe.infer import generate_replies

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    busy_before = other_processes()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "model", TinySpec())
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    data = prompts(tokenizer, args.prompts)
    gen = GenerateConfig(max_new_tokens=args.max_new_tokens, do_sample=False)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def run(batch: int) -> list[list[int]]:
        return generate_replies(model, tokenizer, data, gen, stops, batch_size=batch, progress=False)

    run(args.batch)  # warm-up
    figures = {}
    outputs = {}
    for batch in (1, args.batch):
        best, outputs[batch], times = timed(lambda b=batch: run(b), args.repeats)
        figures[f"batch_{batch}"] = {"best_s": round(best, 3), "all_s": [round(t, 3) for t in times],
                                     "examples_per_s": round(len(data) / best, 2),
                                     "new_tokens_per_s": round(sum(map(len, outputs[batch])) / best, 1)}
        print(f"batch {batch:3}: {best:7.2f} s  {len(data) / best:8.2f} examples/s", flush=True)
    speedup = round(figures["batch_1"]["best_s"] / figures[f"batch_{args.batch}"]["best_s"], 2)
    identical = outputs[1] == outputs[args.batch]
    print(f"speed-up batch {args.batch} over batch 1: {speedup}x; identical replies: {identical}")

    busy_after = other_processes()
    result = {
        "command": " ".join(["python benchmarks/predict_bench.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)",
        "model": f"demo-sized Llama (hidden 128, 4 layers, vocab 2048, "
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), fp32, untrained",
        "prompts": len(data), "prompt_tokens_mean": round(sum(map(len, data)) / len(data), 1),
        "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
        "reply_tokens_mean": round(sum(map(len, outputs[1])) / len(data), 1),
        **figures,
        "speedup": speedup,
        "identical_replies_batch_1_vs_batch": identical,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "other_processes": {"before": busy_before, "after": busy_after,
                            "note": "the machine was shared: other processes were running"
                            if busy_before or busy_after else "no other busy process seen"},
    }
    out = output_path(args, "predict")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
