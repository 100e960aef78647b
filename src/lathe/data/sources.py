"""Read rows from data files, remembering where each came from.

Supported: .json (an array of objects, or JSON lines), .jsonl, .csv, .parquet, .arrow
(as written by `datasets`), .txt (one text per line, for pretraining), .conll / .bio /
.iob (CoNLL columns: a word and its tag per line, sentences apart by a blank line), and
folders of them. Each row carries `where` ("data/x.jsonl line 17", "data/x.json row 3") so that
every later error can name the file and row.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lathe.errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".conll", ".bio", ".iob")


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str  # "data/x.jsonl line 17" or "data/x.json row 3"


def data_files(path: Path, dataset: str) -> list[Path]:
    """The files behind a dataset entry: the file itself, or a folder's supported files."""
    if not path.exists():
        raise DataError(
            f"dataset {dataset!r}: file {path} does not exist (check file_name in dataset_info.json)"
        )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise DataError(
                f"dataset {dataset!r}: folder {path} holds no data files ({', '.join(SUFFIXES)})"
            )
        return files
    if path.suffix not in SUFFIXES:
        raise DataError(
            f"dataset {dataset!r}: {path} has an unsupported type; use one of {', '.join(SUFFIXES)}"
        )
    return [path]


def iter_rows(path: Path, dataset: str) -> Iterator[Row]:
    """Rows one at a time (used for streaming); same checks as `read_rows`."""
    seen = False
    for f in data_files(path, dataset):
        for row in _READERS[f.suffix](f):
            seen = True
            yield row
    if not seen:
        raise DataError(f"dataset {dataset!r}: {path} is empty; it must hold at least one row")


def read_rows(path: Path, dataset: str) -> list[Row]:
    """All rows of a file, or of every supported file in a folder (sorted by name)."""
    return list(iter_rows(path, dataset))


def _decode(raw: bytes, path: Path, first_line: int = 1) -> str:
    """UTF-8 text, or a DataError naming the file and line of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[:e.start].count(b"\n")
        raise DataError(
            f"{path} line {line}: byte 0x{raw[e.start]:02x} is not UTF-8 text; save the file as "
            "UTF-8 (e.g. iconv -f GBK -t UTF-8 old_file > new_file)"
        ) from None


def _lines(path: Path) -> Iterator[str]:
    """The file's lines as text, read lazily, with a line-numbered error for bad bytes."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            yield _decode(raw, path, lineno)


def _read_json(path: Path) -> Iterator[Row]:
    text = _decode(path.read_bytes(), path)
    if not text.strip():
        return
    if path.suffix == ".json" and text.lstrip().startswith("{"):
        _refuse_single_object(path, text)
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        yield from _read_jsonl(path, text)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(
                f"{path} row {i}: expected an object with named columns, got {type(item).__name__}"
            )
        yield Row(item, f"{path} row {i}")


def _refuse_single_object(path: Path, text: str) -> None:
    """A .json file that is one object (not a list of rows, not JSON lines) is a mistake
    worth naming: valid JSON, but not rows."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return  # not a single object: JSON lines, read (and checked) line by line
    if not isinstance(data, dict) or "\n" not in text.strip():
        return  # one object on one line is a one-row JSON-lines file
    lists = [k for k, v in data.items() if isinstance(v, list)]
    hint = (f"; its rows may be the list under {lists[0]!r}: save that list alone"
            if lists else "")
    raise DataError(
        f"{path}: holds one JSON object, not a list of rows; write the rows as a JSON array "
        f"[{{...}}, {{...}}] or one object per line (.jsonl){hint}"
    )


def _read_jsonl(path: Path, text: str) -> Iterator[Row]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                "each line of a .jsonl file must be one JSON object"
            ) from None
        if not isinstance(item, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(item).__name__}")
        yield Row(item, f"{path} line {lineno}")


def _read_csv(path: Path) -> Iterator[Row]:
    reader = csv.DictReader(_lines(path))
    if reader.fieldnames is None:
        return
    for row in reader:
        if None in row:  # more cells than header columns
            raise DataError(
                f"{path} line {reader.line_num}: more cells than the header has columns"
            )
        yield Row(dict(row), f"{path} line {reader.line_num}")


def _read_table(path: Path) -> Iterator[Row]:
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            from datasets import Dataset

            table = Dataset.from_file(str(path)).data.table
    except Exception as e:  # pyarrow raises many types for a broken file
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]} ({str(e).splitlines()[0][:120]})") from None
    for i, item in enumerate(table.to_pylist()):
        yield Row(item, f"{path} row {i}")


def _read_txt(path: Path) -> Iterator[Row]:
    for lineno, line in enumerate(_lines(path), start=1):
        text = line.rstrip("\r\n")
        if text.strip():
            yield Row({"text": text}, f"{path} line {lineno}")


def _read_conll(path: Path) -> Iterator[Row]:
    """CoNLL / BIO columns: `word ... tag` per line (whitespace apart: the first column is the
    word, the last its tag; CoNLL-2003's POS and chunk columns between are skipped), a blank
    line between sentences, -DOCSTART- lines ignored. A row: {"tokens", "tags"}, named by the
    line its sentence starts on."""
    words: list[str] = []
    tags: list[str] = []
    start = 0
    for lineno, line in enumerate(_lines(path), start=1):
        cells = line.split()
        if not cells or cells[0] == "-DOCSTART-":
            if words:
                yield Row({"tokens": words, "tags": tags}, f"{path} line {start}")
            words, tags = [], []
            continue
        if len(cells) < 2:
            raise DataError(f"{path} line {lineno}: {line.strip()!r:.60} has no tag; a CoNLL line is a word and "
                            "its tag, whitespace apart (a blank line ends a sentence)")
        if not words:
            start = lineno
        words.append(cells[0])
        tags.append(cells[-1])
    if words:
        yield Row({"tokens": words, "tags": tags}, f"{path} line {start}")


_READERS = {
    ".json": _read_json,
    ".jsonl": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_table,
    ".arrow": _read_table,
    ".txt": _read_txt,
    ".conll": _read_conll,
    ".bio": _read_conll,
    ".iob": _read_conll,
}
