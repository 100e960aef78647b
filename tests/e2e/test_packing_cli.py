"""`lathe train` with packing: true, end to end on the tiny model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tests.conftest import run_cli, write_yaml


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()]


def test_packing_trains_on_fewer_rows_and_reports_padding(tmp_path, base_args):
    args = {**base_args, "packing": True, "val_size": 0.25}
    proc = run_cli("train", str(write_yaml(tmp_path / "cfg.yaml", args)))
    assert proc.returncode == 0, proc.stderr[-3000:]

    note = re.search(r"packing (\d+) examples into (\d+) rows of <= 128 tokens; "
                     r"padding ([\d.]+)% without packing, ([\d.]+)% with packing", proc.stdout)
    assert note, proc.stdout[-3000:]
    examples, rows, before, after = int(note[1]), int(note[2]), float(note[3]), float(note[4])
    assert examples == 24 and "train 24, eval 8" in proc.stdout
    assert rows < examples
    assert after < before

    run = Path(args["output_dir"])
    log = _log(run)
    losses = [h["loss"] for h in log if "loss" in h]
    assert losses[-1] < losses[0]
    assert any("eval_loss" in h for h in log)  # the packed eval split evaluates too
    # the trainer really iterated over the packed rows: 12 steps of 8 rows per epoch
    steps_per_epoch = math.ceil(rows / args["per_device_train_batch_size"])
    assert log[-1]["epoch"] == round(args["max_steps"] / steps_per_epoch, 4)
