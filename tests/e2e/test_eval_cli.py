"""`lathe eval` end to end: the real CLI, the tiny model, the bundled benchmark."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.conftest import run_cli, write_yaml

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "evaluation" / "lathe_bench"


def _args(tiny_model: Path, tmp_path: Path, **extra) -> dict:
    return {"model_name_or_path": str(tiny_model), "template": "chatml", "cutoff_len": 256,
            "task": "lathe_bench_test", "task_dir": str(REPO / "evaluation"), "n_shot": 3,
            "per_device_eval_batch_size": 8, "save_dir": str(tmp_path / "eval"), **extra}


def test_eval_scores_every_subject_of_the_bundled_benchmark(tiny_model, tmp_path):
    proc = run_cli("eval", str(write_yaml(tmp_path / "cfg.yaml", _args(tiny_model, tmp_path))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {p.name[: -len("_test.csv")]: sum(1 for r in csv.reader(p.open(newline="")) if r)
            for p in (BENCH / "test").glob("*.csv")}
    assert set(results["subjects"]) == set(rows) == {"animals", "arithmetic", "capitals", "colours"}
    for key, r in results["subjects"].items():
        assert r["total"] == rows[key] and 0 <= r["accuracy"] <= 1 and r["correct"] == round(r["accuracy"] * r["total"])
    assert results["average"]["total"] == sum(rows.values())
    assert set(results["categories"]) == {"STEM", "General knowledge"}
    assert (results["task"], results["n_shot"], results["template"], results["adapters"]) == \
        ("lathe_bench_test", 3, "chatml", [])
    assert sum(results["predicted"].values()) == sum(rows.values())
    assert "Average" in proc.stdout and "world capitals" not in proc.stdout and "capitals" in proc.stdout
    # a second run into the same save_dir is refused before the model loads
    again = run_cli("eval", str(tmp_path / "cfg.yaml"))
    assert again.returncode == 2 and again.stderr.strip().startswith("OutputError: save_dir")


def test_a_missing_benchmark_folder_is_one_line(tiny_model, tmp_path):
    cfg = write_yaml(tmp_path / "cfg.yaml", _args(tiny_model, tmp_path, task="mmlu_test"))
    proc = run_cli("eval", str(cfg))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("DataError: task mmlu_test: no benchmark folder") and "holds: lathe_bench" in lines[0]
    assert not (tmp_path / "eval").exists()
