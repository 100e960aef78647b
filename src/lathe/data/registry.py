"""`dataset_info.json`: the LLaMA-Factory schema for naming datasets.

Each entry maps a name to a file (or folder) in `dataset_dir`, a `formatting`, and a
`columns` map from our roles (prompt, query, response, history, system) to the
column names the file uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lathe.errors import DataError, did_you_mean

ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "system": None,
}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: Path  # file or folder
    formatting: str = "alpaca"
    columns: dict[str, str | None] = field(default_factory=dict)
    num_samples: int | None = None

    def column(self, role: str) -> str | None:
        return self.columns.get(role)


def load_dataset_info(dataset_dir: str | Path) -> dict[str, dict]:
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; dataset_dir must hold a dataset_info.json that names "
            "your datasets (see data/dataset_info.json in the Lathe repo for the layout)"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: the top level must be an object of name -> dataset entry")
    return info


def get_spec(name: str, dataset_dir: str | Path) -> DatasetSpec:
    info = load_dataset_info(dataset_dir)
    info_path = Path(dataset_dir) / "dataset_info.json"
    if name not in info:
        raise DataError(
            f"dataset {name!r} is not in {info_path}{did_you_mean(name, info)}; "
            f"it names: {', '.join(sorted(info)) or 'nothing'}"
        )
    entry = info[name]
    if not isinstance(entry, dict):
        raise DataError(f"{info_path}: entry {name!r} must be an object with a file_name")
    if "hf_hub_url" in entry or "ms_hub_url" in entry or "script_url" in entry:
        raise DataError(
            f"{info_path}: dataset {name!r} comes from a hub; hub datasets are not supported "
            "yet, download it and register the local file with file_name"
        )
    if "file_name" not in entry:
        raise DataError(f"{info_path}: dataset {name!r} has no file_name")
    formatting = entry.get("formatting", "alpaca")
    if formatting != "alpaca":
        raise DataError(
            f"{info_path}: dataset {name!r} has formatting {formatting!r}; "
            "only alpaca is supported so far"
        )
    columns = dict(ALPACA_COLUMNS)
    user_columns = entry.get("columns") or {}
    if not isinstance(user_columns, dict):
        raise DataError(f"{info_path}: dataset {name!r}: columns must be an object")
    for role, column in user_columns.items():
        if role not in ALPACA_COLUMNS:
            raise DataError(
                f"{info_path}: dataset {name!r}: columns.{role} is not an alpaca column role"
                f"{did_you_mean(role, ALPACA_COLUMNS)}; roles: {', '.join(ALPACA_COLUMNS)}"
            )
        columns[role] = column
    return DatasetSpec(
        name=name,
        path=Path(dataset_dir) / entry["file_name"],
        formatting=formatting,
        columns=columns,
        num_samples=entry.get("num_samples"),
    )
