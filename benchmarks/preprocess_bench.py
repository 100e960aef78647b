"""Pre-processing speed: 50k synthetic alpaca rows and 10k multi-turn sharegpt rows.

    python benchmarks/preprocess_bench.py            # writes benchmarks/results/local/preprocess.json
    python benchmarks/preprocess_bench.py --record   # replaces the recorded results/preprocess.json

Measures the whole data path a training run takes (read files -> convert -> template ->
tokenize -> filter -> split), first with an empty cache, then again (cache hit), on the
demo model's byte-level BPE tokenizer. Target: 50k alpaca rows in under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from _output import add_output_args, output_path  # benchmarks/ is on sys.path when run as a script


def synth(d: Path, seed: int = 0) -> None:
    from lathe.demo.build import DATA_DIR

    rng = random.Random(seed)
    words = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").split()

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    with open(d / "alpaca.jsonl", "w", encoding="utf-8") as f:
        for _ in range(50_000):
            f.write(json.dumps({"instruction": text(5, 40), "input": text(0, 20), "output": text(10, 120)}) + "\n")
    with open(d / "sharegpt.jsonl", "w", encoding="utf-8") as f:
        for _ in range(10_000):
            turns = []
            for _ in range(rng.randint(2, 5)):
                turns += [{"from": "human", "value": text(5, 40)}, {"from": "gpt", "value": text(10, 100)}]
            f.write(json.dumps({"conversations": turns}) + "\n")
    info = {"alpaca50k": {"file_name": "alpaca.jsonl"},
            "sharegpt10k": {"file_name": "sharegpt.jsonl", "formatting": "sharegpt"}}
    (d / "dataset_info.json").write_text(json.dumps(info))


def run(dataset: str, d: Path, workers: int | None, overwrite: bool) -> tuple[float, int]:
    from transformers import AutoTokenizer

    from lathe.config import load_config
    from lathe.data.loader import load_tokenized
    from lathe.data.templates import get_template
    from lathe.demo.build import ensure_demo_model

    cfg = load_config({"model_name_or_path": "x", "output_dir": "o", "dataset": dataset,
                       "dataset_dir": str(d), "template": "chatml", "cutoff_len": 1024,
                       "preprocessing_num_workers": workers, "overwrite_cache": overwrite})
    tok = AutoTokenizer.from_pretrained(ensure_demo_model())
    start = time.perf_counter()
    split = load_tokenized(cfg.data, tok, get_template("chatml"), seed=0, kind="sft")
    return time.perf_counter() - start, len(split.train)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(ap, "preprocess")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["LATHE_HOME"] = tempfile.mkdtemp(prefix="lathe-bench-")
    d = Path(tempfile.mkdtemp(prefix="lathe-bench-data-"))
    synth(d)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "command": "python benchmarks/preprocess_bench.py", "runs": []}
    for dataset in ("alpaca50k", "sharegpt10k"):
        for workers in (None, 2):
            seconds, n = run(dataset, d, workers, overwrite=True)
            results["runs"].append({"dataset": dataset, "workers": workers or 1, "cache": "cold",
                                    "seconds": round(seconds, 2), "rows": n,
                                    "rows_per_s": round(n / seconds)})
            print(results["runs"][-1], flush=True)
        seconds, n = run(dataset, d, None, overwrite=False)
        results["runs"].append({"dataset": dataset, "workers": 1, "cache": "hit",
                                "seconds": round(seconds, 2), "rows": n, "rows_per_s": round(n / seconds)})
        print(results["runs"][-1], flush=True)
    out = output_path(args, "preprocess")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
