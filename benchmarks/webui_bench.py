"""lathe webui's cost: page load time, the UI process's memory while a run trains, and what
watching a run through the UI adds to the run's wall time.

    python benchmarks/webui_bench.py              # writes benchmarks/results/local/webui.json (+ webui.png)
    python benchmarks/webui_bench.py --record     # replaces the recorded results/webui.json

The run is a LoRA SFT of the demo model (lathe:demo) on the bundled identity data, `--steps`
optimizer steps. It is trained `--repeats` times each way, alternately: started with `lathe
train` alone, and started from the UI's train form with a headless Chromium (Debian's, through
Playwright) showing the run's page, which polls the UI every second for progress, the loss
curve and the log tail. The wall time of a run is the `train_runtime` its all_results.json
records (the trainer's own clock, from the first step to the last); the medians are compared.
Page load time is the time until the page says it is ready (forms built from /api/meta, the
run list read), median of 5 loads in a fresh browser window each. The UI's memory is its
resident set, sampled every 200 ms while a run trains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def train_keys(steps: int, output_dir: str) -> dict:
    return {"model_name_or_path": "lathe:demo", "dataset": "identity", "dataset_dir": "data",
            "template": "chatml", "max_steps": str(steps), "logging_steps": "5", "output_dir": output_dir,
            "per_device_train_batch_size": "4", "learning_rate": "0.001"}


def runtime(work: Path, output_dir: str) -> float:
    return json.loads((work / output_dir / "all_results.json").read_text())["train_runtime"]


def train_alone(work: Path, steps: int, name: str) -> float:
    keys = [f"{k}={v}" for k, v in train_keys(steps, name).items()]
    subprocess.run([sys.executable, "-m", "lathe", "train", *keys], cwd=work, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return runtime(work, name)


def train_watched(work: Path, url: str, ui_pid: int, browser, steps: int, name: str) -> tuple[float, float]:
    """Start the run from the page's form and keep its page open until it ends; returns its
    train_runtime and the UI's peak memory meanwhile."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(url + "/?lang=en")
    page.wait_for_selector("body[data-ready='1']")
    for key, value in train_keys(steps, name).items():
        page.fill(f"#train-{key}", value)
    peak = [rss_mb(ui_pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(ui_pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    page.click("#train-start")
    page.wait_for_selector("#job-status[data-status='done']", timeout=1_800_000)
    done.set()
    sampler.join()
    context.close()
    return runtime(work, name), peak[0]


def page_loads(browser, url: str, n: int = 5) -> list[float]:
    times = []
    for _ in range(n):
        context = browser.new_context()
        page = context.new_page()
        t0 = time.perf_counter()
        page.goto(url + "/?lang=en")
        page.wait_for_selector("body[data-ready='1']")
        times.append((time.perf_counter() - t0) * 1000)
        context.close()
    return times


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    alone, watched = figures["alone_s"], figures["watched_s"]
    for i, values in enumerate((alone, watched)):
        ax.scatter([i] * len(values), values, color="#1f77b4" if i == 0 else "#d62728", zorder=3)
        ax.bar(i, statistics.median(values), color="#cfd8e3", width=0.5)
    ax.set_xticks([0, 1], ["lathe train alone", "watched in the web UI"])
    ax.set_ylabel("train_runtime (s)")
    ax.set_title(f"UI overhead: {figures['overhead_pct']:+.1f}% (median), UI memory peak "
                 f"{figures['ui_rss_peak_mb']:.0f} MB", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    add_output_args(ap, "webui")
    args = ap.parse_args()
    out = output_path(args, "webui")
    from playwright.sync_api import sync_playwright

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        sys.exit("no Chromium here (apt-get install chromium)")
    work = Path(tempfile.mkdtemp(prefix="webui-bench-"))
    (work / "data").symlink_to(REPO / "data")
    port = free_port()
    log = open(work / "webui.log", "w")
    ui = subprocess.Popen([sys.executable, "-m", "lathe", "webui", f"port={port}"], cwd=work, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/api/jobs", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    subprocess.run([sys.executable, "-m", "lathe", "train", *[f"{k}={v}" for k, v in train_keys(2, "warm").items()]],
                   cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # builds lathe:demo
    home = work / "home"
    home.mkdir()
    alone, watched, peaks = [], [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"],
                                        env={**os.environ, "HOME": str(home)})
            idle = rss_mb(ui.pid)
            loads = page_loads(browser, url)
            for k in range(args.repeats):
                alone.append(train_alone(work, args.steps, f"runs/alone-{k}"))
                t, peak = train_watched(work, url, ui.pid, browser, args.steps, f"runs/watched-{k}")
                watched.append(t)
                peaks.append(peak)
                print(f"repeat {k + 1}: alone {alone[-1]:.2f} s, watched {t:.2f} s, UI peak {peak:.0f} MB", flush=True)
            browser.close()
    finally:
        ui.terminate()
        ui.wait(30)
    overhead = (statistics.median(watched) / statistics.median(alone) - 1) * 100
    figures = {
        "command": f"python benchmarks/webui_bench.py (lathe:demo LoRA SFT, {args.steps} steps, batch 4, "
                   f"{args.repeats} repeats each way, alternately)",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "page_load_ms": [round(t, 1) for t in loads], "page_load_ms_median": round(statistics.median(loads), 1),
        "ui_rss_idle_mb": round(idle, 1), "ui_rss_peak_mb": round(max(peaks), 1),
        "alone_s": alone, "watched_s": watched, "overhead_pct": round(overhead, 2),
        "target": f"the UI adds < 5% to the run's wall time: {'met' if overhead < 5 else 'NOT met'}",
    }
    out.write_text(json.dumps(figures, indent=2) + "\n")
    plot(figures, out.with_suffix(".png"))
    print(f"page load {figures['page_load_ms_median']} ms (median); UI memory {idle:.0f} MB idle, "
          f"{max(peaks):.0f} MB peak while a run trains; overhead {overhead:+.2f}% ({figures['target']})")
    print(f"Wrote {out} and {out.with_suffix('.png')}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
