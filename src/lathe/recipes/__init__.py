"""Training recipes, one module per stage, each with `run(cfg) -> RunResult`."""

from __future__ import annotations

import importlib

from lathe.config.schema import STAGES, LatheConfig
from lathe.recipes.common import RunResult
from lathe.runs import check_inputs


def run(cfg: LatheConfig) -> RunResult:
    """Dispatch to `lathe.recipes.<stage>.run` (the config already checked the name)."""
    assert cfg.finetune.stage in STAGES
    check_inputs(cfg)  # a run this stage reads must have finished
    recipe = importlib.import_module(f"lathe.recipes.{cfg.finetune.stage}")
    return recipe.run(cfg)
