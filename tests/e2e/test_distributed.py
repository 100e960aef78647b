"""The same command under torchrun with 2 CPU processes (gloo): real DDP, rank 0 writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import run_cli, write_yaml


def test_two_processes_share_the_data_and_write_once(tmp_path, base_args):
    args = {**base_args, "max_samples": 64, "max_steps": 4, "logging_steps": 1,
            "val_size": 16, "plot_loss": True}
    cfg = write_yaml(tmp_path / "cfg.yaml", args)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "-m", "lathe"]
    proc = run_cli("train", str(cfg), launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(args["output_dir"])
    records = [json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one writer: no duplicated lines
    # 48 training rows, batch 8 per process: with DDP an epoch is 3 steps, not 6
    assert records[-1]["epoch"] > 1.0
    assert proc.stdout.count("Lathe | stage sft") == 1 and "2 process(es)" in proc.stdout
    assert (run / "adapter_model.safetensors").is_file() and (run / "training_loss.png").is_file()
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 4
