"""lathe webui's cost: page load time, the UI process's memory while a run trains, and what
watching a run through the UI adds to the run's wall time.

    python benchmarks/webui_bench.py              # writes benchmarks/results/local/webui.json (+ webui.png)
    python benchmarks/webui_bench.py --record     # replaces the recorded results/webui.json

The run is a LoRA SFT of the demo model (lathe:demo) on the bundled identity data, `--steps`
optimizer steps. It is trained `--repeats` times each of three ways, in turn: started with
`lathe train` alone; started through the UI (POST /api/jobs) and watched by a client that asks
what the page asks (the run's progress, curves and log tail every second, the run list every
5 s), which measures what the UI process costs a run; and started from the page's train form
in a headless Chromium (Debian's, through Playwright) showing the run. The browser normally
runs on the user's own computer; here it shares the run's 2 cores, so the third figure also
holds what Chromium itself costs. Wall times on a shared 2-core machine drift by 10-20% from
run to run, so the UI process's own CPU seconds while it runs and reports a run are counted
too, against the CPU seconds of a run alone. The wall time of a run is the `train_runtime` its
all_results.json records (the trainer's own clock, from the first step to the last). Each
repeat runs the three ways back to back, in an order that rotates, and an overhead is the
median over repeats of the ratio to that repeat's run alone (the drift of a shared machine
cancels better than in a ratio of medians).
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script
from _procs import free_port, rss_mb

REPO = Path(__file__).resolve().parents[1]
RUN_CPU: list[float] = []  # CPU seconds of each `lathe train` run alone (the whole process)
UI_CPU: list[float] = []  # CPU seconds the UI process used while it ran and reported a run


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_keys(steps: int, output_dir: str) -> dict:
    return {"model_name_or_path": "lathe:demo", "dataset": "identity", "dataset_dir": "data",
            "template": "chatml", "max_steps": str(steps), "logging_steps": "5", "output_dir": output_dir,
            "per_device_train_batch_size": "4", "learning_rate": "0.001"}


def runtime(work: Path, output_dir: str) -> float:
    return json.loads((work / output_dir / "all_results.json").read_text())["train_runtime"]


def train_alone(work: Path, steps: int, name: str) -> float:
    keys = [f"{k}={v}" for k, v in train_keys(steps, name).items()]
    before = children_cpu_s()
    subprocess.run([sys.executable, "-m", "lathe", "train", *keys], cwd=work, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    RUN_CPU.append(children_cpu_s() - before)
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


def train_polled(work: Path, url: str, ui_pid: int, steps: int, name: str) -> tuple[float, float]:
    """Start the run through the UI's API and ask what the page asks until it ends."""
    import urllib.request

    body = json.dumps({"form": "train", "values": train_keys(steps, name)}).encode()
    req = urllib.request.Request(url + "/api/jobs", body, {"Content-Type": "application/json"})
    job = json.loads(urllib.request.urlopen(req, timeout=300).read())
    assert job["ok"], job
    peak, k, cpu0 = rss_mb(ui_pid), 0, cpu_s(ui_pid)
    while True:
        detail = json.loads(urllib.request.urlopen(f"{url}/api/jobs/{job['job']['id']}", timeout=60).read())
        if k % 5 == 0:
            urllib.request.urlopen(url + "/api/jobs", timeout=60).read()
        peak = max(peak, rss_mb(ui_pid))
        if detail["status"] != "running":
            break
        k += 1
        time.sleep(1)
    assert detail["status"] == "done", detail["log"]
    UI_CPU.append(cpu_s(ui_pid) - cpu0)
    return runtime(work, name), peak


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

    fig, ax = plt.subplots(figsize=(7, 3.4))
    ways = [("lathe train\nalone", figures["alone_s"]), ("through the UI\n(page's polling)", figures["through_ui_s"]),
            ("+ Chromium on\nthe same 2 cores", figures["with_browser_s"])]
    for i, (_, values) in enumerate(ways):
        ax.bar(i, statistics.median(values), color="#cfd8e3", width=0.5)
        ax.scatter([i] * len(values), values, color="#1f3a5f", zorder=3)
    ax.set_xticks(range(len(ways)), [w for w, _ in ways])
    ax.set_ylabel("train_runtime (s)")
    ax.set_title(f"UI overhead {figures['overhead_pct']:+.1f}% (median); UI memory peak "
                 f"{figures['ui_rss_peak_mb']:.0f} MB; page load {figures['page_load_ms_median']:.0f} ms", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=6)
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
    peaks: list[float] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"],
                                        env={**os.environ, "HOME": str(home)})
            idle = rss_mb(ui.pid)
            loads = page_loads(browser, url)
            ways = {"alone": lambda k: train_alone(work, args.steps, f"runs/alone-{k}"),
                    "ui": lambda k: train_polled(work, url, ui.pid, args.steps, f"runs/polled-{k}"),
                    "browser": lambda k: train_watched(work, url, ui.pid, browser, args.steps, f"runs/watched-{k}")}
            times: dict[str, list[float]] = {w: [] for w in ways}
            for k in range(args.repeats):
                order = list(ways)[k % 3:] + list(ways)[:k % 3]  # each way first, second and third in turn
                for way in order:
                    got = ways[way](k)
                    if isinstance(got, tuple):
                        got, peak = got
                        peaks.append(peak)
                    times[way].append(got)
                print(f"repeat {k + 1} ({' -> '.join(order)}): alone {times['alone'][-1]:.2f} s, through the UI "
                      f"{times['ui'][-1]:.2f} s, with Chromium on the same cores {times['browser'][-1]:.2f} s, "
                      f"UI peak {max(peaks):.0f} MB", flush=True)
            alone, polled, watched = times["alone"], times["ui"], times["browser"]
            browser.close()
    finally:
        ui.terminate()
        ui.wait(30)
    # each repeat's runs ran back to back: the median of the per-repeat ratios cancels the drift of a
    # shared machine better than a ratio of medians
    overhead = (statistics.median(p / a for p, a in zip(polled, alone)) - 1) * 100
    with_browser = (statistics.median(w / a for w, a in zip(watched, alone)) - 1) * 100
    ui_cpu_share = statistics.median(UI_CPU) / statistics.median(RUN_CPU) * 100
    figures = {
        "command": f"python benchmarks/webui_bench.py --steps {args.steps} --repeats {args.repeats} (lathe:demo "
                   f"LoRA SFT, batch 4; each way in turn)",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "page_load_ms": [round(t, 1) for t in loads], "page_load_ms_median": round(statistics.median(loads), 1),
        "ui_rss_idle_mb": round(idle, 1), "ui_rss_peak_mb": round(max(peaks), 1),
        "alone_s": alone, "through_ui_s": polled, "with_browser_s": watched,
        "run_cpu_s": [round(x, 2) for x in RUN_CPU], "ui_cpu_s_per_run": [round(x, 3) for x in UI_CPU],
        "ui_cpu_pct_of_run": round(ui_cpu_share, 2),
        "overhead_pct": round(overhead, 2), "overhead_with_browser_on_the_same_cores_pct": round(with_browser, 2),
        "target": f"the UI adds < 5% to the run's wall time: {'met' if overhead < 5 else 'NOT met'} by the wall "
                  f"clock; the UI process used {ui_cpu_share:.2f}% of the CPU time of a run",
    }
    out.write_text(json.dumps(figures, indent=2) + "\n")
    plot(figures, out.with_suffix(".png"))
    print(f"the UI process used {statistics.median(UI_CPU):.2f} CPU s per run, {ui_cpu_share:.2f}% of a run's "
          f"{statistics.median(RUN_CPU):.1f} CPU s")
    print(f"page load {figures['page_load_ms_median']} ms (median); UI memory {idle:.0f} MB idle, "
          f"{max(peaks):.0f} MB peak while a run trains; the UI's overhead {overhead:+.2f}% ({figures['target']}); "
          f"with Chromium on the same cores {with_browser:+.2f}%")
    print(f"Wrote {out} and {out.with_suffix('.png')}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
