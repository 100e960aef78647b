"""Config loading: precedence, coercion, every error path, save/load round trip, layering.

Fast: no model, no data, no training. Tests that pass an unknown key import transformers
(to check the key against TrainingArguments), which costs a few seconds once.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lathe.config import load_config, save_config, to_flat_dict
from lathe.config.load import known_keys
from lathe.config.schema import STAGES
from lathe.errors import ConfigError

SRC = Path(__file__).resolve().parents[2] / "src" / "lathe"
BASE = {"model_name_or_path": "x", "dataset": "identity", "output_dir": "o"}


def load(*overrides: str, **extra):
    return load_config({**BASE, **extra}, list(overrides))


def config_error(*overrides: str, source=None, **extra) -> str:
    """Load and expect a ConfigError; return its message, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        if source is None:
            load_config({**BASE, **extra}, list(overrides))
        else:
            load_config(source, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    assert msg.startswith("ConfigError: ")
    return msg


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- precedence: defaults < file < command line ---------------------------------------------


def test_file_then_command_line_then_defaults(tmp_path):
    cfg_file = write_yaml(
        tmp_path / "c.yaml",
        "model_name_or_path: m\n"
        "dataset: identity\n"
        "output_dir: out\n"
        "learning_rate: 1.0e-3\n"
        "cutoff_len: 256\n"
        "seed: 7\n",
    )
    cfg = load_config(cfg_file, ["learning_rate=2e-4", "seed=11"])
    # command line wins over the file
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert cfg.train.seed == 11
    # file wins over the default
    assert cfg.data.cutoff_len == 256
    assert cfg.model.model_name_or_path == "m"
    assert cfg.train.output_dir == "out"
    # neither sets it: the default stays
    assert cfg.train.per_device_train_batch_size == 8
    assert cfg.finetune.finetuning_type == "lora"
    assert cfg.finetune.lora_rank == 8
    assert cfg.data.dataset_dir == "data"
    # bookkeeping
    assert cfg.source == str(cfg_file)
    assert cfg.is_set("learning_rate") and cfg.is_set("cutoff_len")
    assert not cfg.is_set("per_device_train_batch_size")


def test_json_config_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({**BASE, "learning_rate": 3e-4, "lora_target": ["q_proj"]}), encoding="utf-8")
    cfg = load_config(p, ["lora_rank=4"])
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.finetune.lora_target == ["q_proj"]
    assert cfg.finetune.lora_rank == 4
    assert cfg.data.dataset == ["identity"]


def test_empty_yaml_file_uses_defaults_plus_overrides(tmp_path):
    p = write_yaml(tmp_path / "empty.yaml", "# nothing\n")
    cfg = load_config(p, ["model_name_or_path=x", "dataset=identity", "output_dir=o"])
    assert cfg.train.learning_rate == 5e-5


def test_override_key_dashes_and_aliases():
    cfg = load("--learning-rate=1e-3", "lora_r=32", "per_device_batch_size=2")
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.finetune.lora_rank == 32
    assert cfg.train.per_device_train_batch_size == 2
    assert cfg.is_set("lora_rank") and cfg.is_set("per_device_train_batch_size")


# --- value coercion -------------------------------------------------------------------------


def test_yaml_11_exponent_string_becomes_float(tmp_path):
    # PyYAML (YAML 1.1) reads 2e-4 (no dot) as a string.
    assert yaml.safe_load("learning_rate: 2e-4")["learning_rate"] == "2e-4"
    p = write_yaml(tmp_path / "c.yaml", "model_name_or_path: x\ndataset: identity\noutput_dir: o\n"
                                         "learning_rate: 2e-4\n")
    cfg = load_config(p)
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.train.learning_rate == 0.0002


def test_comma_separated_lists(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", "model_name_or_path: x\ndataset: a,b\noutput_dir: o\n"
                                         "lora_target: q_proj,v_proj\n")
    cfg = load_config(p)
    assert cfg.finetune.lora_target == ["q_proj", "v_proj"]
    assert cfg.data.dataset == ["a", "b"]
    cfg = load("dataset=a, b ,c", "report_to=tensorboard")
    assert cfg.data.dataset == ["a", "b", "c"]
    assert cfg.train.report_to == ["tensorboard"]


def test_resume_from_checkpoint_bool_or_path():
    assert load("resume_from_checkpoint=true").train.resume_from_checkpoint is True
    assert load("resume_from_checkpoint=false").train.resume_from_checkpoint is False
    path = "runs/x/checkpoint-10"
    value = load(f"resume_from_checkpoint={path}").train.resume_from_checkpoint
    assert value == path and isinstance(value, str)
    assert load("resume_from_checkpoint=null").train.resume_from_checkpoint is None
    assert load().train.resume_from_checkpoint is None


def test_numbers():
    cfg = load("val_size=5", "num_train_epochs=2", "cutoff_len=512", "max_samples=1e3")
    assert cfg.data.val_size == 5.0 and isinstance(cfg.data.val_size, float)
    assert cfg.train.num_train_epochs == 2.0 and isinstance(cfg.train.num_train_epochs, float)
    assert cfg.data.cutoff_len == 512 and isinstance(cfg.data.cutoff_len, int)
    assert cfg.data.max_samples == 1000 and isinstance(cfg.data.max_samples, int)
    assert load("max_samples=null").data.max_samples is None


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("false", False), ("yes", True), ("no", False), ("on", True), ("off", False),
    ("True", True), ("FALSE", False),
])
def test_bool_strings_from_command_line(text, expected):
    assert load(f"bf16={text}").train.bf16 is expected


@pytest.mark.parametrize("text,expected", [("true", True), ("False", False), ("yes", True), ("0", False)])
def test_bool_strings_from_dict(text, expected):
    # Values that arrive as strings (a dict, a quoted YAML value) are parsed too.
    assert load(gradient_checkpointing=text).train.gradient_checkpointing is expected


def test_literal_from_string():
    cfg = load("finetuning_type=freeze", "torch_dtype=bfloat16", "eval_strategy=epoch", "val_size=0.1")
    assert cfg.finetune.finetuning_type == "freeze"
    assert cfg.model.torch_dtype == "bfloat16"
    assert cfg.train.eval_strategy == "epoch"


# --- error paths: ConfigError, one line, naming the key ------------------------------------


def test_unknown_key_suggests_closest():
    msg = config_error("lora_rnak=16")
    assert "lora_rnak" in msg and "lora_rank" in msg


def test_unknown_key_in_file_suggests_closest(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", "model_name_or_path: x\ndataset: identity\noutput_dir: o\n"
                                         "learnig_rate: 1e-4\n")
    msg = config_error(source=p)
    assert "learnig_rate" in msg and "learning_rate" in msg


def test_renamed_key_names_new_key():
    msg = config_error("evaluation_strategy=steps")
    assert "evaluation_strategy" in msg and "eval_strategy" in msg


def test_key_set_by_lathe_itself():
    msg = config_error("local_rank=0")
    assert "local_rank" in msg


def test_wrong_type():
    msg = config_error("learning_rate=abc")
    assert "learning_rate" in msg and "abc" in msg and "number" in msg


@pytest.mark.parametrize("override,key", [
    ("cutoff_len=1.5", "cutoff_len"),
    ("bf16=maybe", "bf16"),
    ("seed=true", "seed"),
    ("dataset_dir=[a, b]", "dataset_dir"),
])
def test_wrong_type_more(override, key):
    assert key in config_error(override)


def test_bad_choice_suggests():
    msg = config_error("finetuning_type=loar")
    assert "finetuning_type" in msg and "did you mean lora" in msg


def test_bad_enum_passthrough():
    msg = config_error("optim=adamw_torchh")
    assert "optim" in msg and "adamw_torchh" in msg
    assert "did you mean adamw_torch" in msg


def test_valid_passthrough_lands_in_extra():
    cfg = load("optim=adamw_torch")
    assert "optim" in cfg.train.extra
    assert cfg.train.extra["optim"] == "adamw_torch"
    assert "optim" not in known_keys()  # it really is a passthrough, not a Lathe key


def test_lora_keys_with_full():
    msg = config_error("finetuning_type=full", "lora_rank=16")
    assert "lora_rank" in msg and "finetuning_type" in msg
    msg = config_error("finetuning_type=freeze", "lora_target=q_proj")
    assert "lora_target" in msg


def test_freeze_keys_with_lora():
    msg = config_error("freeze_trainable_layers=4")
    assert "freeze_trainable_layers" in msg and "freeze" in msg
    msg = config_error("finetuning_type=full", "freeze_extra_modules=embed_tokens")
    assert "freeze_extra_modules" in msg


def test_adapter_with_full():
    msg = config_error("finetuning_type=full", "adapter_name_or_path=adapters/a")
    assert "adapter_name_or_path" in msg


def test_adapter_with_lora_is_fine():
    assert load("adapter_name_or_path=a,b").model.adapter_name_or_path == ["a", "b"]


def test_bf16_and_fp16():
    msg = config_error("bf16=true", "fp16=true")
    assert "bf16" in msg and "fp16" in msg


@pytest.mark.parametrize("value", ["1.5", "-0.1", "2.25"])
def test_bad_val_size(value):
    assert "val_size" in config_error(f"val_size={value}")


@pytest.mark.parametrize("value", ["0.1", "1", "50"])
def test_good_val_size(value):
    assert load(f"val_size={value}").data.val_size == float(value)


@pytest.mark.parametrize("override,key", [
    ("per_device_train_batch_size=0", "per_device_train_batch_size"),
    ("per_device_eval_batch_size=-1", "per_device_eval_batch_size"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps"),
    ("logging_steps=0", "logging_steps"),
    ("save_steps=-5", "save_steps"),
    ("cutoff_len=0", "cutoff_len"),
    ("cutoff_len=1", "cutoff_len"),
    ("max_samples=0", "max_samples"),
    ("learning_rate=0", "learning_rate"),
    ("learning_rate=-1e-4", "learning_rate"),
    ("num_train_epochs=0", "num_train_epochs"),
    ("warmup_ratio=1.0", "warmup_ratio"),
    ("warmup_ratio=-0.1", "warmup_ratio"),
    ("lora_rank=0", "lora_rank"),
    ("lora_dropout=1.0", "lora_dropout"),
    ("lora_target=,", "lora_target"),
])
def test_non_positive_sizes(override, key):
    assert key in config_error(override)


def test_zero_epochs_ok_with_max_steps():
    cfg = load("num_train_epochs=0", "max_steps=10")
    assert cfg.train.max_steps == 10


def test_missing_model():
    assert "model_name_or_path" in config_error(source={"dataset": "identity", "output_dir": "o"})


def test_missing_dataset():
    assert "dataset" in config_error(source={"model_name_or_path": "x", "output_dir": "o"})


def test_missing_output_dir():
    assert "output_dir" in config_error(source={"model_name_or_path": "x", "dataset": "identity"})
    # an empty command-line value unsets it
    assert "output_dir" in config_error("output_dir=")


def test_resume_and_overwrite():
    msg = config_error("resume_from_checkpoint=true", "overwrite_output_dir=true")
    assert "resume_from_checkpoint" in msg and "overwrite_output_dir" in msg


def test_do_eval_without_val_size():
    msg = config_error("do_eval=true")
    assert "val_size" in msg
    assert "val_size" in config_error("eval_strategy=steps")
    assert load("do_eval=true", "val_size=0.1").train.do_eval is True


def test_nothing_to_do():
    msg = config_error("do_train=false")
    assert "do_train" in msg and "do_eval" in msg


def test_predict_only_needs_eval_rows_but_no_training_data():
    src = {"model_name_or_path": "x", "output_dir": "o", "do_train": False, "do_predict": True}
    assert "eval_dataset" in config_error(source=src)  # no data at all: one line, not a crash
    assert "dataset is missing" in config_error(source={**src, "do_train": True})
    assert "streaming" in config_error(source={**src, "eval_dataset": "identity", "streaming": True,
                                               "max_steps": 5})
    cfg = load_config({**src, "eval_dataset": "identity"})
    assert cfg.data.dataset is None and cfg.data.eval_dataset == ["identity"]


def test_unknown_stage_suggests_sft():
    msg = config_error("stage=sfft")
    assert "sfft" in msg and "did you mean sft" in msg


def test_freeze_zero_layers():
    msg = config_error("finetuning_type=freeze", "freeze_trainable_layers=0")
    assert "freeze_trainable_layers" in msg
    assert load("finetuning_type=freeze", "freeze_trainable_layers=-2").finetune.freeze_trainable_layers == -2


def test_config_file_missing(tmp_path):
    p = tmp_path / "nope.yaml"
    msg = config_error(source=p)
    assert str(p) in msg and "does not exist" in msg


def test_config_file_is_a_folder(tmp_path):
    msg = config_error(source=tmp_path)
    assert str(tmp_path) in msg and "folder" in msg


def test_invalid_yaml_names_line(tmp_path):
    p = write_yaml(tmp_path / "bad.yaml", "model_name_or_path: x\ndataset: identity\noutput_dir: [o\nseed: 1\n")
    msg = config_error(source=p)
    assert str(p) in msg and "YAML" in msg
    assert "line " in msg
    line = int(msg.split("line ", 1)[1].split(":")[0].split()[0])
    assert 3 <= line <= 5


def test_invalid_yaml_tab_indent_names_line(tmp_path):
    p = write_yaml(tmp_path / "bad.yaml", "model_name_or_path: x\n\tdataset: identity\n")
    msg = config_error(source=p)
    assert "line 2" in msg


def test_invalid_json_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "model_name_or_path": "x",\n  "dataset": \n}\n', encoding="utf-8")
    msg = config_error(source=p)
    assert str(p) in msg and "JSON" in msg and "line 4" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path, text):
    p = write_yaml(tmp_path / "list.yaml", text)
    msg = config_error(source=p)
    assert "mapping" in msg


@pytest.mark.parametrize("item", ["learning_rate", "=1e-4", " =x"])
def test_override_without_equals(item):
    msg = config_error(item)
    assert repr(item) in msg and "key=value" in msg


def test_non_string_key(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", "model_name_or_path: x\ndataset: identity\noutput_dir: o\n1: x\n")
    assert "must be a string" in config_error(source=p)


# --- save / load round trip -----------------------------------------------------------------


def _round_trip(tmp_path, cfg):
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert not (tmp_path / "config.yaml.tmp").exists()
    again = load_config(path)
    assert to_flat_dict(again) == to_flat_dict(cfg)
    return again


def test_round_trip_default_lora(tmp_path):
    cfg = load("learning_rate=2e-4", "lora_target=q_proj,v_proj", "dataset=a,b",
               "resume_from_checkpoint=runs/x/checkpoint-5", "val_size=0.2", "eval_strategy=steps")
    again = _round_trip(tmp_path, cfg)
    assert again.finetune.lora_target == ["q_proj", "v_proj"]
    assert again.train.resume_from_checkpoint == "runs/x/checkpoint-5"
    # every Lathe key is in the flat dict, none is lost
    assert set(known_keys()) <= set(to_flat_dict(cfg))
    # the saved file is plain YAML that safe_load reads back
    text = (tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert text.startswith("#")
    assert yaml.safe_load(text) == to_flat_dict(cfg)


def test_round_trip_full_keeps_lora_defaults_quiet(tmp_path):
    # The saved file repeats lora_* defaults; they must not trip the lora-keys check.
    cfg = load("finetuning_type=full")
    again = _round_trip(tmp_path, cfg)
    assert again.finetune.finetuning_type == "full"


def test_round_trip_freeze(tmp_path):
    cfg = load("finetuning_type=freeze", "freeze_trainable_layers=-3", "freeze_extra_modules=norm")
    again = _round_trip(tmp_path, cfg)
    assert again.finetune.freeze_extra_modules == ["norm"]


def test_flat_dict_values_are_plain_types():
    """Values must be plain YAML types, not transformers' str-enum members."""
    cfg = load("optim=adamw_torch")
    flat = to_flat_dict(cfg)
    assert type(flat["optim"]) is str
    assert flat["optim"] == "adamw_torch"


def test_round_trip_passthrough(tmp_path):
    cfg = load("optim=adamw_torch")
    again = _round_trip(tmp_path, cfg)
    assert again.train.extra["optim"] == "adamw_torch"


def test_round_trip_plain_passthrough(tmp_path):
    # A passthrough whose TrainingArguments type is a plain type saves fine.
    cfg = load("torch_compile=true", "dataloader_num_workers=2")
    again = _round_trip(tmp_path, cfg)
    assert again.train.extra == {"torch_compile": True, "dataloader_num_workers": 2}


# --- stages and module layering ---------------------------------------------------------------


def test_stages_match_recipe_modules():
    assert STAGES, "no stages"
    for name in STAGES:
        assert importlib.util.find_spec(f"lathe.recipes.{name}") is not None, name
    # and the reverse: every recipe module that is not a helper is a stage
    helpers = {"__init__", "common", "plots", "losses", "preference", "ppo_core", "predict", "trainers", "heads",
               "fused_loss"}
    recipes = {p.stem for p in (SRC / "recipes").glob("*.py")} - helpers
    assert recipes <= set(STAGES), f"recipe modules without a stage: {recipes - set(STAGES)}"


def _imports(package: str) -> dict[str, set[str]]:
    """file -> absolute module names it imports (anywhere in the file, relative ones resolved)."""
    out: dict[str, set[str]] = {}
    root = SRC / package
    files = sorted(root.rglob("*.py"))
    assert files, f"no python files under {root}"
    for path in files:
        rel = path.relative_to(SRC.parent).with_suffix("")
        pkg_parts = list(rel.parts[:-1])  # the package a relative import starts from
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                names.add(mod)
                names.update(f"{mod}.{a.name}" for a in node.names)
        out[str(path.relative_to(SRC.parent))] = names
    return out


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for file, names in _imports(package).items():
        for name in sorted(names):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{file} imports {name}")
    return bad


def test_import_directions():
    assert _offenders("data", ("lathe.model", "lathe.recipes")) == []
    assert _offenders("model", ("lathe.data", "lathe.recipes")) == []
    # config's checks read the method declarations (lathe.model.methods: names, stages, keys),
    # never the loader or anything that touches weights
    config = [b for b in _offenders("config", ("lathe.data", "lathe.model", "lathe.recipes"))
              if not b.split(" imports ")[1].startswith(("lathe.model.methods", "lathe.model import methods"))]
    assert config == []


# The layering of ../shared/DESIGN.md, for every module of the package: a module may import
# its own rank or lower. (data and model, both low, never import each other: see above.)
RANKS = {
    "errors": 0, "registry": 0, "files": 0, "quiet": 0, "integrity": 0, "hub": 0, "distributed": 0, "loop": 0,
    "config": 1,
    "data": 2, "runs": 2,
    "model": 3,
    "infer": 4, "eval": 4,  # the inference engine and the metrics, shared by recipes and verbs
    "recipes": 5,
    # verbs on runs and exports
    "export": 6, "chat": 6, "report": 6, "pipeline": 6, "api": 6, "quant": 6, "choose": 6, "serve": 6, "webui": 7,
    "demo": 7,
    "doctor": 6, "plan": 6,
    "cli": 8, "__main__": 8, "__init__": 8,
}
# Named exceptions: config's checks read the method declarations; the loader builds the
# embedded demo model (lathe:demo) with demo/build.py, which imports nothing of lathe's.
ALLOWED_UP = {("config", "lathe.model.methods"), ("model", "lathe.demo.build")}


def test_the_whole_import_graph_flows_down():
    units = {p.stem if p.parent == SRC else p.relative_to(SRC).parts[0] for p in SRC.rglob("*.py")}
    assert units <= RANKS.keys(), f"modules without a rank: {units - RANKS.keys()}"
    bad = []
    for unit in sorted(units):
        package = unit if (SRC / unit).is_dir() else None
        files = _imports(package) if package else {str((SRC / f"{unit}.py").relative_to(SRC.parent)):
                                                    _file_imports(SRC / f"{unit}.py")}
        for file, names in files.items():
            for name in names:
                parts = name.split(".")
                if parts[0] != "lathe" or len(parts) < 2 or parts[1] == unit or parts[1] not in RANKS:
                    continue
                target = parts[1]
                allowed = any(unit == u and (name == m or name.startswith(m + ".")) for u, m in ALLOWED_UP)
                if RANKS[target] > RANKS[unit] and not allowed:
                    bad.append(f"{file} imports {name}")
    assert bad == []
    demo_build = _file_imports(SRC / "demo" / "build.py")
    assert not any(n.startswith("lathe.") and not n.startswith("lathe.demo") for n in demo_build)


def _file_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_method_declarations_import_no_heavy_library():
    """config's checks read them, so listing the methods must stay cheap."""
    code = ("import sys; from lathe.model.methods import all_methods; all_methods(); "
            "import lathe.config.checks; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_scanner_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    # Guard the guard: the scanner must catch function-level and relative imports.
    fake = tmp_path / "lathe" / "data"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text(
        "def f():\n    from ..model import load\n    import lathe.recipes.sft\n", encoding="utf-8"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "lathe")
    bad = _offenders("data", ("lathe.model", "lathe.recipes"))
    assert any("lathe.model" in b for b in bad)
    assert any("lathe.recipes.sft" in b for b in bad)


def test_an_unquoted_no_is_the_strategy_no_not_false():
    """YAML 1.1 reads `eval_strategy=no` as false; a key whose values include "no" takes it as that."""
    from lathe.config.load import load_config, parse_overrides

    keys = parse_overrides(["eval_strategy=no", "save_strategy=no"])
    assert keys["eval_strategy"] is False
    cfg = load_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", **keys})
    assert cfg.train.eval_strategy == "no" and cfg.train.extra["save_strategy"].value == "no"
