"""Is a weights file or a checkpoint whole? Cheap checks (headers and sizes, no tensors
loaded) that turn "a download cut short", "an HTML page saved as model.safetensors" and
"a checkpoint killed while saving" into one line naming the file, before anything loads.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB

# What the Trainer writes into a checkpoint, besides the weights.
_STATE = "trainer_state.json"
_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
            "adapter_model.bin", "pytorch_model.bin", "pytorch_model.bin.index.json")


def safetensors_problem(path: Path) -> str | None:
    """None when `path` is a complete safetensors file; else what is wrong with it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path} is empty or cut short ({size} bytes)"
        n = int.from_bytes(head, "little")
        if n <= _MAX_HEADER and n > size - 8 and f.read(1) == b"{":
            return f"{path} is cut short: {size:,} bytes, less than its own header ({n:,} bytes)"
        if n > _MAX_HEADER or n > size - 8:
            start = head[:8].decode("latin-1").strip()
            looks = " (it starts like an HTML page: a download that saved an error page?)" \
                if start.lower().startswith(("<!doc", "<html", "<head")) else ""
            return f"{path} is not a safetensors file{looks}"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            return f"{path} is not a safetensors file (its header is not readable)"
    if not isinstance(header, dict):
        return f"{path} is not a safetensors file (its header is not a table of tensors)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return f"{path} is not a safetensors file (its header is not a table of tensors)"
    if 8 + n + end > size:
        return f"{path} is cut short: {size:,} bytes, but its tensors need {8 + n + end:,}"
    return None


def pickle_problem(path: Path) -> str | None:
    """torch.save files (optimizer.pt, rng_state.pth, *.bin) are zip archives; a cut-off
    one has no central directory."""
    if not zipfile.is_zipfile(path):
        return f"{path} is cut short or is not a file torch.save wrote"
    return None


def weights_problem(folder: Path) -> str | None:
    """The first broken weights file in a model or adapter folder, or None."""
    for f in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return problem
    for f in sorted(folder.glob("*.bin")):
        if f.name != "training_args.bin":
            problem = pickle_problem(f)
            if problem:
                return problem
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """None when a checkpoint-N folder can be resumed from; else why not (one clause)."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    if not (folder / _STATE).is_file():
        return f"{folder} has no {_STATE}: it was cut off while being saved"
    try:
        json.loads((folder / _STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return f"{folder / _STATE} is cut short or not JSON"
    if not any((folder / w).is_file() for w in _WEIGHTS):
        return f"{folder} holds no weights ({', '.join(_WEIGHTS[:2])} ...)"
    problem = weights_problem(folder)
    if problem:
        return problem
    for f in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        problem = pickle_problem(f)
        if problem:
            return problem
    return None
