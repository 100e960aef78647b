"""Read rows from data files, remembering where each came from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lathe.errors import DataError

SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str  # "data/x.jsonl line 17" or "data/x.json row 3"


def read_rows(path: Path, dataset: str) -> list[Row]:
    """All rows of a file, or of every .json/.jsonl file in a folder (sorted by name)."""
    if not path.exists():
        raise DataError(f"dataset {dataset!r}: file {path} does not exist (check file_name in dataset_info.json)")
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"dataset {dataset!r}: folder {path} holds no {' or '.join(SUFFIXES)} files")
    rows: list[Row] = []
    for f in files:
        rows += _read_file(f, dataset)
    if not rows:
        raise DataError(f"dataset {dataset!r}: {path} is empty; it must hold at least one row")
    return rows


def _read_file(path: Path, dataset: str) -> list[Row]:
    if path.suffix not in SUFFIXES:
        raise DataError(
            f"dataset {dataset!r}: {path} has an unsupported type; use {' or '.join(SUFFIXES)}"
        )
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"dataset {dataset!r}: {path} is empty; it must hold at least one row")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        return _read_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    rows = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path} row {i}: expected an object with named columns, got {type(item).__name__}")
        rows.append(Row(item, f"{path} row {i}"))
    return rows


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
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
        rows.append(Row(item, f"{path} line {lineno}"))
    return rows
