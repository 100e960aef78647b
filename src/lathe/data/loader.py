"""Registry -> files -> converted rows -> cleaning -> mixing -> tokenized splits.

Tokenization runs through `datasets.map` (batched, `preprocessing_num_workers`
processes). Its result is cached on disk under a key made of everything that
shapes it (files, their sizes and times, the dataset entries, the data keys, the
tokenizer, the template), so a second run with the same inputs loads in a moment;
`overwrite_cache: true` redoes it.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lathe.config.schema import DataConfig
from lathe.data.formats import STAGE_KIND, convert
from lathe.data.processors import (
    IGNORE_INDEX,
    make_kto_preprocess,
    make_pairwise_preprocess,
    make_prompt_preprocess,
    make_sft_preprocess,
    make_text_preprocess,
)
from lathe.data.registry import DatasetSpec, get_spec, load_hub_rows
from lathe.data.sources import Row, data_files, iter_rows
from lathe.data.templates import Template
from lathe.errors import DataError
from lathe.quiet import datasets_bars_off

CACHE_VERSION = "2"  # 2: the cache holds all training rows; splits are made on loading
STREAM_CHECK_ROWS = 100  # rows of each streamed dataset validated before training starts

# Processors by kind: each returns a batched `datasets.map` function. Stages add theirs.
Processor = Callable[..., Callable[[dict[str, list]], dict[str, list]]]
PROCESSORS: dict[str, Processor] = {
    "sft": make_sft_preprocess, "pairwise": make_pairwise_preprocess, "kto": make_kto_preprocess,
    "prompt": make_prompt_preprocess, "text": make_text_preprocess,
}
# The column whose emptiness marks a row with nothing to train (dropped and counted).
_KEY_COLUMN = {"pairwise": "chosen_input_ids"}


@dataclass
class DataStats:
    rows_read: dict[str, int] = field(default_factory=dict)
    cleaning: dict[str, int] = field(default_factory=dict)
    dropped_empty_response: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    test_rows: int = 0
    augmented_rows: int = 0  # training rows that are augmented copies (augment)
    split: str = ""  # how the splits were made (random / stratified, fold k of n), for the summary
    train_tokens: int = 0
    trained_tokens: int = 0
    cache: str = "off"  # "hit", "miss" or "off" (streaming)


@dataclass
class SplitData:
    train: Any  # datasets.Dataset or IterableDataset
    eval: Any | None
    stats: DataStats
    test: Any | None = None  # evaluated once, after training (test_size / test_dataset)


# --- reading and converting -----------------------------------------------------------

def _source_rows(spec: DatasetSpec, streaming: bool) -> Iterator[Row]:
    if spec.hub is not None:
        return load_hub_rows(spec, streaming=streaming)
    return iter_rows(spec.path, spec.name)


def _converted(spec: DatasetSpec, data: DataConfig, kind: str, limit: int | None) -> Iterator[dict]:
    """Converted rows of one dataset, at most `limit` (max_samples / num_samples)."""
    n = 0
    for row in _source_rows(spec, data.streaming):
        if limit is not None and n >= limit:
            return
        n += 1
        try:
            yield convert(row, spec, kind)
        except DataError as e:
            if data.min_response_chars > 0 and _is_empty_reply_error(e):
                yield {"_dropped": "dropped_empty_response_rows", "origin": row.where}
                continue
            raise


def _is_empty_reply_error(e: DataError) -> bool:
    text = str(e)
    return "is empty; there is nothing to train on" in text or "last reply is empty" in text


def _limit(data: DataConfig, spec: DatasetSpec) -> int | None:
    limits = [x for x in (data.max_samples, spec.num_samples) if x is not None]
    return min(limits) if limits else None


def load_conversations(data: DataConfig, kind: str = "sft",
                       names: list[str] | None = None) -> tuple[list[dict], DataStats]:
    """Every row of every named dataset, converted and cleaned (validated up front).

    Rows keep the order of `dataset`; `stats.rows_read` gives each dataset's count
    after cleaning, in order, so callers can split them again for interleaving.
    """
    stats = DataStats()
    rows: list[dict] = []
    cleaner = Cleaner(data, stats, kind)
    for name in names if names is not None else (data.dataset or []):
        spec = get_spec(name, data.dataset_dir)
        kept = [r for r in (cleaner(r) for r in _converted(spec, data, kind, _limit(data, spec))) if r]
        if not kept:
            raise DataError(f"dataset {name!r}: no row is left after cleaning; relax the cleaning keys")
        rows += kept
        stats.rows_read[name] = len(kept)
    return rows, stats


def check_streamed(data: DataConfig, kind: str) -> None:
    """For streaming: validate the first rows of each dataset before anything slow starts."""
    for name in (data.dataset or []) + (data.eval_dataset or []) + (data.test_dataset or []):
        spec = get_spec(name, data.dataset_dir)
        if spec.path is not None:
            data_files(spec.path, name)
        for _ in zip(range(STREAM_CHECK_ROWS), _converted(spec, data, kind, STREAM_CHECK_ROWS)):
            pass


# --- cleaning -------------------------------------------------------------------------

_TAG = re.compile(r"<(?!\|)[^<>]{1,200}>")  # HTML tags, not <|special|> tokens
_URL = re.compile(r"(?:https?://|www\.)\S+")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")
_TEXT_KEYS = ("contents", "system", "chosen", "rejected", "text")


class Cleaner:
    """The cleaning keys, applied row by row; counts what each step changed or removed."""

    def __init__(self, data: DataConfig, stats: DataStats, kind: str = "sft") -> None:
        from lathe.data.textprep import TextPrep

        self.data, self.stats, self.kind = data, stats, kind
        self.seen: set[str] = set()
        self.prep = TextPrep(data.lowercase, data.unify_punctuation, data.remove_stopwords, data.stem)
        self.active = any((data.strip_html, data.strip_urls, data.normalize_whitespace,
                           data.min_response_chars, data.dedup, self.prep.active))

    def _count(self, key: str) -> None:
        self.stats.cleaning[key] = self.stats.cleaning.get(key, 0) + 1

    def _clean_text(self, text: str) -> str:
        d = self.data
        if d.strip_html and _TAG.search(text):
            text = html.unescape(_TAG.sub("", text))
        if d.strip_urls:
            text = _URL.sub("", text)
        if d.normalize_whitespace or d.strip_html or d.strip_urls:
            text = _BLANKS.sub("\n\n", _SPACES.sub(" ", text)).strip()
        return text

    def __call__(self, row: dict) -> dict | None:
        if "_dropped" in row:
            self._count(row["_dropped"])
            return None
        if not self.active:
            return row
        d = self.data
        if self.prep.active:
            from lathe.data.textprep import prepare_row

            if prepare_row(row, self.kind, self.prep):
                self._count("rows_prepared")  # lowercase / unify_punctuation / remove_stopwords / stem
        if d.strip_html or d.strip_urls or d.normalize_whitespace:
            before = json.dumps(row, sort_keys=True, ensure_ascii=False)
            for key in _TEXT_KEYS:
                if key not in row:
                    continue
                value = row[key]
                row[key] = [self._clean_text(v) for v in value] if isinstance(value, list) \
                    else self._clean_text(value)
            if json.dumps(row, sort_keys=True, ensure_ascii=False) != before:
                self._count("rows_cleaned")
        if d.min_response_chars > 0 and min(map(len, _responses(row)), default=0) < d.min_response_chars:
            self._count("dropped_short_rows")
            return None
        if d.dedup:
            key = hashlib.sha1(json.dumps({k: v for k, v in row.items() if k != "origin"},
                                          sort_keys=True, ensure_ascii=False).encode()).hexdigest()
            if key in self.seen:
                self._count("dropped_duplicate_rows")
                return None
            self.seen.add(key)
        return row


def _responses(row: dict) -> list[str]:
    if "chosen" in row:
        return [row["chosen"].strip(), row["rejected"].strip()]
    if "contents" in row and row.get("roles") and row["roles"][-1] in ("assistant", "function"):
        return [row["contents"][-1].strip()]
    if "text" in row:
        return [row["text"].strip()]
    return []


# --- mixing ---------------------------------------------------------------------------

def _per_dataset(rows: list[dict], counts: dict[str, int]) -> list[list[dict]]:
    out, start = [], 0
    for n in counts.values():
        out.append(rows[start:start + n])
        start += n
    return out


def _mix(parts: list[Any], data: DataConfig, seed: int) -> Any:
    from datasets import concatenate_datasets, interleave_datasets

    if len(parts) == 1:
        return parts[0]
    if data.mix_strategy == "concat":
        return concatenate_datasets(parts)
    return interleave_datasets(
        parts,
        probabilities=data.interleave_probs,
        seed=seed,
        stopping_strategy="first_exhausted" if data.mix_strategy == "interleave_under" else "all_exhausted",
    )


# --- tokenizing, with a cache -----------------------------------------------------------

def load_sft_data(data: DataConfig, tokenizer: Any, template: Template, seed: int,
                  conversations: tuple[list[dict], DataStats] | None = None) -> SplitData:
    return load_tokenized(data, tokenizer, template, seed, "sft", conversations)


def load_stage_data(stage: str, data: DataConfig, tokenizer: Any, template: Template, seed: int,
                    conversations: tuple[list[dict], DataStats] | None = None,
                    task: TaskProcessor | None = None) -> SplitData:
    """Tokenized splits in the shape `stage` consumes (see formats.STAGE_KIND)."""
    return load_tokenized(data, tokenizer, template, seed, stage_kind(stage), conversations, task)


@dataclass(frozen=True)
class TaskProcessor:
    """A task stage's own processor (its label set decided from the rows first): the batched
    map function, and a text that goes into the cache key (what else shapes the rows)."""

    preprocess: Callable[[dict[str, list]], dict[str, list]]
    key: str


def load_tokenized(data: DataConfig, tokenizer: Any, template: Template, seed: int, kind: str,
                   conversations: tuple[list[dict], DataStats] | None = None,
                   task: TaskProcessor | None = None) -> SplitData:
    """Tokenized train/eval splits; `conversations` (from `load_conversations`) saves a re-read."""
    if task is not None:
        preprocess = task.preprocess
    else:
        preprocess = PROCESSORS[kind](template, tokenizer, data.cutoff_len, data.train_on_prompt,
                                      data.train_on_last_turn_only)
    if data.streaming:
        return _load_streaming(data, preprocess, kind, seed)

    from datasets import Dataset, load_from_disk

    key = cache_key(data, tokenizer, template, seed, kind + (f"|{task.key}" if task else ""))
    cache_dir = cache_root() / "data" / key
    if cache_dir.is_dir() and not data.overwrite_cache:
        stats = DataStats(**json.loads((cache_dir / "stats.json").read_text()))
        stats.cache = "hit"
        with datasets_bars_off():
            train, ev, test = (load_from_disk(str(cache_dir / part)) if (cache_dir / part).is_dir() else None
                               for part in ("train", "eval", "test"))
    else:
        rows, stats = conversations or load_conversations(data, kind)
        ev = test = None
        if data.eval_dataset:
            eval_rows, _ = load_conversations(data, kind, names=data.eval_dataset)
            ev = _tokenize(Dataset.from_list(eval_rows), preprocess, data, DataStats(), kind)
        if data.test_dataset:
            test_rows, _ = load_conversations(data, kind, names=data.test_dataset)
            test = _tokenize(Dataset.from_list(test_rows), preprocess, data, DataStats(), kind)
        if data.dataset:
            parts = [Dataset.from_list(part) for part in _augmented(_per_dataset(rows, stats.rows_read), data,
                                                                    kind, seed)]
            train = _tokenize(_mix(parts, data, seed), preprocess, data, stats, kind)
        else:  # evaluate / predict only (do_train: false, a config check): the eval rows stand in
            train = ev
        stats.cache = "miss"
        _save_cache(cache_dir, {"train": train, "eval": ev, "test": test}, stats)
    if data.dataset:
        train, ev, test = split(train, ev, test, data, seed, stats)
    _count(train, ev, test, stats)
    return SplitData(train, ev, stats, test)


_AUG_COLUMNS = ("_row", "_aug")  # augmented rows: the row they copy, and whether they are a copy


def _augmented(parts: list[list[dict]], data: DataConfig, kind: str, seed: int) -> list[list[dict]]:
    """Each dataset's rows and their augmented copies, marked (_row, _aug) so that the split
    keeps a copy with its row and takes no copy into the validation or test rows."""
    if not data.augment:
        return parts
    from lathe.data.textprep import Augmenter, read_synonyms

    augmenter = Augmenter(tuple(data.augment), data.augment_ratio, data.augment_strength,
                          read_synonyms(data.augment_synonyms), seed)
    out, start = [], 0
    for rows in parts:
        marked = [{**row, "_row": start + i, "_aug": 0} for i, row in enumerate(rows)]
        marked += [{**copy, "_row": start + i, "_aug": 1} for i, copy in augmenter.copies(rows, kind)]
        out.append(marked)
        start += len(rows)
    return out


def split(train: Any, ev: Any | None, test: Any | None, data: DataConfig, seed: int,
          stats: DataStats) -> tuple[Any, Any | None, Any | None]:
    """val_size / test_size / the fold, taken from the tokenized training rows (lathe.data.splits);
    a registered eval_dataset / test_dataset stays as it is. Augmented copies stay with their
    row and only in the training rows."""
    from lathe.data.splits import plan

    test_size = data.test_size if test is None else 0.0
    val_size = data.val_size if ev is None else 0.0
    augmented = "_aug" in train.column_names
    if not (test_size or val_size or data.folds):
        return _count_augmented(train, stats), ev, test
    names = ", ".join(data.dataset or [])
    labels = _stratify_labels(train, data, names)
    groups = None
    if augmented:
        groups = train["_row"]
    elif "origin" in train.column_names:  # rows cut from one example (QA windows) stay together
        origins = train["origin"]
        groups = origins if len(set(origins)) < len(origins) else None
    p = plan(len(train), seed=seed, val_size=val_size, test_size=test_size, folds=data.folds, fold=data.fold,
             labels=labels, groups=groups, where=names)
    how = "stratified by label" if p.stratified else "random"
    stats.split = f"fold {data.fold or 1} of {data.folds}, {how}" if data.folds else how
    if data.folds:  # a fold run only trains and validates: the test set waits for the final run
        test = None

    flags = train["_aug"] if augmented else None

    def pick(idx: list[int], copies: bool = False) -> Any:
        if flags is not None and not copies:
            idx = [i for i in idx if not flags[i]]
        part = train.select(idx, keep_in_memory=True)
        return part.remove_columns(list(_AUG_COLUMNS)) if flags is not None and not copies else part

    return (_count_augmented(pick(p.train, copies=True), stats), pick(p.val) if p.val else ev,
            pick(p.test) if p.test and not data.folds else test)


def _count_augmented(train: Any, stats: DataStats) -> Any:
    """The training rows without the augmentation marks; how many of them are copies."""
    if "_aug" not in train.column_names:
        return train
    stats.augmented_rows = sum(train["_aug"])
    return train.remove_columns(list(_AUG_COLUMNS))


def _stratify_labels(train: Any, data: DataConfig, names: str) -> list[Any] | None:
    """One class per row to stratify by: stratify: true asks for it (and refuses rows without
    one); unset, folds of a single-label classifier are stratified."""
    if data.stratify is False or (data.stratify is None and not data.folds):
        return None
    column = train.features.get("labels") if "labels" in train.column_names else None
    dtype = getattr(column, "dtype", None)
    if dtype not in ("int64", "int32"):
        if data.stratify:
            kind = ("regression" if dtype and dtype.startswith("float") else
                    "multi-label or per-token" if column is not None else "no")
            raise DataError(f"stratify: true splits by class, and the rows of {names} have {kind} labels "
                            "(one class per row is needed: stage cls, single-label); remove stratify")
        return None
    return list(train["labels"])


def _tokenize(ds: Any, preprocess: Callable, data: DataConfig, stats: DataStats, kind: str) -> Any:
    ds = ds.map(preprocess, batched=True, batch_size=data.preprocessing_batch_size,
                num_proc=data.preprocessing_num_workers,
                remove_columns=[c for c in ds.column_names if c not in _AUG_COLUMNS],  # one row out per row in
                load_from_cache_file=False, desc="Tokenizing")
    before = len(ds)
    with datasets_bars_off():
        ds = ds.filter(lambda ids: len(ids) > 0, input_columns=_KEY_COLUMN.get(kind, "input_ids"),
                       num_proc=data.preprocessing_num_workers)
    stats.dropped_empty_response += before - len(ds)
    if len(ds) == 0:
        raise DataError(
            f"every row of {', '.join(data.dataset or [])} was dropped: with cutoff_len="
            f"{data.cutoff_len} no response token is left to train; raise cutoff_len"
        )
    return ds


def _count(train: Any, ev: Any | None, test: Any | None, stats: DataStats) -> None:
    stats.train_rows = len(train)
    stats.eval_rows = len(ev) if ev is not None else 0
    stats.test_rows = len(test) if test is not None else 0
    stats.train_tokens = stats.trained_tokens = 0
    prefixes = ("chosen_", "rejected_") if "chosen_input_ids" in train.column_names else ("",)
    for p in prefixes:
        stats.train_tokens += sum(len(x) for x in train[f"{p}input_ids"])
        if f"{p}labels" in train.column_names and _token_labels(train, f"{p}labels"):
            stats.trained_tokens += sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in train[f"{p}labels"])


def _token_labels(ds: Any, column: str) -> bool:
    """Whether `column` holds a label per token (a list of ids), not one per row."""
    feature = ds.features[column]
    return type(feature).__name__ in ("List", "Sequence", "LargeList") and \
        getattr(getattr(feature, "feature", None), "dtype", "") in ("int64", "int32")


def _load_streaming(data: DataConfig, preprocess: Callable, kind: str, seed: int) -> SplitData:
    from datasets import IterableDataset

    stats = DataStats(cache="off")
    cleaner = Cleaner(data, stats, kind)

    def stream(names: list[str]) -> list[Any]:
        parts = []
        for name in names:
            spec = get_spec(name, data.dataset_dir)

            def gen(spec=spec):
                for row in _converted(spec, data, kind, _limit(data, spec)):
                    kept = cleaner(row)
                    if kept:
                        yield kept
            parts.append(IterableDataset.from_generator(gen))
        return parts

    def tokenize(ds: Any) -> Any:
        first = next(iter(ds.take(1)), None)
        columns = list(first) if first else None
        ds = ds.map(preprocess, batched=True, batch_size=data.preprocessing_batch_size,
                    remove_columns=columns)
        return ds.filter(lambda ids: len(ids) > 0, input_columns=_KEY_COLUMN.get(kind, "input_ids"))

    train = tokenize(_mix(stream(data.dataset or []), data, seed))
    ev = test = None
    if data.test_dataset:
        test = tokenize(_mix(stream(data.test_dataset), data, seed))
    elif data.test_size:  # a count (a config check): the first rows of the stream
        n = int(data.test_size)
        test, train = train.take(n), train.skip(n)
    if data.eval_dataset:
        ev = tokenize(_mix(stream(data.eval_dataset), data, seed))
    elif data.val_size:
        n = int(data.val_size)
        ev, train = train.take(n), train.skip(n)
    return SplitData(train, ev, stats, test)


def cache_root() -> Path:
    return Path(os.environ.get("LATHE_HOME", Path.home() / ".cache" / "lathe")) / "cache"


# Keys that change how fast the data is made, not what it is.
_NOT_IN_KEY = {"overwrite_cache", "preprocessing_num_workers", "preprocessing_batch_size",
               # the cache holds every training row: splits and folds are taken on loading
               "val_size", "test_size", "stratify", "folds", "fold"}


def cache_key(data: DataConfig, tokenizer: Any, template: Template, seed: int, kind: str) -> str:
    """A hash of everything that shapes the tokenized data."""
    from lathe import __version__

    h = hashlib.sha256()
    h.update(f"{CACHE_VERSION}|{__version__}|{kind}|{seed}|{repr(template)}".encode())
    shaping = {k: v for k, v in asdict(data).items() if k not in _NOT_IN_KEY}
    h.update(json.dumps(shaping, sort_keys=True, default=str).encode())
    for name in (data.dataset or []) + (data.eval_dataset or []) + (data.test_dataset or []):
        spec = get_spec(name, data.dataset_dir)
        h.update(repr(spec).encode())
        if spec.path is not None:
            for f in data_files(spec.path, name):
                st = f.stat()
                h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    if data.augment_synonyms and Path(data.augment_synonyms).expanduser().is_file():  # its words shape the copies
        h.update(Path(data.augment_synonyms).expanduser().read_bytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr(sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())  # `template: auto` renders with it
    return h.hexdigest()[:24]


def _save_cache(cache_dir: Path, parts: dict[str, Any], stats: DataStats) -> None:
    """Write atomically: a crash or a second process never leaves a half-written cache."""
    tmp: Path | None = None
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir.parent))
        with datasets_bars_off():
            for name, part in parts.items():
                if part is not None:
                    part.save_to_disk(str(tmp / name))
        (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
        if cache_dir.exists():
            shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(tmp, cache_dir)
    except OSError:
        if tmp is not None:  # another process won, or the disk is read-only: only speed is lost
            shutil.rmtree(tmp, ignore_errors=True)


def stage_kind(stage: str) -> str:
    return STAGE_KIND.get(stage, "sft")
