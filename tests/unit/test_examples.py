"""Every shipped YAML loads and validates; the data it names exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from lathe.config import load_config
from lathe.data.loader import load_conversations
from lathe.data.templates import get_template

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads_and_its_data_resolves(path, monkeypatch):
    monkeypatch.chdir(REPO)  # examples use repo-relative paths, as the README runs them
    cfg = load_config(path)
    get_template(cfg.data.template)
    rows, stats = load_conversations(cfg.data)
    assert rows and sum(stats.rows_read.values()) == len(rows)
