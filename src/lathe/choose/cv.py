"""`lathe cv cfg.yaml folds=5`: k-fold cross-validation with the config's own training run.

Every row of `dataset` but the test split (test_size) is dealt into `folds` folds
(lathe.data.splits: seeded; stratified for single-label classifiers unless stratify: false);
run k trains on the other folds and validates on fold k, in output_dir/fold-k, a run
directory like any other (`lathe train cfg.yaml folds=5 fold=3` makes the same one). The
tokenized rows are cached once and every fold takes its rows from the cache.

Then the summary (cv_results.json, a table on screen, cv_results.png): each validation metric
per fold, its mean and standard deviation (n - 1). cv_retrain: true trains once more on every
row but the test split (output_dir/full), and evaluates the test set there, once.

A cross-validation that stopped part way continues: folds whose run directory is complete
(and was made by the same config) are kept, an unfinished one is run again. Folds run one
after the other in this process, or `cv_parallel` at a time in processes of their own (each
with its share of the CPU threads; their output goes to output_dir/fold-k.log).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lathe.config.load import load_config, parse_overrides, save_config, to_flat_dict
from lathe.config.schema import LatheConfig
from lathe.errors import ConfigError, OutputError
from lathe.recipes.common import log
from lathe.runs import read_run_config, run_state

RESULTS = "cv_results.json"
CHART = "cv_results.png"
# Keys a run adds to its config.yaml from what it found (the label set, the pooling): not a
# difference between two configs.
_RECORDED = {"label_names", "problem_type", "num_labels", "pooling", "overwrite_output_dir",
             "resume_from_checkpoint"}
# Keys a run decides when they are unset (lathe.plan.decide_checkpointing) and records as decided: a
# difference only where this config sets them.
_DECIDED = {"gradient_checkpointing"}
_PLUMBING = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def run_cv(config: str | os.PathLike | Mapping[str, Any] | None,
           overrides: list[str] | Mapping[str, Any] | None = None) -> dict[str, Any]:
    extra = parse_overrides(overrides)
    cfg = load_config(config, extra)
    d = cfg.data
    if d.folds < 2:
        raise ConfigError(f"lathe cv needs folds: set folds=5 (or 10; at least 2), not {d.folds}")
    if d.fold is not None:
        raise ConfigError(f"lathe cv runs every fold; fold={d.fold} is for lathe train (one fold); remove it")
    out = Path(cfg.train.output_dir)
    folds = [_fold_config(config, extra, cfg, k) for k in range(1, d.folds + 1)]
    _check_folder(out, folds, cfg)
    todo = []
    for f in folds:
        if _finished(f) and not cfg.train.overwrite_output_dir:
            log(f"fold {f.data.fold}: {f.train.output_dir} is complete, kept")
        elif run_state(f.train.output_dir) in ("absent", "empty"):
            todo.append(f)
        else:  # unfinished (a crash, a stop): this fold runs again from its start
            todo.append(_fold_config(config, {**extra, "overwrite_output_dir": True}, cfg, f.data.fold))
    if cfg.selection.cv_parallel > 1 and len(todo) > 1:
        _run_parallel(todo, cfg.selection.cv_parallel, out)
    else:
        from lathe.api import train

        for f in todo:
            log(f"fold {f.data.fold} of {d.folds} -> {f.train.output_dir}")
            train(config, _fold_keys(extra, f.train.overwrite_output_dir, cfg, f.data.fold))
    summary = summarize([Path(f.train.output_dir) for f in folds])
    summary.update(folds=d.folds, stratify=d.stratify, seed=cfg.train.seed)
    if cfg.selection.cv_retrain:
        summary["full"] = _retrain(config, extra, cfg)
    (out / RESULTS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print_table(summary)
    chart(summary, out / CHART)
    log(f"Saved {out / RESULTS} and {out / CHART}")
    return summary


def _fold_keys(extra: dict[str, Any], overwrite: bool, cfg: LatheConfig, k: int) -> dict[str, Any]:
    keys = {**extra, "fold": k, "output_dir": str(Path(cfg.train.output_dir) / f"fold-{k}")}
    if overwrite:
        keys["overwrite_output_dir"] = True
    return keys


def _fold_config(config: Any, extra: dict[str, Any], cfg: LatheConfig, k: int) -> LatheConfig:
    return load_config(config, _fold_keys(extra, bool(extra.get("overwrite_output_dir")), cfg, k))


def _retrain(config: Any, extra: dict[str, Any], cfg: LatheConfig) -> dict[str, Any]:
    """Every row but the test split, once more: the model to keep (and the test set's one pass)."""
    from lathe.api import train

    out = Path(cfg.train.output_dir) / "full"
    keys = {**extra, "folds": 0, "output_dir": str(out)}
    if run_state(out) == "complete":
        log(f"retrain: {out} is complete, kept")
    else:
        log(f"retrain on every row but the test split -> {out}")
        if run_state(out) not in ("absent", "empty"):
            keys["overwrite_output_dir"] = True  # an unfinished retrain of this cross-validation
        train(config, keys)
    results = json.loads((out / "all_results.json").read_text())
    return {"output_dir": str(out), "test": {k: v for k, v in results.items() if k.startswith("test_")
                                             and not k.endswith(_PLUMBING)}}


def _finished(f: LatheConfig) -> bool:
    return run_state(f.train.output_dir) == "complete"


def _check_folder(out: Path, folds: list[LatheConfig], cfg: LatheConfig) -> None:
    """output_dir is new, or holds this cross-validation's own folders (a continuation): a
    folder of other files, or a finished fold of another config, is never written over."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} is a file; choose a folder path")
    if not out.is_dir():
        return
    ours = {f"fold-{k}" for k in range(1, len(folds) + 1)} | {f"fold-{k}.log" for k in range(1, len(folds) + 1)}
    ours |= {"full", RESULTS, CHART}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if others:
        raise OutputError(f"output_dir {out} already holds files that are not this cross-validation's "
                          f"({', '.join(others[:4])}); choose a new output_dir")
    if cfg.train.overwrite_output_dir:
        return
    for f in folds:
        if _finished(f):
            recorded = read_run_config(f.train.output_dir)
            ours_now = to_flat_dict(f)
            changed = [k for k, v in ours_now.items()
                       if k in recorded and k not in _RECORDED and not (k in _DECIDED and v is None)
                       and _plain(recorded[k]) != _plain(v)]
            if changed:
                k = changed[0]
                raise OutputError(
                    f"{f.train.output_dir} holds a finished fold of another config ({k}: {recorded[k]!r} there, "
                    f"{ours_now[k]!r} now); choose a new output_dir, or overwrite_output_dir=true to run every "
                    "fold again")


def _plain(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=str)


def _run_parallel(todo: list[LatheConfig], width: int, out: Path) -> None:
    """`width` folds at a time, each `lathe train` in its own process with cores // width threads."""
    threads = max(1, (os.cpu_count() or 1) // width)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    out.mkdir(parents=True, exist_ok=True)  # the logs go beside the folds
    with tempfile.TemporaryDirectory() as tmp:
        waiting = list(todo)
        running: list[tuple[LatheConfig, subprocess.Popen, Any]] = []
        failed: list[str] = []
        while waiting or running:
            while waiting and len(running) < width:
                f = waiting.pop(0)
                path = Path(tmp) / f"fold-{f.data.fold}.yaml"
                save_config(f, path)
                logfile = open(out / f"fold-{f.data.fold}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed below
                log(f"fold {f.data.fold}: started in a process of its own ({threads} threads; "
                    f"log: {out / f'fold-{f.data.fold}.log'})")
                proc = subprocess.Popen([sys.executable, "-m", "lathe", "train", str(path)], stdout=logfile,
                                        stderr=subprocess.STDOUT, env=env)
                running.append((f, proc, logfile))
            f, proc, logfile = running.pop(0)
            proc.wait()
            logfile.close()
            if proc.returncode != 0:
                failed.append(f"fold {f.data.fold} (exit {proc.returncode}, see {out / f'fold-{f.data.fold}.log'})")
            else:
                log(f"fold {f.data.fold}: done")
        if failed:
            raise OutputError("cross-validation stopped: " + "; ".join(failed) + "; fix it and run lathe cv "
                              "again (finished folds are kept)")


# --- the summary ---------------------------------------------------------------------------

def summarize(runs: list[Path]) -> dict[str, Any]:
    """Each validation metric per fold (eval_results.json), with its mean and standard deviation."""
    per_fold = []
    for run in runs:
        results = json.loads((run / "eval_results.json").read_text())
        per_fold.append({k.removeprefix("eval_"): float(v) for k, v in results.items()
                         if k.startswith("eval_") and not k.endswith(_PLUMBING) and isinstance(v, (int, float))})
    names = [k for k in per_fold[0] if all(k in f for f in per_fold)]
    metrics = {}
    for name in names:
        values = [f[name] for f in per_fold]
        metrics[name] = {"per_fold": values, "mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return {"runs": [str(r) for r in runs], "metrics": metrics}


def print_table(summary: dict[str, Any]) -> None:
    metrics = summary["metrics"]
    k = len(summary["runs"])
    print(f"{'metric':<22}" + "".join(f"{'fold ' + str(i):>11}" for i in range(1, k + 1)) + f"{'mean +- std':>22}")
    for name, m in metrics.items():
        print(f"{name:<22}" + "".join(f"{v:>11.4f}" for v in m["per_fold"])
              + f"{m['mean']:>13.4f} +- {m['std']:.4f}")
    full = summary.get("full")
    if full and full["test"]:
        shown = ", ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in full["test"].items()
                          if isinstance(v, float))
        print(f"retrained on every fold ({full['output_dir']}): test {shown}")


def chart(summary: dict[str, Any], path: Path) -> None:
    """One panel per metric (at most four, loss first): a bar per fold, the mean as a line and
    one standard deviation either side shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["metrics"])[:4]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], names):
        m = summary["metrics"][name]
        xs = range(1, len(m["per_fold"]) + 1)
        ax.bar(xs, m["per_fold"], color="#1f77b4")
        ax.axhline(m["mean"], color="#d62728", lw=1.5, label=f"mean {m['mean']:.4g}")
        ax.axhspan(m["mean"] - m["std"], m["mean"] + m["std"], color="#d62728", alpha=0.12,
                   label=f"+- std {m['std']:.2g}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("fold")
        ax.set_xticks(list(xs))
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{len(summary['runs'])}-fold cross-validation", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
