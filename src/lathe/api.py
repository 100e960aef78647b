"""The Python entry points: `lathe.train(...)` does what `lathe train` does."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lathe.config.load import load_config, parse_overrides


def train(config: str | os.PathLike | Mapping[str, Any] | None = None,
          overrides: list[str] | Mapping[str, Any] | None = None, **keys: Any):
    """Train from a YAML/JSON path or a dict; `overrides`/`keys` win over the file.

    Returns a `RunResult` with the output directory, metrics, the trained model and
    the tokenizer.
    """
    from lathe.quiet import quiet_warnings
    from lathe.recipes import run
    from lathe.recipes.common import repeat_target

    quiet_warnings()

    extra = parse_overrides(overrides)
    extra.update(keys)
    cfg = load_config(config, extra)
    cfg = repeat_target(cfg, set(extra))
    from lathe.distributed import several_machines, wanted_processes
    from lathe.plan import decide_checkpointing

    n = wanted_processes(cfg)
    if n > 1 or several_machines():  # nproc_per_node: this process starts torchrun, which runs it n times
        return _launch(cfg, n)
    cfg = decide_checkpointing(cfg)  # gradient_checkpointing unset: from lathe plan's estimate
    result = run(cfg)
    if cfg.finetune.quantization_aware_training and cfg.train.do_train and _is_main_process():
        result.metrics["quantized"] = convert_qat_run(cfg, result.output_dir)
    return result


def cv(config: str | os.PathLike | Mapping[str, Any] | None = None,
       overrides: list[str] | Mapping[str, Any] | None = None, **keys: Any) -> dict[str, Any]:
    """`lathe cv`: k-fold cross-validation (folds=K) with the config's training run; returns the
    summary cv_results.json holds (each validation metric per fold, mean and std)."""
    from lathe.choose.cv import run_cv
    from lathe.quiet import quiet_warnings

    quiet_warnings()
    return run_cv(config, {**parse_overrides(overrides), **keys})


def tune(config: str | os.PathLike | Mapping[str, Any] | None = None,
         overrides: list[str] | Mapping[str, Any] | None = None, **keys: Any) -> dict[str, Any]:
    """`lathe tune`: a hyperparameter search (Optuna) over the config's training run, in a study
    stored in output_dir/study.db; returns the report tune_results.json holds."""
    from lathe.choose.tune import run_tune
    from lathe.quiet import quiet_warnings

    quiet_warnings()
    return run_tune(config, {**parse_overrides(overrides), **keys})


def _launch(cfg: Any, n: int) -> Any:
    """The run in n processes of this machine (torchrun): the cheap checks here first, so a
    mistake is one line before any process starts; the RunResult read from the run directory."""
    import contextlib
    import io
    import json
    import tempfile
    from pathlib import Path

    from lathe.config.load import save_config
    from lathe.distributed import check_devices, launch
    from lathe.model.load import resolve_model_path
    from lathe.recipes.common import RunResult, check_output_dir, read_rows

    check_devices(n)
    with contextlib.redirect_stdout(io.StringIO()):  # what they say, the processes say again
        check_output_dir(cfg)
        resolve_model_path(cfg.model.model_name_or_path, cfg.model.model_revision, cfg.model.cache_dir)
        read_rows(cfg)
    from lathe.plan import decide_checkpointing

    decided = decide_checkpointing(cfg)  # once, here: every process gets the same answer
    if decided is not cfg:
        print(decided.notes[-1], flush=True)  # the processes' summaries have the key set, not the reason
        cfg = decided
    with tempfile.TemporaryDirectory(prefix="lathe-launch-") as tmp:
        path = Path(tmp) / "config.yaml"
        save_config(cfg, path)  # nproc_per_node kept: the run's config.yaml repeats it the same way
        launch(n, str(path))
    out = Path(cfg.train.output_dir)
    results = out / "all_results.json"
    metrics = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}
    return RunResult(str(out), metrics)


def _is_main_process() -> bool:
    from lathe.recipes.common import is_main_process

    return is_main_process()


def convert_qat_run(cfg: Any, run_dir: str) -> str:
    """A QAT run's float weights -> <run_dir>/quantized, by lathe quantize with the run's scheme
    (its report measures both, on the run's eval_dataset when it has one)."""
    from pathlib import Path

    from lathe.quant.run import run_quantize

    q = cfg.quantize
    keys = {"quantization_scheme": q.quantization_scheme, "quantization_group_size": q.quantization_group_size,
            "quantize_embeddings": q.quantize_embeddings, "quantize_report": q.quantize_report,
            "benchmark_repeats": q.benchmark_repeats, "output_dir": str(Path(run_dir) / "quantized"),
            "dataset_dir": cfg.data.dataset_dir, "max_samples": cfg.data.max_samples}
    for key, value in (("quantization_skip_modules", q.quantization_skip_modules),
                       ("quantize_compare", q.quantize_compare), ("eval_dataset", cfg.data.eval_dataset)):
        if value:
            keys[key] = value
    if q.quantization_scheme != "int4_weight_only":
        keys.pop("quantization_group_size")
    run_quantize(quantize_config(run_dir, keys), origin="qat")
    return keys["output_dir"]


# Stages whose runs `lathe predict` can score, and what it then does.
PREDICTS = {"sft": "generates a reply per row and scores it (BLEU-4, ROUGE)",
            "pt": "reports the loss and perplexity", "cls": "predicts a label per row, with probabilities",
            "tagging": "tags every word and lists the entities",
            "seq2seq": "generates every target and scores it (BLEU-4, ROUGE)",
            "qa": "finds every question's answer span (exact match, F1)",
            "embed": "ranks every eval positive for each anchor (recall@k, MRR)"}


def predict(source: str | os.PathLike, overrides: list[str] | Mapping[str, Any] | None = None):
    """`lathe predict`: the trained model of a run (a run directory, or the config that wrote
    one: its output_dir) predicts the run's held-out rows (its eval_dataset, or the same
    val_size split) or `eval_dataset=...`; the results go to a fresh folder in the run
    directory (predict, predict-2, ...), or, given a run directory, to output_dir=... if set
    (given a config, output_dir names the run). Returns a RunResult."""
    from lathe.quiet import quiet_warnings
    from lathe.recipes import run

    quiet_warnings()
    return run(predict_config(source, overrides))


def predict_config(source: str | os.PathLike, overrides: list[str] | Mapping[str, Any] | None = None) -> Any:
    """The config `lathe predict SOURCE overrides` runs (checked; nothing is loaded or written)."""
    from pathlib import Path

    from lathe.config.load import read_config_file
    from lathe.errors import ConfigError
    from lathe.runs import is_lathe_run, model_keys, read_run_config, run_state

    extra = parse_overrides(overrides)
    if Path(source).is_dir():
        run_dir = str(source)
    else:
        given = {**read_config_file(str(source)), **extra}
        run_dir = given.get("output_dir")
        extra.pop("output_dir", None)  # with a config, output_dir names the run to predict with
        if not run_dir:
            raise ConfigError(f"{source} names no output_dir; lathe predict reads the run it trained "
                              "(or pass the run directory itself)")
    state = run_state(run_dir)
    export = state == "incomplete" and not is_lathe_run(run_dir) and (Path(run_dir) / "config.json").is_file()
    if state != "complete" and not export:
        raise ConfigError(f"lathe predict: {run_dir} holds no finished run ({state}); train it first "
                          f"(lathe train {source}) or pass a finished run directory")
    if export and "eval_dataset" not in extra:
        raise ConfigError(f"lathe predict: {run_dir} is a model folder (an export), which names no data; "
                          "give eval_dataset=NAME (and dataset_dir=FOLDER holding its dataset_info.json)")
    recorded = read_run_config(run_dir)
    stage = recorded.get("stage", "sft") if recorded else model_keys(run_dir).get("stage", "sft")
    if stage not in PREDICTS:
        raise ConfigError(f"lathe predict works on runs of stage {', '.join(PREDICTS)}; {run_dir} is stage "
                          f"{stage}")
    keys = {k: v for k, v in recorded.items()
            if k not in ("adapter_name_or_path", "output_dir", "overwrite_output_dir", "resume_from_checkpoint")}
    keys.update(model_keys(run_dir))
    keys.update(do_train=False, do_eval=False, do_predict=True, predict_with_generate=stage == "sft",
                output_dir=_free_folder(Path(run_dir) / "predict"))
    if "eval_dataset" in extra:  # other rows than the run's held-out ones: no training rows needed
        keys.update(dataset=None, val_size=0)
    keys.update(extra)
    return load_config(keys)


def _free_folder(path) -> str:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return str(candidate)


# What a trained run's config.yaml says about its model that a quantized copy must keep: how
# its rows are rendered (calibration, the report's eval set) and the task head it has.
_RUN_KEYS = ("stage", "template", "cutoff_len", "problem_type", "label_names", "pooling", "dataset_dir")


def quantize(config: str | os.PathLike | Mapping[str, Any] | None = None,
             overrides: list[str] | Mapping[str, Any] | None = None, **keys: Any) -> dict[str, Any]:
    """`lathe quantize`: the model of model_name_or_path (a run directory or an export; or `config`
    itself when it is one) -> a quantized model folder in output_dir, and its report. The run's
    own keys (stage, template, cutoff_len, its head's labels) come from its config.yaml; the
    config's keys win. Returns what was written and the report."""
    from lathe.quant.run import run_quantize
    from lathe.quiet import quiet_warnings

    quiet_warnings()
    return run_quantize(quantize_config(config, {**parse_overrides(overrides), **keys}))


def quantize_config(config: str | os.PathLike | Mapping[str, Any] | None, keys: Mapping[str, Any]) -> Any:
    """The `lathe quantize` config: `config` (a file, a mapping, or the run directory itself) and
    `keys`, over the keys of the run model_name_or_path names."""
    from pathlib import Path

    from lathe.config.load import read_config_file
    from lathe.errors import ConfigError
    from lathe.model.quant.store import is_quantized_dir
    from lathe.runs import model_keys, read_run_config

    if config is not None and not isinstance(config, Mapping) and Path(config).is_dir():
        given: dict[str, Any] = {"model_name_or_path": str(config)}
    else:
        given = dict(config) if isinstance(config, Mapping) else read_config_file(str(config)) if config else {}
    given.update(keys)
    source = given.get("model_name_or_path")
    merged: dict[str, Any] = {}
    if source and Path(str(source)).is_dir():
        if is_quantized_dir(str(source)):
            raise ConfigError(f"model_name_or_path {source} is already quantized (it holds quantization.json); "
                              "quantize the float run or export it came from")
        recorded = read_run_config(source)  # {} for an export: its folder says what it is (model_keys)
        merged.update({k: recorded[k] for k in _RUN_KEYS if recorded.get(k) is not None})
        merged.update(model_keys(str(source)))
    merged.update({k: v for k, v in given.items() if k != "model_name_or_path" or "model_name_or_path" not in merged})
    return load_config(merged, command="quantize")
