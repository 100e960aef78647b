"""lathe tune: 8 trials of 20 steps on the demo model (examples/tune_lora.yaml, max_steps=20), and how much
of the time is spent outside training (loading the model and the data, evaluating, saving).

    python benchmarks/tune_bench.py              # writes benchmarks/results/local/tune.json
    python benchmarks/tune_bench.py --record     # replaces the recorded results/tune.json

The search starts from an empty data cache (a fresh LATHE_HOME), so the first trial tokenizes
the rows and the others load them: each trial's overhead is its wall time less the Trainer's
own train_runtime (which includes the evaluations during training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    add_output_args(ap, "tune")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LATHE_HOME"] = str(Path(tmp) / "home")  # a cold data cache (the demo model is rebuilt)
        from lathe.api import tune
        from lathe.demo.build import ensure_demo_model

        ensure_demo_model()  # the demo model is built once, not timed as a trial's overhead
        start = time.time()
        report = tune(str(REPO / "examples" / "tune_lora.yaml"),
                      {"output_dir": str(Path(tmp) / "tune"), "dataset_dir": str(REPO / "data"),
                       "n_trials": args.trials, "max_steps": 20})  # the example's 10, doubled
        total = time.time() - start
    trials = [t for t in report["trials"] if t["wall_s"] is not None]
    overheads = [t["wall_s"] - t["train_s"] for t in trials]
    figures = {
        "command": "lathe tune examples/tune_lora.yaml max_steps=20 (8 trials, eval every 5 steps, median pruner)",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "total_s": round(total, 2), **report["time"],
        "trials": [{k: t[k] for k in ("trial", "state", "steps", "wall_s", "train_s", "value")} for t in trials],
        "first_trial_overhead_s": round(overheads[0], 2),
        "later_trials_overhead_median_s": round(statistics.median(overheads[1:]), 2) if len(overheads) > 1 else None,
        "best": report["best"],
    }
    out = output_path(args, "tune")
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "trials"}, indent=2))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
