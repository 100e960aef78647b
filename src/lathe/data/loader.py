"""Registry -> files -> conversations -> tokenized `datasets.Dataset` splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lathe.config.schema import DataConfig
from lathe.data.formats import alpaca_to_conversation
from lathe.data.processors import make_sft_preprocess
from lathe.data.registry import get_spec
from lathe.data.sources import read_rows
from lathe.data.templates import Template
from lathe.errors import DataError


@dataclass
class DataStats:
    rows_read: dict[str, int] = field(default_factory=dict)
    dropped_empty_response: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0


@dataclass
class SplitData:
    train: Any  # datasets.Dataset
    eval: Any | None
    stats: DataStats


def load_conversations(data: DataConfig) -> tuple[list[dict], DataStats]:
    """Every row of every named dataset as a conversation row (validated)."""
    stats = DataStats()
    rows: list[dict] = []
    for name in data.dataset or []:
        spec = get_spec(name, data.dataset_dir)
        raw = read_rows(spec.path, name)
        limit = min(x for x in (data.max_samples, spec.num_samples, len(raw)) if x is not None)
        raw = raw[:limit]
        rows += [alpaca_to_conversation(r, spec).to_row() for r in raw]
        stats.rows_read[name] = len(raw)
    return rows, stats


def load_sft_data(data: DataConfig, tokenizer: Any, template: Template, seed: int,
                  conversations: tuple[list[dict], DataStats] | None = None) -> SplitData:
    """Tokenize and split; `conversations` (from `load_conversations`) saves a second read."""
    from datasets import Dataset  # heavy import, only when data is really loaded

    rows, stats = conversations or load_conversations(data)
    ds = Dataset.from_list(rows)
    preprocess = make_sft_preprocess(template, tokenizer, data.cutoff_len, data.train_on_prompt)
    ds = ds.map(
        preprocess,
        batched=True,
        num_proc=data.preprocessing_num_workers,
        remove_columns=ds.column_names,
        desc="Tokenizing",
    )
    before = len(ds)
    ds = ds.filter(lambda ex: len(ex["input_ids"]) > 0, desc="Dropping rows with nothing to train")
    stats.dropped_empty_response = before - len(ds)
    if len(ds) == 0:
        raise DataError(
            f"every row of {', '.join(data.dataset or [])} was dropped: with cutoff_len="
            f"{data.cutoff_len} no response token is left to train; raise cutoff_len"
        )

    eval_ds = None
    if data.val_size:
        size: float | int = int(data.val_size) if data.val_size >= 1 else data.val_size
        if (int(size) if size >= 1 else max(1, round(size * len(ds)))) >= len(ds):
            raise DataError(
                f"val_size={data.val_size} leaves no training rows out of {len(ds)}; make it smaller"
            )
        split = ds.train_test_split(test_size=size, seed=seed)
        ds, eval_ds = split["train"], split["test"]

    stats.train_rows = len(ds)
    stats.eval_rows = len(eval_ds) if eval_ds is not None else 0
    lengths = [len(x) for x in ds["input_ids"]]
    stats.train_tokens = sum(lengths)
    stats.trained_tokens = sum(sum(1 for t in lab if t != -100) for lab in ds["labels"])
    return SplitData(ds, eval_ds, stats)
