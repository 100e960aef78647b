"""`lathe data inspect`: what the model is really trained on, from a training config.

Goes the way a run goes (template -> model path -> rows -> tokenizer -> token ids and
labels) but stops before the model: nothing is trained and output_dir is never
written. The figures come from `lathe.data.inspect`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lathe.config.load import load_config
from lathe.config.schema import LatheConfig
from lathe.data import inspect as di
from lathe.data.conversation import Conversation
from lathe.data.loader import load_conversations, stage_kind
from lathe.data.processors import tokenize_conversation
from lathe.data.templates import check_against_tokenizer, get_template
from lathe.errors import ConfigError, OutputError
from lathe.model.load import load_tokenizer, resolve_model_path

DEFAULT_PLOT = "data_report_lengths.png"
_NO_CUTOFF = 1 << 62  # "no truncation" for tokenize_conversation
_PLACEHOLDER_OUTPUT_DIR = "<not written by lathe data inspect>"


def inspect_data(config: str | os.PathLike | Mapping[str, Any] | None,
                 overrides: list[str] | Mapping[str, Any] | None = None, n: int = 3,
                 output: str | os.PathLike | None = None,
                 plot: str | os.PathLike | None = DEFAULT_PLOT,
                 color: bool | None = None) -> dict[str, Any]:
    """Print the data report for a training config; return it as a dict.

    `n` rendered examples, `output` a JSON file for machines, `plot` the length
    histogram PNG (None: none), `color` ANSI colours (None: when stdout is a terminal).
    """
    if n < 0:
        raise ConfigError(f"-n {n} must be 0 or more")
    cfg = _load(config, overrides)
    if color is None:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    report, examples, lengths = build(cfg, n, color)
    if plot is not None:
        written = _write(plot, lambda p: di.plot_lengths(
            [r.prompt for r in lengths], [r.response for r in lengths], cfg.data.cutoff_len, p,
            total=[r.total for r in lengths]))
        report["plot"] = str(written)
    if output is not None:
        _write(output, lambda p: p.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"))
    print(di.format_report(report, examples, color=color))
    if plot is not None:
        print(f"Length histogram: {report['plot']}")
    if output is not None:
        print(f"Report JSON: {output}")
    return report


def _load(config: str | os.PathLike | Mapping[str, Any] | None,
          overrides: list[str] | Mapping[str, Any] | None) -> LatheConfig:
    """The training config; output_dir may be left out (inspecting never writes it)."""
    cfg = load_config(config, overrides, defaults={"output_dir": _PLACEHOLDER_OUTPUT_DIR})
    if not cfg.data.dataset:
        raise ConfigError("dataset is missing; name one or more entries of dataset_info.json")
    if stage_kind(cfg.finetune.stage) != "sft":
        raise ConfigError(f"lathe data inspect shows sft data; stage {cfg.finetune.stage} "
                          "is not supported yet")
    return cfg


def build(cfg: LatheConfig, n: int, color: bool
          ) -> tuple[dict[str, Any], list[str], list[di.RowLengths]]:
    """The report dict, `n` marked examples (as shown) and every row's lengths."""
    data = cfg.data
    template = get_template(data.template)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    rows, stats = load_conversations(data)  # bad rows are reported before slow imports
    tokenizer = load_tokenizer(cfg.model, model_path)

    lengths: list[di.RowLengths] = []
    examples: list[str] = []
    shown: list[dict[str, Any]] = []
    for row in rows:
        conv = Conversation.from_row(row)
        full = tokenize_conversation(conv, template, tokenizer, _NO_CUTOFF, data.train_on_prompt,
                                     data.train_on_last_turn_only)
        kept = full
        if len(full["input_ids"]) > data.cutoff_len:  # what fits is kept whole: re-cut only these
            kept = tokenize_conversation(conv, template, tokenizer, data.cutoff_len,
                                         data.train_on_prompt, data.train_on_last_turn_only)
        lengths.append(di.row_lengths(full, kept))
        if len(shown) < n and not lengths[-1].dropped:
            ids, labels = kept["input_ids"], kept["labels"]
            segments = di.trained_segments(ids, labels, tokenizer)
            plain = "".join(f"[[{text}]]" if trained else text for text, trained in segments)
            examples.append(di.mark_trained(ids, labels, tokenizer, color=True) if color else plain)
            shown.append({"origin": row.get("origin", ""), "tokens": len(ids),
                          "trained": lengths[-1].kept_trained, "text": plain,
                          "segments": [[text, trained] for text, trained in segments]})

    report: dict[str, Any] = {"config": _config_summary(cfg, model_path)}
    report.update(di.build_report(lengths, data.cutoff_len, cfg.train.per_device_train_batch_size))
    duplicates = di.duplicate_rows(rows)
    report["duplicates"] = {"rows": len(duplicates),
                            "dropped_by_dedup": stats.cleaning.get("dropped_duplicate_rows", 0)}
    report["splits"] = planned_splits(data, len(rows))
    report.update(text_effects(data, rows, "sft", cfg.train.seed))
    report["cleaning"] = dict(stats.cleaning)
    report["examples"] = shown
    warnings = di.template_warnings(template, tokenizer)
    mismatch = check_against_tokenizer(template, tokenizer)
    if mismatch:
        warnings.append(mismatch)
    warnings += di.data_warnings(report["truncation"], duplicates, di.empty_replies(rows),
                                 stats.cleaning.get("dropped_empty_response_rows", 0))
    report["warnings"] = warnings
    return report, examples, lengths


_PREP_KEYS = ("lowercase", "unify_punctuation", "remove_stopwords", "stem")


def text_effects(data: Any, rows: list[dict], kind: str, seed: int, n: int = 3) -> dict[str, Any]:
    """What text preparation and augmentation do to the rows: counts and `n` before/after pairs."""
    import dataclasses

    out: dict[str, Any] = {}
    keys = [k for k in _PREP_KEYS if getattr(data, k)]
    if keys:
        raw, _ = load_conversations(dataclasses.replace(data, **dict.fromkeys(_PREP_KEYS, False)), kind)
        before = {r.get("origin"): r for r in raw}
        changed = [(before[r.get("origin")], r) for r in rows if r.get("origin") in before
                   and before[r.get("origin")] != r]
        out["preparation"] = {"keys": keys, "rows_changed": len(changed), "rows": len(rows),
                              "examples": [{"origin": b.get("origin"), "before": _text(a), "after": _text(b)}
                                           for a, b in changed[:n]]}
    if data.augment:
        from lathe.data.textprep import Augmenter, read_synonyms

        copies = Augmenter(tuple(data.augment), data.augment_ratio, data.augment_strength,
                           read_synonyms(data.augment_synonyms), seed).copies(rows, kind)
        out["augmentation"] = {"ops": list(data.augment), "copies": len(copies), "rows": len(rows),
                               "share": round(len(copies) / max(1, len(rows) + len(copies)), 4),
                               "examples": [{"origin": rows[i].get("origin"), "before": _text(rows[i]),
                                             "after": _text(c)} for i, c in copies[:n]]}
    return out


def _text(row: dict) -> str:
    if "contents" in row:
        text = " | ".join(f"{role}: {content}" for role, content in zip(row.get("roles", []), row["contents"]))
    else:
        text = " | ".join(str(row[k]) for k in ("text", "source", "target") if row.get(k))
    return text if len(text) <= 240 else text[:240] + "..."


def planned_splits(data: Any, n: int) -> dict[str, Any]:
    """How many of the `n` rows train, validate and test (lathe.data.splits), or the folds."""
    from lathe.data.splits import size_of

    test = 0 if data.test_dataset else size_of(data.test_size, n)
    out: dict[str, Any] = {"rows": n, "test": test if not data.test_dataset else f"test_dataset {data.test_dataset}"}
    if data.folds:
        left = n - test
        out.update(folds=data.folds, train=left - left // data.folds, eval=left // data.folds)
    else:
        val = 0 if data.eval_dataset else size_of(data.val_size, n)
        out.update(train=n - test - val, eval=val if not data.eval_dataset else f"eval_dataset {data.eval_dataset}")
    return out


def _config_summary(cfg: LatheConfig, model_path: str) -> dict[str, Any]:
    d = cfg.data
    return {
        "model": model_path,
        "dataset": list(d.dataset or []),
        "template": d.template,
        "cutoff_len": d.cutoff_len,
        "per_device_train_batch_size": cfg.train.per_device_train_batch_size,
        "train_on_prompt": d.train_on_prompt,
        "train_on_last_turn_only": d.train_on_last_turn_only,
        "packing": d.packing,
        "note": "all rows of dataset, before the val_size / test_size split, in the order they are read",
    }


def _write(path: str | os.PathLike, write) -> Path:
    """Write a report file; a path that cannot be written is the user's to fix (one line)."""
    p = Path(path)
    try:
        if p.parent != Path("."):
            p.parent.mkdir(parents=True, exist_ok=True)
        write(p)
    except OSError as e:
        raise OutputError(f"cannot write {p}: {e.strerror or e}; choose another path") from None
    return p
