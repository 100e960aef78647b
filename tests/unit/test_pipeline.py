"""Pipelines: parsing, which runs are complete, inputs that did not finish, skipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lathe.config import load_config
from lathe.errors import ConfigError
from lathe.pipeline import load_pipeline, run_pipeline
from lathe.runs import check_inputs, run_state

BASE = {"model_name_or_path": "lathe:demo", "dataset": "identity", "template": "chatml"}


def _run_dir(path: Path, done: bool = True, weights: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("stage: sft\n")
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"x")
    if done:
        (path / "all_results.json").write_text(json.dumps({"train_loss": 1.0}))
    return path


def _pipeline(tmp_path: Path, stages: list, defaults: dict | None = None) -> str:
    p = tmp_path / "pipe.yaml"
    body = {"stages": stages} | ({"defaults": defaults} if defaults else {})
    p.write_text(yaml.safe_dump(body))
    return str(p)


def test_run_state(tmp_path):
    assert run_state(tmp_path / "nope") == "absent"
    (tmp_path / "empty").mkdir()
    assert run_state(tmp_path / "empty") == "empty"
    assert run_state(_run_dir(tmp_path / "done")) == "complete"
    assert run_state(_run_dir(tmp_path / "crashed", done=False)) == "incomplete"
    assert run_state(_run_dir(tmp_path / "no-weights", weights=False)) == "incomplete"


def test_an_unfinished_input_run_is_refused(tmp_path):
    sft = _run_dir(tmp_path / "sft", done=False)
    cfg = load_config({**BASE, "stage": "dpo", "adapter_name_or_path": str(sft),
                       "output_dir": str(tmp_path / "dpo")})
    with pytest.raises(ConfigError, match=r"adapter_name_or_path .*sft is incomplete .*did not finish"):
        check_inputs(cfg)
    (sft / "all_results.json").write_text("{}")
    check_inputs(cfg)  # finished now


def test_missing_reward_model_run_is_named(tmp_path):
    cfg = load_config({**BASE, "stage": "ppo", "reward_model": str(tmp_path / "rm"),
                       "output_dir": str(tmp_path / "ppo")})
    with pytest.raises(ConfigError, match=r"reward_model .*rm does not exist; run the stage"):
        check_inputs(cfg)


def test_a_folder_lathe_did_not_write_is_taken_as_is(tmp_path):
    downloaded = tmp_path / "my-adapter"
    downloaded.mkdir()
    (downloaded / "adapter_config.json").write_text("{}")
    cfg = load_config({**BASE, "adapter_name_or_path": str(downloaded), "output_dir": str(tmp_path / "o")})
    check_inputs(cfg)


def test_pipeline_file_errors_name_the_stage(tmp_path):
    with pytest.raises(ConfigError, match="stages:"):
        load_pipeline(_pipeline(tmp_path, []))
    bad = _pipeline(tmp_path, [{**BASE, "output_dir": "a"}, {**BASE, "lora_rnak": 4, "output_dir": "b"}])
    with pytest.raises(ConfigError, match=r"stage 2: .*lora_rnak .*did you mean lora_rank"):
        load_pipeline(bad)
    same = _pipeline(tmp_path, [{**BASE, "output_dir": "a"}, {**BASE, "stage": "dpo", "output_dir": "a"}])
    with pytest.raises(ConfigError, match="both write to a"):
        load_pipeline(same)


def test_defaults_apply_under_each_stage_and_paths_resolve(tmp_path):
    (tmp_path / "one.yaml").write_text(yaml.safe_dump({"stage": "pt", "dataset": "corpus", "output_dir": "r/pt"}))
    path = _pipeline(tmp_path, ["one.yaml", {"dataset": "identity", "output_dir": "r/sft", "cutoff_len": 64}],
                     defaults={"model_name_or_path": "lathe:demo", "cutoff_len": 128})
    stages = load_pipeline(path, ["seed=7"])
    assert [s.cfg.finetune.stage for s in stages] == ["pt", "sft"]
    assert [s.cfg.data.cutoff_len for s in stages] == [128, 64]  # a stage's own keys win
    assert {s.cfg.train.seed for s in stages} == {7}  # command-line overrides reach every stage


def test_complete_stages_are_skipped_and_unfinished_ones_stop_the_pipeline(tmp_path, capsys):
    _run_dir(tmp_path / "pt")
    stages = [{**BASE, "stage": "pt", "dataset": "c", "output_dir": str(tmp_path / "pt")},
              {**BASE, "output_dir": str(tmp_path / "sft")}]
    report = run_pipeline(_pipeline(tmp_path, stages), dry_run=True)
    assert report[0].startswith("stage 1 (pt): skipped") and report[1].startswith("stage 2 (sft): would run")
    printed = capsys.readouterr().out
    assert printed.count("stage 1 (pt)") == 1 and printed.count("stage 2 (sft)") == 1  # the plan, once
    _run_dir(tmp_path / "sft", done=False)
    with pytest.raises(ConfigError, match=r"stage 2 \(sft\): .*unfinished run; resume it"):
        run_pipeline(_pipeline(tmp_path, stages), dry_run=True)
