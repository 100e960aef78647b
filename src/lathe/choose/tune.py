"""`lathe tune cfg.yaml`: hyperparameter search on Optuna over the config's own training run.

The config names its `search_space` (any config key: a TrainingArguments field, a LoRA
rank ...), `n_trials`, an optional `tune_timeout` (seconds), the `sampler` (tpe, random,
grid) and the `pruner` (median: a trial whose validation metric at an evaluation is worse
than the median of earlier trials at the same step stops there). Each trial is a run
directory, output_dir/trials/trial-NNN, trained through lathe.train in this process; the
tokenized rows are cached, so trials after the first only load them.

The study lives in output_dir/study.db (SQLite, Optuna's RDB storage): `resume=true`
continues it after a crash or a stop, without repeating finished or pruned trials (a trial
that was running when it stopped is run again with the same values). A study made with another
search space, metric or base config is refused, not mixed.

Weights are kept for the `keep_best` best trials only (the others keep their config,
metrics and logs). The report: tune_results.json (every trial: values, state, metric, wall
and training seconds), a table on screen, optimization_history.png,
param_importances.png, and best/config.yaml: the best trial's config, which `lathe train
best/config.yaml` runs as a plain run (into best/run).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lathe.config.load import load_config, parse_overrides, read_config_file
from lathe.config.schema import LatheConfig
from lathe.errors import ConfigError, LatheError, OutputError, did_you_mean
from lathe.recipes.common import extra_callbacks, log
from lathe.runs import WEIGHT_FILES

STUDY = "study.db"
RESULTS = "tune_results.json"
HISTORY = "optimization_history.png"
IMPORTANCE = "param_importances.png"
TYPES = ("loguniform", "uniform", "float", "int", "categorical")
# The keys that steer the search itself: not part of a trial's config, nor of best/config.yaml.
TUNE_KEYS = ("search_space", "n_trials", "tune_timeout", "sampler", "pruner", "tune_metric", "tune_direction",
             "keep_best", "resume")
_LOWER_IS_BETTER = ("loss", "perplexity", "mse", "rmse", "mae")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # one of TYPES
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list[Any]:
        if self.kind == "categorical":
            return list(self.values)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            n = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(n + 1)]
        raise ConfigError(f"search_space.{self.name}: sampler grid needs the values to try; give it "
                          f"`type: categorical, values: [...]` or a `step`")


# --- the search space ----------------------------------------------------------------------

def parse_space(space: Mapping[str, Any] | None, config: Any, extra: dict[str, Any]) -> list[Param]:
    """search_space -> Params, every value checked as the key's own value would be."""
    from lathe.config.load import known_keys, training_arguments_names

    if not space:
        raise ConfigError("lathe tune needs a search_space: a mapping of config keys to ranges, e.g. "
                          "learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-3}")
    keys = set(known_keys()) | set(training_arguments_names())
    params = []
    for name, spec in space.items():
        where = f"search_space.{name}"
        if name not in keys:
            raise ConfigError(f"{where}: {name} is not a config key{did_you_mean(name, keys)}; "
                              "see `lathe keys`")
        if name in TUNE_KEYS or name in ("output_dir", "folds", "fold"):
            raise ConfigError(f"{where}: {name} steers the search or where trials go; it cannot be searched")
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise ConfigError(f"{where} must be a mapping with a type ({', '.join(TYPES)}), e.g. "
                              "{type: uniform, low: 0.0, high: 0.1}")
        kind = spec["type"]
        if kind not in TYPES:
            raise ConfigError(f"{where}: type {kind!r} is not one of {', '.join(TYPES)}"
                              f"{did_you_mean(str(kind), TYPES)}")
        allowed = {"type", "values"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ConfigError(f"{where}: {unknown[0]} does not apply to type {kind} (it takes "
                              f"{', '.join(sorted(allowed - {'type'}))})")
        if kind == "categorical":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: type categorical needs `values`: a non-empty list")
            for v in values:
                _check_value(config, extra, name, v, where)
            params.append(Param(name, kind, values=tuple(values)))
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(f"{where}: type {kind} needs numbers `low` and `high`")
        if low > high:
            raise ConfigError(f"{where}: low {low} is above high {high}; swap them")
        log_scale = kind == "loguniform" or bool(spec.get("log"))
        if log_scale and low <= 0:
            raise ConfigError(f"{where}: a log scale needs low > 0 (got {low})")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: type int needs whole numbers for low and high (got {low}, {high})")
        for v in (low, high):
            _check_value(config, extra, name, int(v) if kind == "int" else v, where)
        params.append(Param(name, "int" if kind == "int" else "float", float(low), float(high), log_scale,
                            spec.get("step")))
    return params


def _check_value(config: Any, extra: dict[str, Any], name: str, value: Any, where: str) -> None:
    """`value` as `name` in the base config: the wrong type, or a value the checks refuse."""
    try:
        load_config(config, {**extra, name: value})
    except ConfigError as e:
        raise ConfigError(f"{where}: the value {value!r} does not fit: {e}") from None


# --- the study -----------------------------------------------------------------------------

def run_tune(config: str | os.PathLike | Mapping[str, Any] | None,
             overrides: list[str] | Mapping[str, Any] | None = None) -> dict[str, Any]:
    extra = parse_overrides(overrides)
    cfg = load_config(config, extra)
    s = cfg.selection
    _check_tunable(cfg)
    base = {k: v for k, v in extra.items() if k not in TUNE_KEYS}
    params = parse_space(s.search_space, config, base)
    metric = _metric_name(s.tune_metric)
    direction = s.tune_direction if s.tune_direction != "auto" else _direction(metric)
    out = Path(cfg.train.output_dir)
    _check_folder(out, s.resume)
    sampler, pruner = _sampler(s.sampler, params, cfg.train.seed), _pruner(s.pruner)  # their errors first

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="lathe", storage=f"sqlite:///{out / STUDY}", load_if_exists=True,
                                direction=direction, sampler=sampler, pruner=pruner)
    fingerprint = {"search_space": s.search_space, "metric": metric, "direction": direction,
                   "base": _base_fingerprint(config, base)}
    _same_study(study, fingerprint, out)
    _retry_interrupted(study)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    todo = s.n_trials - len(finished)
    if finished:
        log(f"Study {out / STUDY}: {len(finished)} trials finished; {max(todo, 0)} to go")
    started = time.time()
    if todo > 0:
        objective = _Objective(config, base, params, metric, out, s.keep_best, direction)
        study.optimize(objective, n_trials=todo, timeout=s.tune_timeout, gc_after_trial=True)
    report = build_report(study, params, metric, direction, out, time.time() - started)
    _keep_best_weights(study, out, s.keep_best)
    if report["best"] is not None:
        write_best_config(out, report["best"]["trial"])
    report["importances"] = param_importances(study)
    (out / RESULTS).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print_table(report)
    charts(report, out)
    log(f"Saved {out / RESULTS}, {out / HISTORY}, {out / IMPORTANCE} and {out / 'best' / 'config.yaml'}")
    return report


def _check_tunable(cfg: LatheConfig) -> None:
    d, s = cfg.data, cfg.selection
    if cfg.finetune.stage == "ppo":
        raise ConfigError("stage ppo has no validation metric to tune on; tune the reward model (stage rm) or "
                          "sft, or search ppo by hand")
    if not (d.val_size or d.eval_dataset):
        raise ConfigError("lathe tune compares trials on a validation metric: set val_size (e.g. 0.1) or "
                          "eval_dataset")
    if d.folds:
        raise ConfigError("lathe tune trains one run per trial; remove folds (lathe cv cross-validates one config)")
    if s.n_trials < 1:
        raise ConfigError(f"n_trials={s.n_trials} must be at least 1")
    if s.keep_best < 0:
        raise ConfigError(f"keep_best={s.keep_best} must be 0 or more (trials that keep their weights)")
    if s.tune_timeout is not None and s.tune_timeout <= 0:
        raise ConfigError(f"tune_timeout={s.tune_timeout} must be a positive number of seconds")


def _metric_name(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"


def _direction(metric: str) -> str:
    return "minimize" if metric.removeprefix("eval_").endswith(_LOWER_IS_BETTER) else "maximize"


def _check_folder(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} is a file; choose a folder path")
    if not out.is_dir() or not any(out.iterdir()):
        if resume:
            raise OutputError(f"resume=true, but {out} holds no study ({STUDY}); remove resume to start one")
        return
    if not (out / STUDY).is_file():
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise OutputError(f"output_dir {out} already holds files ({held}) and no study; choose a new output_dir")
    if not resume:
        raise OutputError(f"output_dir {out} already holds a study ({STUDY}); resume=true continues it, "
                          "or choose a new output_dir")


def _base_fingerprint(config: Any, base: dict[str, Any]) -> dict[str, Any]:
    raw = dict(config) if isinstance(config, Mapping) else read_config_file(str(config)) if config else {}
    merged = {**raw, **base}
    return json.loads(json.dumps({k: v for k, v in sorted(merged.items()) if k not in TUNE_KEYS}, default=str))


def _same_study(study: Any, fingerprint: dict[str, Any], out: Path) -> None:
    stored = study.user_attrs.get("lathe")
    if stored is None:
        study.set_user_attr("lathe", fingerprint)
        return
    for key, what in (("search_space", "search space"), ("metric", "metric"), ("direction", "direction"),
                      ("base", "base config")):
        if stored.get(key) != fingerprint[key]:
            differs = _first_difference(stored.get(key), fingerprint[key])
            raise ConfigError(f"{out / STUDY} holds a study with another {what}{differs}; its trials would not "
                              "compare with these, so choose a new output_dir (or restore the config)")


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return f" ({k}: {a.get(k)!r} there, {b.get(k)!r} now)"
    return f" ({a!r} there, {b!r} now)"


def _retry_interrupted(study: Any) -> None:
    """A trial left running by a crash or a stop: told failed, and its values queued to run again."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
        log(f"trial {t.number} was interrupted; it runs again with the same values")


def _sampler(name: str, params: list[Param], seed: int) -> Any:
    import optuna

    if name == "grid":
        return optuna.samplers.GridSampler({p.name: p.grid() for p in params}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)  # random first, then the model


def _pruner(name: str) -> Any:
    import optuna

    if name == "median":  # after two trials finish, from the second evaluation on
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0, interval_steps=1)
    return optuna.pruners.NopPruner()


class _Objective:
    """One trial: the base config with the trial's values, trained in its own run directory; the
    validation metric at each evaluation goes to the pruner, the last one is the trial's value."""

    def __init__(self, config: Any, base: dict[str, Any], params: list[Param], metric: str, out: Path,
                 keep_best: int, direction: str) -> None:
        self.config, self.base, self.params, self.metric = config, base, params, metric
        self.out, self.keep_best, self.direction = out, keep_best, direction

    def __call__(self, trial: Any) -> float:
        import optuna

        from lathe.api import train

        values = {p.name: p.suggest(trial) for p in self.params}
        run = self.out / "trials" / f"trial-{trial.number:03d}"
        keys = {**self.base, **values, "output_dir": str(run), "overwrite_output_dir": True}
        for k in TUNE_KEYS:
            keys.pop(k, None)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        log(f"trial {trial.number}: {shown} -> {run}")
        reporter = _PruningReporter(trial, self.metric)
        start = time.time()
        with extra_callbacks(reporter.callback()):
            result = train(self.config, keys)
        trial.set_user_attr("wall_s", round(time.time() - start, 3))
        trial.set_user_attr("train_s", round(float(result.metrics.get("train_runtime", 0.0)), 3))
        trial.set_user_attr("steps", reporter.last_step)
        trial.set_user_attr("output_dir", str(run))
        if self.metric not in result.metrics:
            raise ConfigError(f"tune_metric: the runs report no {self.metric} (they report "
                              f"{', '.join(k for k in result.metrics if k.startswith('eval_'))}); choose one of those")
        value = float(result.metrics[self.metric])
        if reporter.pruned:
            log(f"trial {trial.number}: pruned at step {reporter.last_step} ({self.metric} {value:.4f})")
            raise optuna.TrialPruned()
        log(f"trial {trial.number}: {self.metric} {value:.4f}")
        _keep_best_weights(trial.study, self.out, self.keep_best, also=(trial.number, value))
        return value


class _PruningReporter:
    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned, self.last_step = False, 0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        reporter = self

        class ReportToStudy(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kw):
                reporter.last_step = state.global_step
                value = (metrics or {}).get(reporter.metric)
                if value is None or not math.isfinite(value) or not state.is_world_process_zero:
                    return
                reporter.trial.report(float(value), state.global_step)
                if reporter.trial.should_prune():
                    reporter.pruned = True
                    control.should_training_stop = True

            def on_step_end(self, args, state, control, **kw):
                reporter.last_step = state.global_step

        return ReportToStudy()


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# --- weights, best config, report -----------------------------------------------------------

def _ranked(study: Any, also: tuple[int, float] | None = None) -> list[tuple[int, float]]:
    """(trial number, value) of the finished trials, best first (`also`: one just finished)."""
    done = [(t.number, t.value) for t in study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE" and t.value is not None]
    if also is not None and all(n != also[0] for n, _ in done):
        done.append(also)
    minimize = study.direction.name == "MINIMIZE"
    return sorted(done, key=lambda nv: nv[1] if minimize else -nv[1])


def _keep_best_weights(study: Any, out: Path, keep: int, also: tuple[int, float] | None = None) -> None:
    """Weights and checkpoints stay in the `keep` best trials only (`also`: the trial that just
    finished, not yet told to the study); a pruned or worse trial keeps its config, metrics and logs."""
    best = {n for n, _ in _ranked(study, also)[:keep]}
    for run in sorted((out / "trials").glob("trial-*")):
        if int(run.name.split("-")[1]) in best:
            continue
        for name in WEIGHT_FILES:
            (run / name).unlink(missing_ok=True)
        for shard in run.glob("model-*-of-*.safetensors"):
            shard.unlink(missing_ok=True)
        for checkpoint in run.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)


def write_best_config(out: Path, number: int) -> Path:
    """best/config.yaml: the best trial's resolved config, writing into best/run."""
    trial_config = out / "trials" / f"trial-{number:03d}" / "config.yaml"
    raw = read_config_file(str(trial_config))
    keys = {k: v for k, v in raw.items() if k not in TUNE_KEYS and k != "overwrite_output_dir"}
    keys["output_dir"] = str(out / "best" / "run")
    best = out / "best"
    best.mkdir(exist_ok=True)
    path = best / "config.yaml"
    header = f"# The best trial of {out / STUDY} (trial {number}): `lathe train {path}` trains it as a plain run.\n"
    path.write_text(header + yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


def build_report(study: Any, params: list[Param], metric: str, direction: str, out: Path,
                 wall_s: float) -> dict[str, Any]:
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"trial": t.number, "state": t.state.name.lower(), "params": t.params,
                       "value": t.value if t.state.name == "COMPLETE" else
                       (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
                       "steps": t.user_attrs.get("steps"), "wall_s": t.user_attrs.get("wall_s"),
                       "train_s": t.user_attrs.get("train_s"), "output_dir": t.user_attrs.get("output_dir")})
    ranked = _ranked(study)
    best = None
    if ranked:
        bt = study.trials[ranked[0][0]]
        best = {"trial": bt.number, "value": bt.value, "params": bt.params}
    timed = [t for t in trials if t["wall_s"] is not None]
    wall = sum(t["wall_s"] for t in timed)
    train = sum(t["train_s"] or 0 for t in timed)
    return {"metric": metric, "direction": direction, "search_space": [p.__dict__ for p in params],
            "n_trials": len(trials), "best": best, "trials": trials,
            "time": {"this_call_s": round(wall_s, 2), "trials_wall_s": round(wall, 2), "training_s": round(train, 2),
                     "overhead_s": round(wall - train, 2),
                     "overhead_share": round((wall - train) / wall, 4) if wall else None}}


def print_table(report: dict[str, Any]) -> None:
    names = [p["name"] for p in report["search_space"]]
    metric = report["metric"].removeprefix("eval_")
    print(f"{'trial':>5} {'state':<9}" + "".join(f"{n[:16]:>17}" for n in names) + f"{metric:>14}{'wall s':>9}")
    best = (report["best"] or {}).get("trial")
    for t in report["trials"]:
        value = f"{t['value']:.4f}" if isinstance(t["value"], float) else "-"
        line = f"{t['trial']:>5} {t['state']:<9}" + "".join(f"{_fmt(t['params'].get(n, '-')):>17}" for n in names)
        line += f"{value:>14}{(t['wall_s'] or 0):>9.1f}" + ("  <- best" if t["trial"] == best else "")
        print(line)
    tm = report["time"]
    if tm["trials_wall_s"]:
        print(f"time: {tm['trials_wall_s']:.1f} s in trials, {tm['training_s']:.1f} s of it training; "
              f"overhead (loading the model and the cached data, evaluating, saving) {tm['overhead_share']:.0%}")


def charts(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in report["trials"] if t["state"] == "complete"]
    pruned = [t for t in report["trials"] if t["state"] == "pruned" and t["value"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    ax.scatter([t["trial"] for t in done], [t["value"] for t in done], color="#1f77b4", label="complete")
    if pruned:
        ax.scatter([t["trial"] for t in pruned], [t["value"] for t in pruned], color="#bbbbbb", marker="x",
                   label="pruned (last report)")
    if done:
        best, line = None, []
        minimize = report["direction"] == "minimize"
        for t in sorted(done, key=lambda t: t["trial"]):
            best = t["value"] if best is None or (t["value"] < best if minimize else t["value"] > best) else best
            line.append((t["trial"], best))
        ax.step([x for x, _ in line], [y for _, y in line], where="post", color="#d62728", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(report["metric"])
    ax.set_title("optimization history")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / HISTORY)
    plt.close(fig)

    importances = report["importances"]
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.5 * max(1, len(importances))), dpi=100)
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="#1f77b4")
        ax.set_xlabel("importance (share of the metric's variance)")
    else:
        ax.text(0.5, 0.5, "needs two finished trials with different values", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("parameter importances")
    fig.tight_layout()
    fig.savefig(out / IMPORTANCE)
    plt.close(fig)


def param_importances(study: Any) -> dict[str, float]:
    """fANOVA (Optuna's default; scikit-learn) where installed, else PED-ANOVA; {} with too few trials."""
    import warnings

    import optuna

    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(done) < 2 or not any(len({json.dumps(t.params.get(k), default=str) for t in done}) > 1
                                for k in done[0].params):
        return {}
    try:
        import sklearn  # noqa: F401

        evaluator = None
    except ImportError:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return {k: round(float(v), 4) for k, v in
                    optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
        except (RuntimeError, ValueError, LatheError):
            return {}
