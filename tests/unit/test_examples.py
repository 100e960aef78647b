"""Every shipped YAML loads and validates; the data it names exists; pipelines chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lathe.config import load_config
from lathe.data.loader import load_conversations, stage_kind
from lathe.data.templates import get_template
from lathe.pipeline import load_pipeline

REPO = Path(__file__).resolve().parents[2]
ALL = sorted((REPO / "examples").rglob("*.yaml"))
PIPELINES = [p for p in ALL if "stages" in (yaml.safe_load(p.read_text()) or {})]
BENCHMARKS = [p for p in ALL if "task" in (yaml.safe_load(p.read_text()) or {})]  # `lathe eval` configs
EXPORTS = [p for p in ALL if "export_dir" in (yaml.safe_load(p.read_text()) or {})]  # `lathe export`
CHATS = [p for p in ALL if p.name.startswith("chat")]  # `lathe chat`
QUANTIZE = [p for p in ALL if p.name.startswith("quantize")]  # `lathe quantize`
SERVE = [p for p in ALL if p.name.startswith("api")]  # `lathe api`
EXAMPLES = [p for p in ALL if p not in PIPELINES + BENCHMARKS + EXPORTS + CHATS + QUANTIZE + SERVE]


def test_there_are_examples():
    assert len(EXAMPLES) >= 3 and len(PIPELINES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(REPO / "examples")) for p in EXAMPLES])
def test_example_loads_and_its_data_resolves(path, monkeypatch):
    monkeypatch.chdir(REPO)  # examples use repo-relative paths, as the README runs them
    cfg = load_config(path)
    get_template(cfg.data.template)
    names = cfg.data.dataset or cfg.data.eval_dataset  # predict-only examples read eval_dataset
    rows, stats = load_conversations(cfg.data, stage_kind(cfg.finetune.stage), names=names)
    assert rows and sum(stats.rows_read.values()) == len(rows)


@pytest.mark.parametrize("path", EXPORTS + CHATS + SERVE, ids=[p.name for p in EXPORTS + CHATS + SERVE])
def test_export_chat_and_api_examples_load(path, monkeypatch):
    monkeypatch.chdir(REPO)
    command = "export" if path in EXPORTS else "api" if path in SERVE else "chat"
    cfg = load_config(path, command=command)
    assert cfg.model.model_name_or_path and cfg.model.adapter_name_or_path == ["runs/sft_lora"]


@pytest.mark.parametrize("path", QUANTIZE, ids=[p.name for p in QUANTIZE])
def test_quantize_examples_load_and_their_data_resolves(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path, command="quantize")
    assert cfg.model.model_name_or_path == "runs/sft_lora" and cfg.train.output_dir.startswith("quantized/")
    rows, _ = load_conversations(cfg.data, "sft", names=cfg.data.eval_dataset)
    assert rows
    if cfg.quantize.calibration_dataset:
        rows, _ = load_conversations(cfg.data, "sft", names=cfg.quantize.calibration_dataset)
        assert len(rows) >= cfg.quantize.calibration_samples


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.name for p in BENCHMARKS])
def test_eval_example_loads_and_its_benchmark_resolves(path, monkeypatch):
    from lathe.eval.bench_data import load_benchmark

    monkeypatch.chdir(REPO)
    cfg = load_config(path, command="eval")
    get_template(cfg.data.template)
    bench = load_benchmark(cfg.bench.task, cfg.bench.task_dir, cfg.bench.n_shot)
    assert bench.total and all(len(s.shots) == cfg.bench.n_shot for s in bench.subjects)


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_pipeline_stages_read_what_earlier_stages_write(path, monkeypatch):
    monkeypatch.chdir(REPO)
    stages = load_pipeline(str(path))
    written: set[str] = set()
    for stage in stages:
        cfg = stage.cfg
        reads = list(cfg.model.adapter_name_or_path or []) + [cfg.align.reward_model or ""]
        for p in filter(None, reads):
            assert p in written, f"{stage.name} reads {p}, which no earlier stage writes"
        written.add(cfg.train.output_dir)
    assert [s.cfg.finetune.stage for s in stages][:2] == ["pt", "sft"]
