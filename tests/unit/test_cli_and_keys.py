"""The LLaMA-Factory command-line form, the LLaMA-Factory key table, and `lathe keys`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from lathe.cli import _parse
from lathe.config.llamafactory import KEYS, translate
from lathe.config.load import _FIELDS, ALIASES, load_config, training_arguments_fields
from lathe.errors import ConfigError

BASE = {"model_name_or_path": "lathe:demo", "dataset": "identity", "output_dir": "runs/x"}


# --- --key value ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,config,overrides", [
    (["train", "c.yaml", "--stage", "sft", "--do_train", "--lora_target=W_pack", "--fp16"],
     "c.yaml", ["stage=sft", "do_train=true", "lora_target=W_pack", "fp16=true"]),
    (["train", "--stage", "sft", "--do_train", "--dataset", "a,b"], None,
     ["stage=sft", "do_train=true", "dataset=a,b"]),
    (["train", "seed=3", "--plot_loss"], None, ["seed=3", "plot_loss=true"]),
    (["train", "c.yaml", "--learning-rate", "1e-4", "learning_rate=2e-4", "--do_train", "false"], "c.yaml",
     ["learning-rate=1e-4", "learning_rate=2e-4", "do_train=false"]),
    (["--debug", "train", "c.yaml", "--seed", "1"], "c.yaml", ["seed=1"]),
])
def test_flags_become_overrides_in_order(argv, config, overrides):
    args = _parse(argv)
    assert args.config == config and args.overrides == overrides


def test_a_commands_own_options_stay_options():
    args = _parse(["chat", "c.yaml", "--system", "Be brief.", "--temperature", "0.3"])
    assert args.system == "Be brief." and args.overrides == ["temperature=0.3"]
    args = _parse(["data", "inspect", "c.yaml", "-n", "5", "--no-color", "--cutoff_len", "64"])
    assert args.n == 5 and args.color is False and args.overrides == ["cutoff_len=64"]
    args = _parse(["pipeline", "p.yaml", "--dry-run", "--seed", "3"])
    assert args.dry_run and args.overrides == ["seed=3"]


def test_flag_and_key_value_have_the_same_precedence():
    cfg = load_config(BASE, [o for o in _parse(["train", "--learning_rate", "1e-3", "learning_rate=2e-3"]).overrides])
    assert cfg.train.learning_rate == 2e-3
    cfg = load_config(BASE, _parse(["train", "learning_rate=2e-3", "--learning_rate", "1e-3"]).overrides)
    assert cfg.train.learning_rate == 1e-3
    with pytest.raises(ConfigError, match="did you mean lora_rank"):
        load_config(BASE, _parse(["train", "--lora_rnak", "4"]).overrides)


# --- the LLaMA-Factory table -----------------------------------------------------------------

def test_every_same_and_alias_entry_names_a_key_lathe_reads():
    ta = training_arguments_fields()
    for key, entry in KEYS.items():
        if entry.kind == "same":
            assert key in _FIELDS or key in ta, key
        if entry.kind == "alias":
            assert entry.to in _FIELDS or entry.to in ta, key


def test_no_entry_shadows_a_key_lathe_already_has():
    ta = training_arguments_fields()
    for key, entry in KEYS.items():
        if entry.kind != "same":
            assert key not in _FIELDS and key not in ta and key not in ALIASES, key


def test_refusals_say_what_the_key_does_and_what_to_do():
    for key, entry in KEYS.items():
        if entry.kind in ("later", "no"):
            assert entry.what and entry.note, key
        if entry.kind == "later":
            assert "issue" in entry.note, key


def test_translate():
    raw = {"mask_history": True, "disable_gradient_checkpointing": True, "tokenized_path": "x",
           "use_unsloth": False, "pissa_init": "false", "infer_backend": "huggingface", "seed": 1}
    out, notes = translate(raw, set(_FIELDS))
    assert out == {"train_on_last_turn_only": True, "gradient_checkpointing": False, "seed": 1,
                   "pissa_init": "false", "infer_backend": "huggingface"}
    assert len(notes) == 1 and "tokenized_path" in notes[0]
    with pytest.raises(ConfigError, match=r"export_quantization_bit .*lathe quantize"):
        translate({"export_quantization_bit": 4}, set(_FIELDS))
    assert translate({"pissa_init": "true"}, set(_FIELDS))[0] == {"pissa_init": "true"}  # landed: same
    assert translate({"infer_backend": "vllm"}, set(_FIELDS))[0] == {"infer_backend": "vllm"}  # lathe api's key


def test_a_llamafactory_style_config_loads(tmp_path):
    """Written in our own words, with the keys their guides use."""
    path = tmp_path / "lf.yaml"
    path.write_text("""
model_name_or_path: lathe:demo
trust_remote_code: true
flash_attn: auto
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
dataset: identity
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4
output_dir: saves/qwen3/lora/sft
logging_steps: 10
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
lr_scheduler_type: cosine
warmup_ratio: 0.1
ddp_timeout: 180000000
resume_from_checkpoint: null
dpo_label_smoothing: 0.0
export_device: cpu
tokenized_path: saves/tokenized
""")
    cfg = load_config(path)
    assert cfg.train.extra["ddp_timeout"] == 180000000 and cfg.model.flash_attn == "auto"
    assert cfg.train.lr_scheduler_type == "cosine"
    assert [n.split()[0] for n in cfg.notes] == ["tokenized_path"]  # export_device: cpu is their default


def test_lathe_keys_lists_every_key_in_full():
    out = subprocess.run([sys.executable, "-m", "lathe", "keys"], capture_output=True, text=True).stdout
    assert "[...]" not in out
    for key in ("load_best_model_at_end", "metric_for_best_model", "flash_attn", "report_to"):
        assert f"  {key} " in out
    lf = subprocess.run([sys.executable, "-m", "lathe", "keys", "--from-llamafactory"],
                        capture_output=True, text=True).stdout
    assert all(f"  {k} " in lf for k in KEYS)


def test_schema_literals_match_transformers():
    from transformers.trainer_utils import SchedulerType

    from lathe.config.schema import TrainConfig

    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "lr_scheduler_type")
    import typing

    hint = typing.get_type_hints(TrainConfig)[field.name]
    assert set(typing.get_args(hint)) == {s.value for s in SchedulerType}
