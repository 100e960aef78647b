"""File modes: what Lathe writes follows the user's umask, like any other tool.

Some writers create private files (safetensors writes weights with mode 0600, and
`tempfile.mkdtemp` makes 0700 folders), so an adapter or an export would be unreadable
to the colleagues the rest of the run is shared with. After saving, such files and
folders get the mode the user's umask gives new files.
"""

from __future__ import annotations

import os
from pathlib import Path


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
