"""Load a config: defaults < YAML/JSON file < `key=value` overrides, then validate.

Unknown keys are errors that name the closest valid key. Keys that are not Lathe's
own but are fields of `transformers.TrainingArguments` are passed through; only then
is transformers imported (it takes seconds), so common mistakes are reported at once.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lathe.config.checks import run_checks
from lathe.config.coerce import coerce
from lathe.config.llamafactory import translate
from lathe.config.schema import SECTIONS, LatheConfig
from lathe.errors import ConfigError, did_you_mean

# key -> (section name, declared type); schema uses postponed annotations, so resolve them.
_FIELDS: dict[str, tuple[str, Any]] = {
    f.name: (section, typing.get_type_hints(cls)[f.name])
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    if f.name != "extra"
}

# Keys that older transformers / LLaMA-Factory versions used, with what to write now.
RENAMED = {
    "evaluation_strategy": "eval_strategy (renamed in transformers 5)",
    "no_cuda": "use_cpu (renamed in transformers 5)",
    "max_seq_length": "cutoff_len",
    "lora_rank_": "lora_rank",
    "logging_dir": "report_to: tensorboard (logs go to output_dir/runs)",
    "save_safetensors": "nothing: weights are always saved as safetensors",
}

# Keys other tools use for the same thing.
ALIASES = {"per_device_batch_size": "per_device_train_batch_size", "lora_r": "lora_rank"}


def known_keys() -> list[str]:
    return sorted(_FIELDS)


def load_config(
    source: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    command: str = "train",
    defaults: Mapping[str, Any] | None = None,
) -> LatheConfig:
    """Build a validated `LatheConfig` from a file path or a dict plus overrides,
    checked for what `command` (train, export, chat, eval) needs; `defaults`: keys used where
    neither says anything (a placeholder output_dir for commands that never write one)."""
    path: str | None = None
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = str(source)
        raw = read_config_file(path)
    raw.update(parse_overrides(overrides))
    for key, value in (defaults or {}).items():
        if not raw.get(key):
            raw[key] = value
    return build_config(raw, source=path, command=command)


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        hint = " (it is a folder; pass the config.yaml inside it)" if p.is_dir() else ""
        raise ConfigError(f"config file {path} does not exist{hint}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "could not be parsed"
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value lines")
    return data


def parse_overrides(overrides: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """`["lr=1e-4", "bf16=true"]` -> {"lr": "1e-4", "bf16": True}; dicts pass through."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command-line override {item!r} must look like key=value")
        key = key.strip().lstrip("-").replace("-", "_")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key] = value
        if isinstance(out[key], dict) and _is_text(key):  # `source_prefix=summarize: ` is text, not a mapping
            out[key] = _unquote(value)
    return out


def _is_text(key: str) -> bool:
    """Whether a key's declared type is a plain string (YAML would read `a: b` as a mapping)."""
    declared = _FIELDS.get(ALIASES.get(key, key), (None, None))[1]
    return declared is str or (typing.get_origin(declared) in (typing.Union, types.UnionType)
                               and set(typing.get_args(declared)) == {str, type(None)})


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def build_config(raw: Mapping[str, Any], source: str | None = None, command: str = "train") -> LatheConfig:
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    extra: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    raw = {ALIASES.get(k, k) if isinstance(k, str) else k: v for k, v in raw.items()}
    raw, notes = translate(raw, set(_FIELDS))  # LLaMA-Factory's names -> Lathe's
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} must be a string")
        if key in _FIELDS:
            section, tp = _FIELDS[key]
            sections[section][key] = coerce(key, value, tp)
        else:
            passthrough[key] = value
    if passthrough:
        extra = _check_passthrough(passthrough)
    sections["train"]["extra"] = extra
    _modelscope_ids(sections["model"])
    built = {name: cls(**sections[name]) for name, cls in SECTIONS.items()}
    cfg = LatheConfig(**built, command=command, explicit=frozenset(raw), source=source,
                      notes=tuple(notes))
    run_checks(cfg)
    return cfg


def _modelscope_ids(model: dict[str, Any]) -> None:
    """use_modelscope_hub (or USE_MODELSCOPE_HUB=1, LLaMA-Factory's switch): a model id that is not a
    local folder is read from ModelScope, written as modelscope:org/name from here on."""
    on = model.get("use_modelscope_hub") or os.environ.get("USE_MODELSCOPE_HUB", "0").lower() in ("1", "true")
    name = model.get("model_name_or_path")
    if not on or not isinstance(name, str) or ":" in name or Path(name).expanduser().exists():
        return
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        model["model_name_or_path"] = "modelscope:" + name


def _check_passthrough(values: dict[str, Any]) -> dict[str, Any]:
    """Validate keys that are not Lathe's own against TrainingArguments' fields."""
    names = training_arguments_names()  # cached: a typo is reported without importing transformers
    for key in values:
        if key in RENAMED:
            raise ConfigError(f"{key} is not a known key; write {RENAMED[key]}")
        if key not in names:
            raise ConfigError(
                f"{key} is not a known key{did_you_mean(key, list(_FIELDS) + names)}; "
                "see `lathe keys` for the keys Lathe accepts"
            )
    ta_fields = training_arguments_fields()
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in ta_fields:
            candidates = list(_FIELDS) + list(ta_fields)
            raise ConfigError(
                f"{key} is not a known key{did_you_mean(key, candidates)}; "
                "see `lathe keys` for the keys Lathe accepts"
            )
        if key in NOT_PASSED:
            raise ConfigError(f"{key} is set by Lathe itself and cannot be given: {NOT_PASSED[key]}")
        out[key] = coerce(key, value, ta_fields[key])
    return out


NOT_PASSED = {
    "local_rank": "launch with torchrun or accelerate instead",
    "do_predict": "prediction is not part of this stage yet",
}


def training_arguments_names() -> list[str]:
    """TrainingArguments field names, cached per transformers version (importing it takes seconds)."""
    from importlib.metadata import version

    cache = Path(os.environ.get("LATHE_HOME", Path.home() / ".cache" / "lathe"))
    path = cache / f"training-arguments-{version('transformers')}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    names = sorted(training_arguments_fields())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs speed
    return names


def training_arguments_fields() -> dict[str, Any]:
    from transformers import TrainingArguments  # slow import: only when needed

    return {f.name: f.type for f in dataclasses.fields(TrainingArguments) if f.init}


def to_flat_dict(cfg: LatheConfig) -> dict[str, Any]:
    """The resolved config as the flat mapping users write (saved as config.yaml)."""
    flat: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.name == "extra":
                flat.update({k: _plain(v) for k, v in value.items()})
            else:
                flat[f.name] = _plain(value)
    return flat


def _plain(value: Any) -> Any:
    """Make enum members and tuples YAML-friendly."""
    if isinstance(value, enum.Enum):  # transformers' str-valued enums (OptimizerNames, ...)
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def save_config(cfg: LatheConfig, path: str | os.PathLike) -> None:
    """Write the resolved config atomically so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    header = "# Resolved Lathe config: `lathe train <this file>` repeats the run.\n"
    tmp.write_text(header + yaml.safe_dump(to_flat_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def replace(cfg: LatheConfig, **changes: Any) -> LatheConfig:
    """A copy of `cfg` with flat keys changed (validated like any other input)."""
    flat = {k: v for k, v in to_flat_dict(cfg).items()}
    flat.update(changes)
    new = build_config(flat, source=cfg.source, command=cfg.command)
    return dataclasses.replace(new, explicit=cfg.explicit | frozenset(changes), notes=cfg.notes)

