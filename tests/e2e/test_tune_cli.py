"""lathe tune through the real CLI: an Optuna study of real training runs, stored in SQLite,
pruned, resumed after a kill, its winner trained as a plain run; and its bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, one_error, run_cli, run_main, write_yaml

SPACE = {"learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
         "lora_rank": {"type": "categorical", "values": [4, 8]}}


def _config(base_args: dict, tmp_path: Path, **keys) -> Path:
    args = {**base_args, "val_size": 8, "max_steps": 4, "eval_strategy": "steps", "eval_steps": 2,
            "save_strategy": "no", "search_space": SPACE, "n_trials": 4, "output_dir": str(tmp_path / "tune"), **keys}
    return write_yaml(tmp_path / "tune.yaml", args)


def test_a_study_keeps_the_best_weights_and_its_winner_trains_as_a_plain_run(base_args, tmp_path):
    cfg = _config(base_args, tmp_path)
    out = tmp_path / "tune"
    r = run_cli("tune", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "tune_results.json").read_text())
    assert report["metric"] == "eval_loss" and report["direction"] == "minimize"
    assert len(report["trials"]) == 4 and {t["state"] for t in report["trials"]} <= {"complete", "pruned"}
    complete = [t for t in report["trials"] if t["state"] == "complete"]
    assert report["best"]["value"] == min(t["value"] for t in complete)
    for t in report["trials"]:
        assert 1e-4 <= t["params"]["learning_rate"] <= 1e-2 and t["params"]["lora_rank"] in (4, 8)
        recorded = (out / "trials" / f"trial-{t['trial']:03d}" / "config.yaml").read_text()
        assert f"lora_rank: {t['params']['lora_rank']}" in recorded  # each trial ran its own values
    with_weights = sorted(p.parent.name for p in out.glob("trials/*/adapter_model.safetensors"))
    assert with_weights == [f"trial-{report['best']['trial']:03d}"]  # keep_best: 1
    assert report["time"]["training_s"] < report["time"]["trials_wall_s"]
    assert (out / "study.db").stat().st_size > 0
    for png in ("optimization_history.png", "param_importances.png"):
        assert (out / png).stat().st_size > 5000
    assert "<- best" in r.stdout

    best = out / "best" / "config.yaml"
    assert "search_space" not in best.read_text()
    r = run_cli("train", str(best))
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((out / "best" / "run" / "eval_results.json").read_text())["eval_loss"]
    assert again == pytest.approx(report["best"]["value"], rel=1e-4)  # the same seed, values and data

    # grid: every combination once, then the study stops by itself
    grid = tmp_path / "grid"
    r = run_cli("tune", str(cfg), f"output_dir={grid}", "sampler=grid", "n_trials=10", "pruner=none",
                "search_space={lora_rank: {type: categorical, values: [4, 8]}}")
    assert r.returncode == 0, r.stderr[-2000:]
    trials = json.loads((grid / "tune_results.json").read_text())["trials"]
    assert sorted(t["params"]["lora_rank"] for t in trials) == [4, 8]


def test_a_killed_search_resumes_without_repeating_finished_trials(base_args, tmp_path):
    cfg = _config(base_args, tmp_path, n_trials=3, pruner="none")
    out = tmp_path / "tune"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "lathe", "tune", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "trials" / "trial-001" / "config.yaml").is_file():  # trial 1 has started
            assert proc.poll() is None and time.time() < deadline, "the study ended before trial 1 started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    r = run_cli("tune", str(cfg))  # the same folder without resume: refused, nothing touched
    assert "already holds a study (study.db); resume=true continues it" in one_error(r)
    r = run_cli("tune", str(cfg), "resume=true")
    assert r.returncode == 0, r.stderr[-2000:]
    said = r.stdout + r.stderr
    assert "1 trials finished; 2 to go" in said and "trial 1 was interrupted" in said
    assert "trial 0:" not in said  # trial 0 finished before the kill: not run again
    trials = json.loads((out / "tune_results.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["complete", "fail", "complete", "complete"]
    assert trials[2]["params"] == trials[1]["params"]  # the interrupted values, run again

    # the study remembers its search space: another one is refused rather than mixed in
    r = run_cli("tune", str(cfg), "resume=true", "n_trials=5",
                "search_space={lora_rank: {type: categorical, values: [4, 16]}}")
    assert "holds a study with another search space (learning_rate:" in one_error(r)


def test_bad_search_spaces_are_one_line_before_anything_is_written(base_args, tmp_path):
    """The first case as a real process, the others through the CLI's main() in this one."""
    cfg = _config(base_args, tmp_path)
    out = tmp_path / "tune"

    def refused(*argv: str) -> str:
        return one_error(run_main("tune", str(cfg), *argv))

    assert "search_space.learnin_rate: learnin_rate is not a config key (did you mean learning_rate" in one_error(
        run_cli("tune", str(cfg), "search_space={learnin_rate: {type: uniform, low: 0.1, high: 0.2}}"))
    assert "search_space.learning_rate: low 0.01 is above high 0.001" in refused(
        "search_space={learning_rate: {type: loguniform, low: 0.01, high: 0.001}}")
    assert "search_space.lora_rank: the value 'big' does not fit" in refused(
        "search_space={lora_rank: {type: categorical, values: [4, big]}}")
    assert "type 'normal' is not one of" in refused("search_space={lora_dropout: {type: normal, low: 0, high: 1}}")
    assert "sampler grid needs the values to try" in refused("sampler=grid")
    assert "lathe tune needs a search_space" in refused("search_space=null")
    assert "compares trials on a validation metric: set val_size" in refused("val_size=0", "eval_strategy=no")
    assert "resume=true, but" in refused("resume=true")
    assert not out.exists()
