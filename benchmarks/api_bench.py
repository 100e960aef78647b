"""lathe api under load: requests/s, generated tokens/s, time to first token and the server's
memory at concurrency 1, 8 and 32, with dynamic batching on (max_batch_size=32) and off (1).

    python benchmarks/api_bench.py              # writes benchmarks/results/local/api.json (+ api.png)
    python benchmarks/api_bench.py --record     # replaces the recorded results/api.json

The served model is the demo model (lathe:demo, a 4-layer Llama). Each request is a streamed
chat completion through the official openai client with max_tokens fixed and the stop tokens
left to the model, so the token counts are the usage the server reports. At each concurrency
that many clients send requests back to back until `--requests-per-client` each are done; the
clock runs from the first request to the last answer. Time to first token is measured by
the client (the first chunk with text). Memory is the server's resident set, sampled every
50 ms during the load (peak) and before it (idle).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script
from _procs import free_port, rss_mb

QUESTIONS = ["Who are you?", "What can you do?", "Tell me about Lathe.", "What is fine-tuning?",
             "How do I train a model?", "What is LoRA?", "Say something nice.", "What is your name?"]


def start_server(batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lathe", "api", "model_name_or_path=lathe:demo",
                             "template=chatml", f"port={port}", f"max_batch_size={batch}", "max_queue=1024"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"lathe api exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("lathe api did not come up")


def load(url: str, pid: int, concurrency: int, per_client: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    ttft: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    peak = [rss_mb(pid)]
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.05)

    def one(k: int) -> None:
        for i in range(per_client):
            question = QUESTIONS[(k + i) % len(QUESTIONS)]
            try:
                sent = time.perf_counter()
                first = None
                stream = client.chat.completions.create(
                    model="lathe", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                    stream=True, stream_options={"include_usage": True})
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - sent
                    if chunk.usage:
                        tokens.append(chunk.usage.completion_tokens)
                ttft.append(first if first is not None else time.perf_counter() - sent)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [threading.Thread(target=one, args=(k,)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    wall = time.perf_counter() - start
    running.clear()
    ttft.sort()
    return {"concurrency": concurrency, "requests": len(tokens), "errors": len(errors), "wall_s": round(wall, 3),
            "requests_per_s": round(len(tokens) / wall, 2), "tokens_per_s": round(sum(tokens) / wall, 1),
            "generated_tokens": sum(tokens),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1) if ttft else None,
            "ttft_p95_ms": round(1000 * ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 1) if ttft else None,
            "peak_rss_mb": round(peak[0], 1)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r["concurrency"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    for k, (batching, label) in enumerate(((True, "dynamic batching"), (False, "one at a time"))):
        values = [next(r["tokens_per_s"] for r in rows if r["batching"] == batching and r["concurrency"] == c)
                  for c in levels]
        ax.bar([i + (k - 0.5) * width for i in range(len(levels))], values, width, label=label)
    ax.set_xticks(range(len(levels)), [f"{c} clients" for c in levels])
    ax.set_ylabel("generated tokens/s")
    ax.set_title("lathe api on the demo model (streamed chat)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    add_output_args(ap, "api")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    out = output_path(args, "api")
    rows = []
    for batching in (True, False):
        logs = Path(__file__).resolve().parent / "results" / "local"
        logs.mkdir(parents=True, exist_ok=True)
        proc, url = start_server(32 if batching else 1, logs / f"api-server-{'on' if batching else 'off'}.log")
        try:
            idle = rss_mb(proc.pid)
            load(url, proc.pid, 1, 2, args.max_tokens)  # warm-up
            for c in levels:
                row = {"batching": batching, **load(url, proc.pid, c, args.requests_per_client, args.max_tokens),
                       "idle_rss_mb": round(idle, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    top = max(levels)
    on = next(r for r in rows if r["batching"] and r["concurrency"] == top)
    off = next(r for r in rows if not r["batching"] and r["concurrency"] == top)
    speedup = on["tokens_per_s"] / off["tokens_per_s"]
    figures = {
        "command": f"python benchmarks/api_bench.py (lathe:demo, streamed chat, max_tokens {args.max_tokens}, "
                   f"{args.requests_per_client} requests per client)",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "rows": rows,
        f"batching_speedup_at_{top}": round(speedup, 2),
        "target": f">= 3x tokens/s with batching at concurrency {top}: {'met' if speedup >= 3 else 'NOT met'}",
        "errors": sum(r["errors"] for r in rows),
    }
    out.write_text(json.dumps(figures, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"batching speedup at {top} clients: {speedup:.2f}x ({figures['target']})")
    print(f"Wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
