"""Output folders: never clobbered, published whole, with the user's file modes.

A verb that writes a model folder (export, quantize) refuses one that holds files before
anything slow, writes into a temp folder beside it, and renames it into place when complete
(`check_free_folder`, `publish_folder`).

Some writers create private files (safetensors writes weights with mode 0600, and
`tempfile.mkdtemp` makes 0700 folders), so an adapter or an export would be unreadable
to the colleagues the rest of the run is shared with. After saving, such files and
folders get the mode the user's umask gives new files.
"""

from __future__ import annotations

import os
from pathlib import Path

from lathe.errors import OutputError


def check_free_folder(out: Path, key: str) -> None:
    """`out` (the value of config key `key`) is new or an empty folder, else one OutputError line."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{key} {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise OutputError(f"{key} {out} already holds files ({held}, ...); choose a new or empty {key} "
                          "(nothing was written)")


def publish_folder(tmp: Path, out: Path, key: str) -> None:
    """Rename the finished temp folder to `out` (an empty `out` is replaced), with the user's modes."""
    check_free_folder(out, key)  # again: something may have been written there meanwhile
    if out.is_dir():
        out.rmdir()
    respect_umask(tmp)  # mkdtemp made it 0700 and safetensors writes 0600
    os.replace(tmp, out)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def respect_umask(folder: str | os.PathLike) -> None:
    """Give private files (0600) and folders (0700) under `folder`, itself included, the
    modes the umask gives new ones (0644 / 0755 with the usual 022)."""
    mask = current_umask()
    root = Path(folder)
    if not root.is_dir():
        return
    for path in [root, *root.rglob("*")]:
        try:
            mode = path.stat().st_mode & 0o777
            if path.is_dir() and mode == 0o700:
                path.chmod(0o777 & ~mask)
            elif path.is_file() and mode == 0o600:
                path.chmod(0o666 & ~mask)
        except OSError:
            continue  # not ours to change (another user's file in a shared folder)
