"""The Python entry points: `lathe.train(...)` does what `lathe train` does."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lathe.config.load import load_config, parse_overrides


def train(config: str | os.PathLike | Mapping[str, Any] | None = None,
          overrides: list[str] | Mapping[str, Any] | None = None, **keys: Any):
    """Train from a YAML/JSON path or a dict; `overrides`/`keys` win over the file.

    Returns a `RunResult` with the output directory, metrics, the trained model and
    the tokenizer.
    """
    from lathe.quiet import quiet_warnings
    from lathe.recipes import run
    from lathe.recipes.common import repeat_target

    quiet_warnings()

    extra = parse_overrides(overrides)
    extra.update(keys)
    cfg = load_config(config, extra)
    cfg = repeat_target(cfg, set(extra))
    return run(cfg)
