"""`lathe demo`: the embedded default really learns who it is, in minutes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import run_cli


def test_demo_learns_its_identity(tmp_path):
    proc = run_cli("demo", "--output-dir", str(tmp_path / "demo"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = re.search(r"Before fine-tuning: (.*)", proc.stdout).group(1)
    after = re.search(r"After fine-tuning:  (.*)", proc.stdout).group(1)
    assert "Lathe Assistant" not in before
    assert "I am Lathe Assistant" in after
    run = Path(tmp_path / "demo")
    assert (run / "adapter_model.safetensors").is_file() and (run / "training_loss.png").is_file()
    losses = re.search(r"training loss ([\d.]+) -> ([\d.]+)", proc.stdout)
    assert float(losses.group(2)) < 0.5 < float(losses.group(1))
    # the demo ships what it trained: a verified export that answers the same way
    export = tmp_path / "demo-export"
    report = json.loads((export / "export_verification.json").read_text())
    assert report["passed"] and report["chat_template_matches"]
    exported = re.search(r"asked 'Who are you\?' by `lathe chat`: (.*)", proc.stdout).group(1)
    assert "I am Lathe Assistant" in exported
