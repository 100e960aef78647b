"""The web UI's forms, generated from the config schema, and their checks.

Each tab shows a few groups of config keys; a field's type, choices, default and help come
from the schema's dataclass field (the same text `lathe keys` prints), so nothing is written
twice. What the page sends is turned into the flat key: value mapping a YAML config holds and
checked by the very code `lathe <verb>` runs; a mistake comes back as the CLI's one line,
attached to the field it names.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

import yaml

from lathe.config.checks import align_stages
from lathe.config.coerce import coerce
from lathe.config.load import build_config, parse_overrides
from lathe.config.schema import SECTIONS, STAGES, LatheConfig
from lathe.errors import ConfigError, DataError, LatheError, ModelError, OutputError
from lathe.webui import i18n

# tab -> groups of keys (a group title is a word of i18n.UI).
FORMS: dict[str, list[tuple[str, list[str]]]] = {
    "train": [
        ("group_model", ["model_name_or_path", "adapter_name_or_path", "template", "quantization_bit"]),
        ("group_method", ["stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target",
                          "pref_beta", "pref_loss"]),
        ("group_data", ["dataset_dir", "dataset", "cutoff_len", "max_samples", "val_size", "packing"]),
        ("group_hyper", ["learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                         "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "weight_decay",
                         "max_grad_norm", "bf16", "gradient_checkpointing", "seed"]),
        ("group_output", ["output_dir", "logging_steps", "save_steps", "eval_steps", "plot_loss"]),
    ],
    "eval": [("group_benchmark", ["task", "task_dir", "n_shot", "lang", "per_device_eval_batch_size", "save_dir"])],
    "predict": [("group_predict", ["dataset_dir", "eval_dataset", "max_samples", "max_new_tokens", "do_sample",
                                   "output_dir"])],
    "export": [("group_export", ["export_dir", "export_dtype", "export_size", "export_verify"])],
    "quantize": [("group_quantize", ["quantization_scheme", "dataset_dir", "calibration_dataset", "eval_dataset",
                                     "benchmark_repeats", "output_dir"])],
    "chat": [("group_sampling", ["max_new_tokens", "do_sample", "temperature", "top_p"])],
}
# The verb each form's config is checked for (lathe <verb>).
VERB = {"train": "train", "eval": "eval", "predict": "train", "export": "export", "quantize": "quantize",
        "chat": "chat"}
# The form's own starting values where the schema's default is not what a first run wants.
STARTING = {"train": {"model_name_or_path": "lathe:demo", "dataset_dir": "data", "dataset": "identity",
                      "template": "chatml", "max_steps": "20", "learning_rate": "0.001", "logging_steps": "2",
                      "plot_loss": True},
            "chat": {"max_new_tokens": "64", "do_sample": False}}

_FIELDS = {f.name: f for cls in SECTIONS.values() for f in dataclasses.fields(cls) if f.name != "extra"}
_TYPES = {name: typing.get_type_hints(cls)[f.name]
          for cls in SECTIONS.values() for f in dataclasses.fields(cls) for name in [f.name] if name != "extra"}


def _default(key: str) -> Any:
    f = _FIELDS[key]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _shape(tp: Any) -> tuple[str, list[str] | None, bool]:
    """(kind, choices, nullable) of a declared type."""
    nullable = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        if tp is bool and nullable:  # unset, true or false (unset: Lathe decides, e.g. gradient_checkpointing)
            return "select", ["true", "false"], True
    if typing.get_origin(tp) is typing.Literal:
        return "select", [str(a) for a in typing.get_args(tp)], nullable
    if typing.get_origin(tp) is list:
        return "list", None, nullable
    kind = {bool: "bool", int: "int", float: "float"}.get(tp, "text")
    return kind, None, nullable


def _shown(value: Any) -> Any:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if value is None:
        return ""
    return value if isinstance(value, bool) else str(value)


def field_spec(key: str, lang: str) -> dict[str, Any]:
    f = _FIELDS[key]
    kind, choices, nullable = _shape(_TYPES[key])
    suggest = None
    if key == "stage":
        kind, choices = "select", list(STAGES)
    if key == "template":
        from lathe.data.templates import TEMPLATES

        suggest = list(TEMPLATES.names())
    stages = f.metadata.get("stages") or (align_stages(key) if key in _ALIGN_KEYS else None)
    return {"key": key, "kind": kind, "choices": choices, "suggest": suggest, "nullable": nullable,
            "default": _shown(_default(key)), "label": i18n.key_label(key, lang),
            "help": i18n.key_help(key, f.metadata.get("help", ""), lang),
            "methods": list(f.metadata.get("methods") or []) or None, "stages": list(stages) if stages else None}


_ALIGN_KEYS = {f.name for f in dataclasses.fields(SECTIONS["align"])}


def form_spec(form: str, lang: str) -> dict[str, Any]:
    start = STARTING.get(form, {})
    groups = []
    for title, keys in FORMS[form]:
        fields = []
        for key in keys:
            spec = field_spec(key, lang)
            spec["value"] = start.get(key, spec["default"])
            fields.append(spec)
        groups.append({"title": title, "fields": fields})
    return {"form": form, "verb": VERB[form], "groups": groups}


# --- from the page to a config ------------------------------------------------------------

class FormErrors(Exception):
    """Field -> one-line message (the CLI's line); `_extra` is the free YAML box, `_form` the rest."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(errors.values()))
        self.errors = errors


EXTRA = "_extra"


def to_keys(form: str, values: dict[str, Any], extra_yaml: str = "") -> dict[str, Any]:
    """The flat config mapping of what the page holds: fields left at their default (or empty)
    are left out, so the YAML holds what the user chose."""
    known = {k for _, keys in FORMS[form] for k in keys}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise FormErrors({"_form": f"{key} is not a field of the {form} form"})
        if isinstance(value, bool):
            if value != _default(key):
                out[key] = value
            continue
        text = "" if value is None else str(value).strip()
        if text == "" or text == _shown(_default(key)):
            continue
        kind, _, _ = _shape(_TYPES[key])
        if kind == "list":
            out[key] = [p.strip() for p in text.split(",") if p.strip()]
        elif kind == "select" and _TYPES[key] == bool | None:
            out[key] = text == "true"
        elif kind in ("text", "select"):
            out[key] = text
        else:  # a number as the CLI reads key=value, typed as the schema declares it (2e-4 -> 0.0002)
            value = parse_overrides([f"{key}={text}"])[key]
            try:
                out[key] = coerce(key, value, _TYPES[key])
            except ConfigError as e:
                raise FormErrors({key: str(e)}) from None
    if extra_yaml.strip():
        try:
            more = yaml.safe_load(extra_yaml)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise FormErrors({EXTRA: f"line {mark.line + 1 if mark else '?'}: not valid YAML "
                                     f"({getattr(e, 'problem', None) or 'could not be parsed'})"}) from None
        if more is not None and not isinstance(more, dict):
            raise FormErrors({EXTRA: "write one `key: value` per line"})
        out.update(more or {})
    return out


def field_of(message: str, keys: list[str], fallback: str = EXTRA) -> str:
    """The key of `keys` a one-line message names first (the CLI's lines start from the key)."""
    best, where = fallback, len(message) + 1
    for key in keys:
        m = re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message)
        if m and m.start() < where:
            best, where = key, m.start()
    return best


def shown_keys(form: str) -> list[str]:
    return [k for _, keys in FORMS[form] for k in keys]


def error_field(e: LatheError, form: str, keys: dict[str, Any] | None = None) -> str:
    """The field a mistake belongs on: a key of the form the user set that the line names; else
    the box the other keys came from (the YAML box; for the forms that read a picked folder, the
    folder); else any field of the form it names (a key left out: "dataset is missing")."""
    shown = shown_keys(form)
    keys = keys or {}
    rest = EXTRA if form == "train" else "_source"
    message = str(e)
    if isinstance(e, DataError) and "dataset" in shown:
        return "dataset"
    found = field_of(message, [k for k in shown if k in keys], "")
    if not found:
        found = rest if field_of(message, [k for k in keys if k not in shown], "") else field_of(message, shown, "")
    if found:
        return found
    if isinstance(e, OutputError):
        return next((k for k in ("output_dir", "save_dir", "export_dir") if k in shown), rest)
    if isinstance(e, ModelError):
        return "model_name_or_path" if "model_name_or_path" in shown else "_source"
    return rest


def check(form: str, keys: dict[str, Any]) -> LatheConfig:
    """The config `lathe <verb>` would build from `keys`, or FormErrors naming the field."""
    try:
        cfg = build_config(keys, command=VERB[form])
        if cfg.is_set("template"):  # known only when the run starts in the CLI: here, at once
            from lathe.data.templates import get_template

            get_template(cfg.data.template)
        return cfg
    except ConfigError as e:
        raise FormErrors({error_field(e, form, keys): str(e)}) from None


def config_yaml(keys: dict[str, Any]) -> str:
    return yaml.safe_dump(keys, sort_keys=False, allow_unicode=True, default_flow_style=None)
