"""Calibration rows, the activation ranges static int8 needs, and the sensitivity scan.

Calibration rows are the run's own kind of rows (its template, cutoff_len, label set),
tokenized by the stage's processor and batched by its collator: each stage recipe declares
both as `CALIBRATION`. The scan quantizes one layer at a time, measures how much the loss on
those rows moves (the output's change where the model computes no loss), and keeps the
layers that move it most in float.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from lathe.config.load import replace
from lathe.config.schema import LatheConfig
from lathe.errors import ConfigError, DataError

BATCH = 8


def calibration_stages() -> list[str]:
    from lathe.config.schema import STAGES

    return [s for s in STAGES if getattr(importlib.import_module(f"lathe.recipes.{s}"), "CALIBRATION", None)]


def stage_rows(cfg: LatheConfig, tokenizer: Any, template: Any, names: list[str]) -> Any:
    """Every row of datasets `names`, tokenized as the run's stage tokenizes them."""
    from lathe.data.loader import load_conversations, load_tokenized, stage_kind

    stage = cfg.finetune.stage
    recipe = importlib.import_module(f"lathe.recipes.{stage}")
    if not getattr(recipe, "CALIBRATION", None):
        raise ConfigError(f"calibration reads rows the way a stage trains on them, which stages "
                          f"{', '.join(calibration_stages())} declare; stage {stage} does not: use "
                          "int8_dynamic or a weight-only scheme without quantization_keep_float")
    make_processor = recipe.CALIBRATION[0]
    c = replace(cfg, dataset=names, eval_dataset=None, val_size=0.0, streaming=False, max_samples=None,
                packing=False)
    kind = stage_kind(stage)
    conversations = load_conversations(c.data, kind)
    processor = make_processor(c, conversations[0], tokenizer)[0] if make_processor else None
    return load_tokenized(c.data, tokenizer, template, c.train.seed, kind, conversations, processor).train


def calibration_batches(cfg: LatheConfig, tokenizer: Any, template: Any, model: Any) -> list[dict[str, Any]]:
    """calibration_samples rows of calibration_dataset (a seeded draw), as model inputs."""
    import inspect

    names = cfg.quantize.calibration_dataset or []
    rows = stage_rows(cfg, tokenizer, template, names)
    n = cfg.quantize.calibration_samples
    if len(rows) < n:
        raise DataError(f"calibration_dataset {', '.join(names)} holds {len(rows)} rows, fewer than "
                        f"calibration_samples: {n}; lower calibration_samples to {len(rows)} or add rows")
    rows = rows.shuffle(seed=cfg.train.seed).select(range(n))
    recipe = importlib.import_module(f"lathe.recipes.{cfg.finetune.stage}")
    collate = recipe.CALIBRATION[1](tokenizer.pad_token_id)
    accepted = set(inspect.signature(model.forward).parameters)
    batches = []
    for start in range(0, n, BATCH):
        batch = collate([rows[i] for i in range(start, min(start + BATCH, n))])
        batches.append({k: v for k, v in batch.items() if k in accepted})
    return batches


def main_output(out: Any) -> Any:
    """The tensor a model's output is about: logits (LMs, classifiers, taggers, seq2seq), the span
    start logits (QA), or the token vectors (embedding models)."""
    return next(getattr(out, k) for k in ("logits", "start_logits", "last_hidden_state")
                if getattr(out, k, None) is not None).float()


def _forward(model: Any, batches: list[dict[str, Any]]) -> tuple[float | None, list[Any]]:
    """(mean loss or None, the main output of each batch)."""
    import torch

    losses, outs = [], []
    with torch.inference_mode():
        for batch in batches:
            out = model(**batch)
            loss = getattr(out, "loss", None)
            if loss is not None:
                losses.append(float(loss))
            outs.append(main_output(out))
    return (sum(losses) / len(losses) if losses else None), outs


def activation_ranges(model: Any, names: list[str], batches: list[dict[str, Any]]) -> dict[str, dict]:
    """name -> {'in': (min, max), 'out': (min, max)} of each Linear over the calibration rows."""
    seen: dict[str, dict[str, list[float]]] = {n: {"in": [math.inf, -math.inf], "out": [math.inf, -math.inf]}
                                              for n in names}

    def hook(name: str):
        def record(module: Any, args: tuple, output: Any) -> None:
            for side, t in (("in", args[0]), ("out", output)):
                r = seen[name][side]
                r[0], r[1] = min(r[0], float(t.min())), max(r[1], float(t.max()))
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        _forward(model, batches)
    finally:
        for h in handles:
            h.remove()
    return {n: {side: tuple(r) for side, r in sides.items()} for n, sides in seen.items()
            if math.isfinite(sides["in"][0])}


def sensitivity_scan(model: Any, names: list[str], scheme: Any, batches: list[dict[str, Any]],
                     ranges: dict[str, dict] | None, group_size: int, progress: Any = None) -> list[dict[str, Any]]:
    """One row per layer: the loss change (and the output's relative error) with only that layer
    quantized; sorted most sensitive first."""
    from lathe.model.quant.convert import aliases, identity, quantize_layer, set_module

    base_loss, base_out = _forward(model, batches)
    names_of = aliases(model)
    scale = sum(float((o ** 2).mean()) for o in base_out) / len(base_out)
    table = []
    for name in names:
        original = model.get_submodule(name)
        every = names_of.get(identity(original), [name])
        q = quantize_layer(original, scheme, ranges=(ranges or {}).get(name), group_size=group_size)
        for alias in every:
            set_module(model, alias, q)
        try:
            loss, out = _forward(model, batches)
        finally:
            for alias in every:
                set_module(model, alias, original)
        err = sum(float(((a - b) ** 2).mean()) for a, b in zip(out, base_out)) / len(out) / max(scale, 1e-12)
        row = {"layer": name, "output_error": err}
        if loss is not None and base_loss is not None:
            row["loss_change"] = loss - base_loss
        table.append(row)
        if progress is not None:
            progress.update(1)
    key = "loss_change" if table and "loss_change" in table[0] else "output_error"
    table.sort(key=lambda r: -r[key])
    return table


def most_sensitive(table: list[dict[str, Any]], fraction: float) -> list[str]:
    """The layers to keep in float: the top `fraction` of the scan (at least one when fraction > 0)."""
    k = math.ceil(fraction * len(table)) if fraction > 0 else 0
    return [r["layer"] for r in table[:k]]
