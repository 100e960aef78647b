"""A catalogue of user mistakes, fed to the real CLI, one verb and one kind of input at a time.

Each must end with exit code 2, no traceback, a short last line on stderr that starts with
the error kind and names the culprit (key, file, row or folder), and must leave every
folder the user made as it was. Cases cover config, data, model and outputs, for train,
pipeline, data inspect, eval, export, chat and keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_yaml

pytestmark = pytest.mark.slow

KINDS = ("ConfigError:", "DataError:", "ModelError:", "OutputError:")


def tree_digest(path: Path) -> str:
    """Names, sizes and contents of everything under `path` (or 'absent')."""
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def fails(*argv: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> str:
    """Run the CLI; assert the failure contract; return the message."""
    if env is None:
        proc = run_cli(*argv, cwd=cwd)
    else:
        proc = subprocess.run([sys.executable, "-m", "lathe", *argv], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (argv, proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(KINDS), proc.stderr[-2000:]
    assert len(last) < 600, last
    return last


@dataclass
class World:
    """The files the cases break, made once."""

    tmp: Path
    model: Path
    data: Path
    args: dict
    keep: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, data_dir) -> World:
    tmp = tmp_path_factory.mktemp("catalogue")
    args = {"model_name_or_path": str(tiny_model), "dataset": "identity", "dataset_dir": str(data_dir),
            "template": "chatml", "cutoff_len": 64, "max_samples": 16, "per_device_train_batch_size": 8,
            "max_steps": 2, "save_steps": 1, "logging_steps": 1, "seed": 0}
    return World(tmp, tiny_model, data_dir, args)


def cfg(world: World, name: str, **keys) -> str:
    return str(write_yaml(world.tmp / f"{name}.yaml", {**world.args, **keys}))


def data(world: World, name: str, files: dict[str, bytes], entry: dict | None = None) -> Path:
    d = world.tmp / f"data-{name}"
    d.mkdir()
    for fname, raw in files.items():
        (d / fname).write_bytes(raw)
    info = {"mine": entry or {"file_name": next(iter(files))}}
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def trained(world) -> Path:
    """A finished 2-step LoRA run with checkpoint-1 and checkpoint-2."""
    out = world.tmp / "trained"
    proc = run_cli("train", cfg(world, "trained", output_dir=str(out)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    return out


# --- config ------------------------------------------------------------------------------

CONFIG_CASES = [
    (["lora_rnak=8"], "did you mean lora_rank"),
    (["--lora_rnak", "8"], "did you mean lora_rank"),
    (["lr_scheduler_type=cosin"], "lr_scheduler_type='cosin'"),
    (["report_to=wandbx"], "report_to: wandbx is not a logger"),
    (["report_to=wandb"], "pip install wandb"),
    (["export_quantization_bit=4"], "quantize the export with lathe quantize"),
    (["quantization_bit=3"], "quantization_bit: 3 is not a width"),
    (["quantization_bit=4", "finetuning_type=full"], "needs finetuning_type: lora"),
    (["use_galore=true"], "not supported in Lathe"),
    (["infer_backend=sglang"], "infer_backend='sglang'"),
    (["dpo_label_smoothing=0.1", "pref_label_smoothing=0.1"], "both set"),
    (["learning_rate=fast"], "learning_rate='fast'"),
    (["per_device_train_batch_size=0"], "per_device_train_batch_size=0"),
    (["stage=sftt"], "did you mean sft"),
    (["val_size=1.5"], "val_size=1.5"),
    (["resume_from_checkpoint=true", "overwrite_output_dir=true"], "opposite things"),
]


@pytest.mark.parametrize("overrides,expected", CONFIG_CASES, ids=[c[0][0] for c in CONFIG_CASES])
def test_config_mistakes(world, overrides, expected):
    out = world.tmp / f"out-{abs(hash(tuple(overrides)))}"
    msg = fails("train", cfg(world, "base", output_dir=str(out)), *overrides)
    assert expected in msg
    assert "do not fit together" not in msg
    assert not out.exists()  # checked before anything is written


def test_bf16_on_a_cpu_without_it(world):
    from lathe.recipes.common import cpu_half_support

    if cpu_half_support()["bf16"]:
        pytest.skip("this CPU computes bf16 natively: bf16 trains here (the summary says so)")
    out = world.tmp / "bf16"
    msg = fails("train", cfg(world, "bf16", output_dir=str(out), bf16=True))
    assert "bf16: true" in msg and "bf16: false" in msg and "fit together" not in msg
    assert not out.exists()


def test_config_file_mistakes(world):
    bad_yaml = world.tmp / "bad.yaml"
    bad_yaml.write_text("model_name_or_path: x\n  stage: [sft\n")
    assert "not valid YAML" in fails("train", str(bad_yaml))
    listed = world.tmp / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert "must be a mapping" in fails("train", str(listed))
    assert "model_name_or_path is missing" in fails("train", "dataset=identity", "output_dir=x")
    assert "does not exist" in fails("train", str(world.tmp / "nope.yaml"))


# --- data --------------------------------------------------------------------------------

def test_data_mistakes(world):
    row = json.dumps({"instruction": "hi", "output": "hello"}).encode()
    cases = {
        "gbk": ({"rows.jsonl": row + b"\n" + '{"instruction": "你好", "output": "x"}'.encode("gbk") + b"\n"},
                None, ["rows.jsonl line 2", "UTF-8"]),
        "object": ({"rows.json": b'{"data": [\n  {"instruction": "a", "output": "b"}\n]}'},
                   None, ["rows.json", "one JSON object", "'data'"]),
        "csv": ({"rows.csv": b"instruction,output\nhi,\xff\xfe\n"}, None, ["rows.csv line 2", "UTF-8"]),
        "system": ({"rows.json": b"[" + row + b"]"}, {"file_name": "rows.json", "system_prompt": 3},
                   ["system_prompt must be a string"]),
        "entry": ({"rows.json": b"[" + row + b"]"}, {"file_name": "rows.json", "colums": {}},
                  ["unknown key 'colums'", "did you mean columns"]),
    }
    for name, (files, entry, expected) in cases.items():
        d = data(world, name, files, entry)
        before = tree_digest(d)
        out = world.tmp / f"out-data-{name}"
        path = cfg(world, f"data-{name}", dataset="mine", dataset_dir=str(d), output_dir=str(out))
        msg = fails("train", path)
        assert all(e in msg for e in expected), (name, msg)
        assert tree_digest(d) == before and not out.exists()
        # the data inspector reads data the same way and says the same
        assert fails("data", "inspect", path, "--plot", str(world.tmp / "p.png")) == msg


# --- model -------------------------------------------------------------------------------

def _model_copy(world: World, name: str) -> Path:
    folder = world.tmp / name
    shutil.copytree(world.model, folder)
    return folder


def test_broken_model_weights(world):
    cut = _model_copy(world, "cut-model")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    msg = fails("train", cfg(world, "cut", model_name_or_path=str(cut), output_dir=str(world.tmp / "o1")))
    assert "model.safetensors is cut short" in msg
    html = _model_copy(world, "html-model")
    (html / "model.safetensors").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    msg = fails("train", cfg(world, "html", model_name_or_path=str(html), output_dir=str(world.tmp / "o2")))
    assert "not a safetensors file" in msg and "HTML" in msg
    # the other verbs load models the same way
    assert "cut short" in fails("chat", str(cut))
    assert "cut short" in fails("export", f"model_name_or_path={cut}", f"export_dir={world.tmp / 'e1'}")


@pytest.fixture(scope="module")
def foreign_adapter(world, tmp_path_factory) -> Path:
    """A LoRA adapter saved for a wider model than the tiny one."""
    from peft import LoraConfig, get_peft_model

    from lathe.demo.build import TinySpec, build_tiny_model

    spec = TinySpec(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    other = build_tiny_model(tmp_path_factory.mktemp("wide") / "wide", spec)
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(other),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = world.tmp / "wide-adapter"
    peft_model.save_pretrained(out)
    return out


def test_adapter_mistakes(world, foreign_adapter):
    msg = fails("train", cfg(world, "foreign", adapter_name_or_path=str(foreign_adapter),
                             output_dir=str(world.tmp / "o3")))
    assert "does not fit base model" in msg and "in the adapter but" in msg
    msg = fails("train", cfg(world, "full", adapter_name_or_path=str(world.model), output_dir=str(world.tmp / "o4")))
    assert "holds a full model" in msg
    msg = fails("chat", f"model_name_or_path={world.model}", f"adapter_name_or_path={world.tmp / 'none'}")
    assert "does not exist" in msg


def test_hub_id_without_network_fails_fast(world):
    """No HF_HUB_OFFLINE: the hub is probed once (3 s) instead of ~50 s of retries."""
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                           "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: no network, on any machine
    start = time.time()
    msg = fails("train", cfg(world, "hub", model_name_or_path="someone/some-model",
                             output_dir=str(world.tmp / "o5")), env=env)
    assert time.time() - start < 40
    assert "someone/some-model" in msg and "cannot be reached" in msg


# --- outputs -----------------------------------------------------------------------------

def test_output_dir_that_cannot_be_created(world):
    blocker = world.tmp / "a-file"
    blocker.write_text("mine")
    msg = fails("train", cfg(world, "blocked", output_dir=str(blocker / "run")))
    assert "cannot be created" in msg and "a-file" in msg
    assert blocker.read_text() == "mine"


def test_partial_and_truncated_checkpoints(world, trained):
    run = world.tmp / "resume-me"
    shutil.copytree(trained, run)
    config_before = (run / "config.yaml").read_bytes()
    # a checkpoint killed while saving: no trainer_state.json
    (run / "checkpoint-2" / "trainer_state.json").unlink()
    (run / "checkpoint-1" / "trainer_state.json").unlink()
    msg = fails("train", cfg(world, "resume1", output_dir=str(run), resume_from_checkpoint=True, max_steps=4))
    assert "no checkpoint" in msg and "is complete" in msg and "trainer_state.json" in msg
    msg = fails("train", cfg(world, "resume2", output_dir=str(run),
                             resume_from_checkpoint=str(run / "checkpoint-2"), max_steps=4))
    assert "checkpoint-2" in msg and "cut off while being saved" in msg
    # weights cut short
    shutil.copy(trained / "checkpoint-2" / "trainer_state.json", run / "checkpoint-2")
    weights = run / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    msg = fails("train", cfg(world, "resume3", output_dir=str(run),
                             resume_from_checkpoint=str(run / "checkpoint-2"), max_steps=4))
    assert "adapter_model.safetensors" in msg and "cut short" in msg
    optimizer = run / "checkpoint-1" / "optimizer.pt"
    shutil.copy(trained / "checkpoint-1" / "trainer_state.json", run / "checkpoint-1")
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    msg = fails("train", cfg(world, "resume4", output_dir=str(run),
                             resume_from_checkpoint=str(run / "checkpoint-1"), max_steps=4))
    assert "optimizer.pt" in msg
    assert (run / "config.yaml").read_bytes() == config_before  # a failed resume rewrites nothing


def test_existing_run_is_not_touched(world, trained):
    before = tree_digest(trained)
    msg = fails("train", cfg(world, "again", output_dir=str(trained)))
    assert "already holds a run" in msg
    assert tree_digest(trained) == before


# --- the other verbs ---------------------------------------------------------------------

def test_other_verbs(world, trained):
    used = world.tmp / "used-export"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert "export_dir" in fails("export", str(trained), f"export_dir={used}")
    assert (used / "keep.txt").read_text() == "mine"
    assert "neither a model" in fails("chat", str(world.data))
    assert "task is missing" in fails("eval", f"model_name_or_path={world.model}")
    msg = fails("eval", f"model_name_or_path={world.model}", "task=nobench_test", f"task_dir={world.tmp}")
    assert "nobench" in msg
    pipe = world.tmp / "pipe.yaml"
    pipe.write_text("stagez: []\n")
    assert "unknown pipeline key 'stagez'" in fails("pipeline", str(pipe))
    assert "temperature=0.0" in fails("chat", str(trained), "temperature=0")


def test_keys_into_a_closed_pipe():
    proc = subprocess.run(f'"{sys.executable}" -m lathe keys | head -1', shell=True, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "[model]"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_a_folder_left_by_a_failed_start_does_not_block_the_retry(world, trained):
    out = world.tmp / "failed-start"
    out.mkdir()
    shutil.copy(trained / "config.yaml", out / "config.yaml")  # all a failed start leaves
    proc = run_cli("train", cfg(world, "retry", output_dir=str(out), max_steps=1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_says_which_checkpoint(world, trained):
    run = world.tmp / "resume-ok"
    shutil.copytree(trained, run)
    (run / "checkpoint-2" / "trainer_state.json").unlink()  # the newest was cut off while saving
    proc = run_cli("train", cfg(world, "resume-ok", output_dir=str(run), resume_from_checkpoint=True, max_steps=3))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Resuming from {run / 'checkpoint-1'}" in proc.stdout
    assert "Passing over" in proc.stdout and "checkpoint-2" in proc.stdout
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 3  # rewritten once it succeeded
