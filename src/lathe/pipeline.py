"""`lathe pipeline file.yaml`: run training stages in order, each reading the last one's output.

A pipeline file names its stages and, optionally, keys shared by all of them:

    defaults:                 # merged under every stage (a stage's own keys win)
      model_name_or_path: lathe:demo
      template: chatml
    stages:
      - pt.yaml               # a stage config, relative to this file
      - sft.yaml
      - {stage: dpo, ...}     # or the keys inline

Stages run one after the other, each in its own output_dir. A stage whose output_dir
already holds a complete run (weights and all_results.json) is skipped, so a pipeline
that stopped half-way picks up where it stopped. Before a stage runs, every run
directory it reads (adapter_name_or_path, reward_model, model_name_or_path) must be
complete: a half-written input is an error, not a silent start from nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lathe.config.load import build_config, parse_overrides, read_config_file
from lathe.config.schema import LatheConfig
from lathe.errors import ConfigError
from lathe.runs import check_inputs, run_state


@dataclass(frozen=True)
class Stage:
    name: str  # "2 (sft)" in messages
    cfg: LatheConfig


def load_pipeline(path: str, overrides: list[str] | None = None) -> list[Stage]:
    """The stages of a pipeline file, each a validated config; `overrides` apply to all."""
    raw = read_config_file(path)
    unknown = set(raw) - {"defaults", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown pipeline key {sorted(unknown)[0]!r}; a pipeline file "
                          "has `stages:` (a list) and optional `defaults:` (shared keys)")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: `stages:` must be a non-empty list of stage configs (paths or mappings)")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: `defaults:` must be a mapping of key: value")
    extra = parse_overrides(overrides)
    base = Path(path).parent
    out: list[Stage] = []
    outputs: dict[str, int] = {}
    for i, item in enumerate(stages, 1):
        if isinstance(item, str):
            source = str(base / item)
            keys = read_config_file(source)
        elif isinstance(item, dict):
            source, keys = f"{path} (stage {i})", dict(item)
        else:
            raise ConfigError(f"{path}: stage {i} must be a config path or a mapping, got {type(item).__name__}")
        try:
            cfg = build_config({**defaults, **keys, **extra}, source=source)
        except ConfigError as e:
            raise ConfigError(f"{path} stage {i}: {str(e).removeprefix('ConfigError: ')}") from None
        name = f"{i} ({cfg.finetune.stage})"
        out_dir = os.path.normpath(cfg.train.output_dir or "")
        if out_dir in outputs:
            raise ConfigError(f"{path}: stages {outputs[out_dir]} and {i} both write to {out_dir}; "
                              "give each stage its own output_dir")
        outputs[out_dir] = i
        out.append(Stage(name, cfg))
    return out


def run_pipeline(path: str, overrides: list[str] | None = None, dry_run: bool = False) -> list[str]:
    """Run (or, dry_run, only plan) each stage; returns what happened to each."""
    from lathe.recipes.common import log

    stages = load_pipeline(path, overrides)
    report: list[str] = []
    for stage in stages:
        out = stage.cfg.train.output_dir
        state = run_state(out)
        if state == "complete" and not stage.cfg.train.overwrite_output_dir:
            report.append(f"stage {stage.name}: skipped, {out} is complete")
            log(report[-1])
            continue
        if state == "incomplete" and not stage.cfg.train.resume_from_checkpoint:
            raise ConfigError(
                f"stage {stage.name}: {out} holds an unfinished run; resume it with "
                "resume_from_checkpoint: true in that stage, or delete the folder to start it again"
            )
        if dry_run:
            report.append(f"stage {stage.name}: would run into {out}")
            log(report[-1])
            continue
        check_inputs(stage.cfg, f"stage {stage.name}: ")
        log(f"=== stage {stage.name}: {stage.cfg.source} -> {out}")
        from lathe.plan import decide_checkpointing
        from lathe.recipes import run

        result = run(decide_checkpointing(stage.cfg))
        report.append(f"stage {stage.name}: done, {result.output_dir}")
    if not dry_run:  # a dry run's lines were the plan; no summary repeating them
        log("Pipeline done: " + "; ".join(report))
    return report
