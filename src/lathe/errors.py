"""Errors meant for people.

Every mistake a user can make (a config key, a data row, a model path) raises a
`LatheError` subclass whose message is one line: what is wrong, where, and how to
fix it. The CLI prints that line and exits with code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LatheError(Exception):
    """Base class of errors caused by user input (exit code 2 in the CLI)."""

    kind = "Error"

    def __str__(self) -> str:
        return f"{self.kind}: {super().__str__()}"


class ConfigError(LatheError):
    kind = "ConfigError"


class DataError(LatheError):
    kind = "DataError"


class ModelError(LatheError):
    kind = "ModelError"


class OutputError(LatheError):
    kind = "OutputError"


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean x?)' for the closest candidates, or ''."""
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(close) + "?)"
