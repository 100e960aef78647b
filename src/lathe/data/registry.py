"""`dataset_info.json`: the LLaMA-Factory schema for naming datasets.

Each entry maps a name to a source (`file_name` in `dataset_dir`, `hf_hub_url`,
`ms_hub_url`, or the older `script_url` folder), a `formatting` (alpaca, sharegpt,
openai), a `columns` map from our roles to the file's column names, `tags` for
sharegpt-style messages, `ranking: true` for preference pairs, and `num_samples`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lathe.errors import DataError, did_you_mean

FORMATTINGS = ("alpaca", "sharegpt", "openai")
COLUMN_ROLES = ("prompt", "query", "response", "history", "system", "messages", "tools",
                "chosen", "rejected", "kto_tag", "text", "label", "text_pair", "tokens", "tags", "source", "target",
                "context", "question", "answers", "anchor", "positive", "negative", "score")
TAG_NAMES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag",
             "function_tag", "system_tag")
ENTRY_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "script_url", "formatting", "columns",
              "tags", "ranking", "subset", "split", "folder", "num_samples", "system_prompt")

DEFAULT_COLUMNS: dict[str, dict[str, str | None]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output",
               "chosen": "chosen", "rejected": "rejected", "text": "text", "label": "label", "text_pair": "text_pair",
               "tokens": "tokens", "tags": "tags", "source": "source", "target": "target",
               "context": "context", "question": "question", "answers": "answers",
               "anchor": "anchor", "positive": "positive", "negative": "negative", "score": "score"},
    "sharegpt": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                 "text": "text", "label": "label"},
    "openai": {"messages": "messages", "chosen": "chosen", "rejected": "rejected",
               "text": "text", "label": "label"},
}
DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                 "assistant_tag": "gpt", "observation_tag": "observation",
                 "function_tag": "function_call", "system_tag": "system"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "observation_tag": "tool",
               "function_tag": "function_call", "system_tag": "system"},
}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: Path | None  # local file or folder; None for hub datasets
    formatting: str = "alpaca"
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    ranking: bool = False
    num_samples: int | None = None
    hub: str | None = None  # "hf" or "ms"
    hub_id: str | None = None
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    system_prompt: str | None = None  # the system message of rows that carry none

    def column(self, role: str) -> str | None:
        return self.columns.get(role)

    @property
    def info_path(self) -> str:
        return f"dataset {self.name!r}"


def load_dataset_info(dataset_dir: str | Path) -> dict[str, Any]:
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
    where = Path(dataset_dir) / "dataset_info.json"
    if name not in info:
        raise DataError(
            f"dataset {name!r} is not in {where}{did_you_mean(name, info)}; "
            f"it names: {', '.join(sorted(info)) or 'nothing'}"
        )
    entry = info[name]
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry {name!r} must be an object with a file_name")
    return spec_from_entry(name, entry, Path(dataset_dir), str(where))


def spec_from_entry(name: str, entry: dict[str, Any], dataset_dir: Path, where: str) -> DatasetSpec:
    """Validate one dataset_info.json entry; every error names the entry and key."""
    for key in entry:
        if key not in ENTRY_KEYS:
            raise DataError(
                f"{where}: dataset {name!r} has unknown key {key!r}{did_you_mean(key, ENTRY_KEYS)}"
            )
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(
            f"{where}: dataset {name!r}: formatting {formatting!r} is not one of "
            f"{', '.join(FORMATTINGS)}{did_you_mean(str(formatting), FORMATTINGS)}"
        )
    columns = dict(DEFAULT_COLUMNS[formatting])
    columns.update(_mapping(entry, "columns", COLUMN_ROLES, name, where))
    tags = dict(DEFAULT_TAGS.get(formatting, {}))
    tags.update(_mapping(entry, "tags", TAG_NAMES, name, where))
    system_prompt = entry.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise DataError(f"{where}: dataset {name!r}: system_prompt must be a string (the default "
                        "system message for this dataset's rows)")

    common = dict(name=name, formatting=formatting, columns=columns, tags=tags,
                  ranking=bool(entry.get("ranking", False)), num_samples=entry.get("num_samples"),
                  subset=entry.get("subset"), split=entry.get("split", "train"),
                  folder=entry.get("folder"), system_prompt=system_prompt or None)
    if "file_name" in entry:
        return DatasetSpec(path=dataset_dir / entry["file_name"], **common)
    if "hf_hub_url" in entry:
        return DatasetSpec(path=None, hub="hf", hub_id=entry["hf_hub_url"], **common)
    if "ms_hub_url" in entry:
        return DatasetSpec(path=None, hub="ms", hub_id=entry["ms_hub_url"], **common)
    if "script_url" in entry:
        # The older seed style named a folder (once holding a loading script). datasets 5 runs
        # no scripts, so the folder's data files are read instead.
        folder = dataset_dir / entry["script_url"]
        if not folder.is_dir():
            raise DataError(
                f"{where}: dataset {name!r}: script_url {entry['script_url']!r} is not a folder in "
                f"{dataset_dir}; loading scripts are not run, put its data files there or use file_name"
            )
        return DatasetSpec(path=folder, **common)
    raise DataError(
        f"{where}: dataset {name!r} names no source; give file_name (or hf_hub_url / ms_hub_url)"
    )


def _mapping(entry: dict, key: str, allowed: tuple[str, ...], name: str, where: str) -> dict:
    value = entry.get(key) or {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: dataset {name!r}: {key} must be an object")
    for k, v in value.items():
        if k not in allowed:
            raise DataError(
                f"{where}: dataset {name!r}: {key}.{k} is not a known {key[:-1]}"
                f"{did_you_mean(k, allowed)}; known: {', '.join(allowed)}"
            )
        if v is not None and not isinstance(v, str):
            raise DataError(f"{where}: dataset {name!r}: {key}.{k} must be a column name (a string)")
    return value


def load_hub_rows(spec: DatasetSpec, streaming: bool = False):
    """Rows of a hub dataset (real code; offline it fails with one clear line)."""
    from lathe.data.sources import Row

    if spec.hub == "ms":
        try:
            from modelscope import MsDataset  # type: ignore[import-not-found]
        except ImportError:
            raise DataError(
                f"dataset {spec.name!r} is on ModelScope ({spec.hub_id}); install the modelscope "
                "package or download it and register the local file with file_name"
            ) from None
        ds = MsDataset.load(spec.hub_id, subset_name=spec.subset, split=spec.split).to_hf_dataset()
    else:
        import datasets

        from lathe import hub

        if hub.offline() and not _in_datasets_cache(spec):
            raise DataError(
                f"dataset {spec.name!r}: cannot load {spec.hub_id} from the Hugging Face hub "
                f"({hub.why_offline()}); download it where you are online and register the "
                "local file with file_name"
            )
        try:
            ds = datasets.load_dataset(spec.hub_id, spec.subset, split=spec.split,
                                       data_dir=spec.folder, streaming=streaming)
        except Exception as e:  # network, auth, missing split: all reported the same way
            raise DataError(
                f"dataset {spec.name!r}: cannot load {spec.hub_id} from the Hugging Face hub "
                f"({type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''}); "
                "download it where you are online and register the local file with file_name"
            ) from None
    return (Row(dict(item), f"{spec.hub_id} row {i}") for i, item in enumerate(ds))


def _in_datasets_cache(spec: DatasetSpec) -> bool:
    """Whether an earlier online run left this hub dataset in the hub cache (datasets then
    reads it there with HF_HUB_OFFLINE)."""
    from huggingface_hub import scan_cache_dir

    try:
        return any(r.repo_id == spec.hub_id and r.repo_type == "dataset" for r in scan_cache_dir().repos)
    except Exception:  # noqa: BLE001 - no cache folder at all, or an unreadable one
        return False
