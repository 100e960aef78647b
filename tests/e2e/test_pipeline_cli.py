"""`lathe pipeline` end to end on the tiny model: pt -> sft -> rm -> ppo and sft -> dpo,
each stage reading the previous one's output; a second run skips finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import run_cli, write_yaml


def _data(root: Path, data_dir: Path) -> Path:
    """The identity set, preference pairs and a text corpus in one dataset_info.json."""
    rows = json.loads((data_dir / "identity.json").read_text())[:24]
    pairs = [{"instruction": r["instruction"], "chosen": r["output"], "rejected": "I do not know."}
             for r in rows]
    d = root / "data"
    d.mkdir()
    (d / "identity.json").write_text(json.dumps(rows))
    (d / "pairs.json").write_text(json.dumps(pairs))
    (d / "corpus.txt").write_text("\n".join(r["output"] for r in rows))
    info = {"identity": {"file_name": "identity.json"}, "corpus": {"file_name": "corpus.txt"},
            "pairs": {"file_name": "pairs.json", "ranking": True}}
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def test_pipeline_runs_every_stage_then_skips_them(tmp_path, tiny_model, data_dir):
    d = _data(tmp_path, data_dir)
    runs = tmp_path / "runs"
    common = {"model_name_or_path": str(tiny_model), "dataset_dir": str(d), "template": "chatml",
              "cutoff_len": 64, "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1,
              "save_steps": 1000, "learning_rate": 1e-3}
    stages = [
        {"stage": "pt", "dataset": "corpus", "output_dir": str(runs / "pt")},
        {"stage": "sft", "dataset": "identity", "adapter_name_or_path": str(runs / "pt"),
         "output_dir": str(runs / "sft")},
        {"stage": "rm", "dataset": "pairs", "adapter_name_or_path": str(runs / "sft"),
         "output_dir": str(runs / "rm")},
        {"stage": "ppo", "dataset": "identity", "adapter_name_or_path": str(runs / "sft"),
         "reward_model": str(runs / "rm"), "max_new_tokens": 8, "ppo_epochs": 1,
         "output_dir": str(runs / "ppo")},
        {"stage": "dpo", "dataset": "pairs", "adapter_name_or_path": str(runs / "sft"),
         "output_dir": str(runs / "dpo")},
    ]
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({"defaults": common, "stages": stages}))

    proc = run_cli("pipeline", str(pipe), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("pt", "sft", "rm", "ppo", "dpo"):
        out = runs / name
        assert (out / "all_results.json").is_file(), name
        assert (out / "adapter_model.safetensors").is_file(), name
        assert f"stage {['pt', 'sft', 'rm', 'ppo', 'dpo'].index(name) + 1} ({name}): done" in proc.stdout
    assert (runs / "rm" / "reward_model.json").is_file()
    stamp = (runs / "dpo" / "all_results.json").stat().st_mtime_ns

    again = run_cli("pipeline", str(pipe), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [line for line in again.stdout.splitlines() if line.startswith("stage ") and "skipped" in line]
    assert len(skipped) == 5, again.stdout[-2000:]
    assert (runs / "dpo" / "all_results.json").stat().st_mtime_ns == stamp  # nothing rewritten


def test_a_stage_reading_an_unfinished_run_is_refused(tmp_path, tiny_model, data_dir):
    d = _data(tmp_path, data_dir)
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.yaml").write_text("stage: sft\n")
    (sft / "adapter_config.json").write_text("{}")  # a crash before the weights were written
    cfg = write_yaml(tmp_path / "dpo.yaml", {
        "model_name_or_path": str(tiny_model), "stage": "dpo", "dataset": "pairs", "dataset_dir": str(d),
        "template": "chatml", "adapter_name_or_path": str(sft), "output_dir": str(tmp_path / "dpo")})
    proc = run_cli("train", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "adapter_name_or_path" in lines[0] and "is incomplete" in lines[0]
    assert not (tmp_path / "dpo").exists()
