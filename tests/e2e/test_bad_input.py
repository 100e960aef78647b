"""Every user mistake: one clear line on stderr, exit code 2, no traceback, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, run_main, write_yaml


def _fails(tmp_path: Path, args: dict, *extra: str) -> str:
    """`lathe train` through the CLI's main() in this process (the cases below that need a fresh
    process, --debug and a missing config, run the real command)."""
    proc = run_main("train", str(write_yaml(tmp_path / "cfg.yaml", args)), *extra)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    last = err.splitlines()[-1]
    assert last.startswith(("ConfigError:", "DataError:", "ModelError:", "OutputError:")), err[-2000:]
    return last


def _data(tmp_path: Path, files: dict[str, str], info: dict | None = None) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    info = info or {"mine": {"file_name": next(iter(files))}}
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return d


def test_missing_model_path(tmp_path, base_args):
    msg = _fails(tmp_path, {**base_args, "model_name_or_path": "./no/such/model"})
    assert "./no/such/model does not exist" in msg


def test_hub_id_while_offline(tmp_path, base_args):
    msg = _fails(tmp_path, {**base_args, "model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"})
    assert "Qwen/Qwen2.5-0.5B-Instruct" in msg and "HF_HUB_OFFLINE" in msg


def test_unknown_dataset_lists_close_names(tmp_path, base_args):
    msg = _fails(tmp_path, {**base_args, "dataset": "identty"})
    assert "'identty' is not in" in msg and "did you mean identity" in msg


def test_missing_dataset_file(tmp_path, base_args):
    d = _data(tmp_path, {"x.json": "[]"}, {"mine": {"file_name": "gone.json"}})
    msg = _fails(tmp_path, {**base_args, "dataset": "mine", "dataset_dir": str(d)})
    assert "gone.json does not exist" in msg


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("empty.json", "  \n")])
def test_empty_dataset_file(tmp_path, base_args, name, text):
    d = _data(tmp_path, {name: text})
    msg = _fails(tmp_path, {**base_args, "dataset": "mine", "dataset_dir": str(d)})
    assert name in msg and "empty" in msg


def test_bad_json_line_names_file_and_line(tmp_path, base_args):
    good = json.dumps({"instruction": "hi", "output": "hello"})
    d = _data(tmp_path, {"rows.jsonl": f"{good}\n{good}\n{{'instruction': oops}}\n"})
    msg = _fails(tmp_path, {**base_args, "dataset": "mine", "dataset_dir": str(d)})
    assert "rows.jsonl line 3" in msg and "not valid JSON" in msg


def test_row_without_output_column_names_file_and_row(tmp_path, base_args):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}]
    d = _data(tmp_path, {"rows.json": json.dumps(rows)})
    msg = _fails(tmp_path, {**base_args, "dataset": "mine", "dataset_dir": str(d)})
    assert "rows.json row 1" in msg and "'output'" in msg and "answer" in msg


def test_history_that_is_not_pairs(tmp_path, base_args):
    rows = [{"instruction": "a", "output": "b", "history": [["only one"]]}]
    d = _data(tmp_path, {"rows.json": json.dumps(rows)},
              {"mine": {"file_name": "rows.json", "columns": {"history": "history"}}})
    msg = _fails(tmp_path, {**base_args, "dataset": "mine", "dataset_dir": str(d)})
    assert "row 0" in msg and "history[0]" in msg


def test_lora_target_the_model_does_not_have(tmp_path, base_args):
    msg = _fails(tmp_path, {**base_args, "lora_target": "q_proj,query_key_value"})
    assert "'query_key_value'" in msg and "q_proj" in msg and "down_proj" in msg


def test_unknown_key_and_bad_value(tmp_path, base_args):
    assert "did you mean lora_rank" in _fails(tmp_path, {**base_args, "lora_rnak": 8})
    assert "expected a number" in _fails(tmp_path, base_args, "learning_rate=fast")


def test_unknown_template(tmp_path, base_args):
    assert "did you mean chatml" in _fails(tmp_path, {**base_args, "template": "chatmll"})


def test_existing_output_dir_is_not_touched(tmp_path, base_args):
    out = Path(base_args["output_dir"])
    out.mkdir()
    (out / "precious.bin").write_bytes(b"1234")
    msg = _fails(tmp_path, base_args)
    assert "already holds a run" in msg and "overwrite_output_dir" in msg
    assert (out / "precious.bin").read_bytes() == b"1234" and len(list(out.iterdir())) == 1


def test_missing_config_file(tmp_path):
    proc = run_cli("train", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "nope.yaml does not exist" in proc.stderr


def test_debug_flag_shows_the_traceback(tmp_path, base_args):
    cfg = write_yaml(tmp_path / "cfg.yaml", {**base_args, "dataset": "identty"})
    proc = run_cli("--debug", "train", str(cfg))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_overwrite_never_empties_the_working_directory(tmp_path, base_args):
    (tmp_path / "notes.txt").write_text("mine")
    cfg = write_yaml(tmp_path / "cfg.yaml", {**base_args, "output_dir": ".", "overwrite_output_dir": True})
    proc = run_cli("train", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2 and "would empty" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
