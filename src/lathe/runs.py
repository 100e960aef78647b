"""Run directories: which are complete, and which ones a stage reads.

A run is complete when its weights (adapter or full model) and all_results.json are
written; the recipes write all_results.json last. A stage that reads a run that did
not finish (a crash, a stop) is refused before anything loads.
"""

from __future__ import annotations

import os
from pathlib import Path

from lathe.config.schema import LatheConfig
from lathe.errors import ConfigError

WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
DONE_FILE = "all_results.json"


def run_state(path: str | os.PathLike) -> str:
    """'complete', 'incomplete' (a Lathe run that has not finished), 'empty' or 'absent'."""
    p = Path(path)
    if not p.is_dir():
        return "absent"
    if not any(p.iterdir()):
        return "empty"
    has_weights = any((p / f).is_file() for f in WEIGHT_FILES)
    return "complete" if has_weights and (p / DONE_FILE).is_file() else "incomplete"


def is_lathe_run(path: str | os.PathLike) -> bool:
    """A directory some `lathe train` wrote into (its resolved config is there)."""
    return (Path(path) / "config.yaml").is_file()


def input_runs(cfg: LatheConfig) -> list[tuple[str, str]]:
    """(key, path) of every run directory a stage reads."""
    found = [("adapter_name_or_path", p) for p in (cfg.model.adapter_name_or_path or [])]
    if cfg.align.reward_model:
        found.append(("reward_model", cfg.align.reward_model))
    if cfg.align.ref_model:
        found.append(("ref_model", cfg.align.ref_model))
    model = cfg.model.model_name_or_path
    if model and is_lathe_run(model):
        found.append(("model_name_or_path", model))
    return found


def check_inputs(cfg: LatheConfig, where: str = "") -> None:
    """Every run directory a stage reads exists and, if Lathe wrote it, is complete."""
    for key, path in input_runs(cfg):
        state = run_state(path)
        if state == "complete" or (state == "incomplete" and not is_lathe_run(path)):
            continue  # a finished run, or a folder Lathe did not write (a downloaded model)
        what = {"absent": "does not exist", "empty": "is empty",
                "incomplete": f"is incomplete (no weights or no {DONE_FILE}: the run did not finish)"}[state]
        raise ConfigError(
            f"{where}{key} {path} {what}; run the stage that writes it first "
            "(or rerun it: delete the folder, or resume it with resume_from_checkpoint: true)"
        )


def read_run_config(folder: str | os.PathLike) -> dict:
    """The resolved config.yaml a Lathe run wrote, as a mapping; {} when there is none or it
    cannot be read (a folder Lathe did not write)."""
    import yaml

    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def task_keys(folder: str) -> dict[str, object]:
    """The keys that rebuild a task model's head (stage, problem_type, label_names): from the
    run's config.yaml, or from an export's config.json (its architecture and id2label); {}
    for a language model."""
    import json

    from lathe.config.schema import TASK_STAGES

    recorded = read_run_config(folder)
    if recorded:  # a Lathe run says what it trained (an rm run is a sequence classifier too)
        if recorded.get("stage") not in TASK_STAGES:
            return {}
        keys = ("stage", "problem_type", "label_names") if recorded["stage"] != "embed" else ("stage", "pooling")
        return {k: recorded[k] for k in keys if recorded.get(k) is not None}
    pooling = _sentence_transformers_pooling(Path(folder))
    if pooling:
        return {"stage": "embed", "pooling": pooling}
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    architectures = config.get("architectures") or []
    id2label = config.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return {"stage": "tagging", "label_names": names}
    if config.get("is_encoder_decoder") and any(a.endswith("ForConditionalGeneration") for a in architectures):
        return {"stage": "seq2seq"}
    if any(a.endswith("ForQuestionAnswering") for a in architectures):
        return {"stage": "qa"}
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return {}
    if not config.get("problem_type") and len(id2label) < 2:
        return {}  # one output and no problem type: a reward model, not a classifier
    problem = config.get("problem_type") or "single_label_classification"
    return {"stage": "cls", "problem_type": problem, **({"label_names": names} if problem != "regression" else {})}


def _sentence_transformers_pooling(folder: Path) -> str | None:
    """The pooling of a sentence-transformers folder (modules.json + 1_Pooling), if it is one."""
    import json

    try:
        config = json.loads((folder / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (folder / "modules.json").is_file():
        return None
    modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
    return next((name for key, name in modes.items() if config.get(key)), None)


def model_keys(folder: str) -> dict[str, object]:
    """`lathe chat|eval|export|predict <folder>`: the model keys that load what the folder
    holds. A LoRA run is its base model (from the run's config.yaml, else adapter_config.json)
    with the adapters it was trained on top of and its own; an export or a full run is the
    model itself. A task model brings the keys of its head (task_keys)."""
    return {**_model_keys(folder), **task_keys(folder), **quantized_keys(folder)}


def quantized_keys(folder: str) -> dict[str, object]:
    """The keys `lathe quantize` recorded in a quantized folder's quantization.json (the stage,
    the task head's keys, the template the model was trained with); {} for other folders."""
    import json

    path = Path(folder) / "quantization.json"
    if not path.is_file():
        return {}
    try:
        keys = json.loads(path.read_text(encoding="utf-8")).get("keys") or {}
    except (OSError, ValueError):
        return {}
    return dict(keys) if isinstance(keys, dict) else {}


def _model_keys(folder: str) -> dict[str, object]:
    import json

    p = Path(folder)
    if (p / "adapter_config.json").is_file():
        recorded = read_run_config(p)
        base = recorded.get("model_name_or_path")
        if not base:
            try:
                base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
            except (OSError, ValueError):
                base = None
        if not base:
            raise ConfigError(f"{folder} holds a LoRA adapter but names no base model; give "
                              "model_name_or_path=<base> adapter_name_or_path=" + folder)
        earlier = list(recorded.get("adapter_name_or_path") or [])
        if not recorded.get("create_new_adapter"):
            earlier = earlier[:-1]  # the last one was trained further into this one
        return {"model_name_or_path": base, "adapter_name_or_path": [*earlier, str(folder)]}
    if (p / "config.json").is_file():
        if (p / "adapter" / "adapter_config.json").is_file():  # an export that kept its adapter
            return {"model_name_or_path": str(folder), "adapter_name_or_path": [str(p / "adapter")]}
        return {"model_name_or_path": str(folder)}
    raise ConfigError(f"{folder} is a folder but neither a model (config.json) nor a LoRA run "
                      "(adapter_config.json); pass a config file, an export or a run directory")


def trained_template(cfg: LatheConfig, model_path: str) -> tuple[str, str | None]:
    """The run that trained the model (the last adapter's folder, or `model_path` for a full
    fine-tuning run) and the template its config.yaml records (export and chat share this)."""
    adapters = cfg.model.adapter_name_or_path or []
    run_dir = adapters[-1] if adapters else model_path
    return run_dir, run_template(Path(run_dir).expanduser())


def run_template(folder: Path) -> str | None:
    """The `template` of a Lathe run's resolved config.yaml, if the folder holds one."""
    value = read_run_config(folder).get("template")
    return value if isinstance(value, str) and value else None
