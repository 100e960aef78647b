"""`lathe plan`: the estimate from the config alone, its parts, what moves them, and bad input.

That the memory estimate holds against measured peaks (within 20%, every method) is measured by
benchmarks/plan_bench.py on a 28.5M-parameter model, where training memory is not swamped by the
libraries; these tests check what the plan is made of on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import one_error, run_cli, run_main, write_yaml


def _plan(tmp_path: Path, args: dict, *extra: str, name: str = "plan") -> tuple[dict, str]:
    cfg = write_yaml(tmp_path / f"{name}.yaml", args)
    out = tmp_path / f"{name}.json"
    proc = run_cli("plan", str(cfg), *extra, "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _parts(plan: dict) -> dict[str, int]:
    return {p["name"]: p["bytes"] for p in plan["parts"]}


def _real_counts(args: dict) -> tuple[int, int]:
    """(trainable, total) of the model the run would train: loaded with its weights, the method
    applied, as `lathe train` does."""
    from lathe.config.load import build_config
    from lathe.model.adapters import apply_finetuning, count_parameters
    from lathe.model.load import load_model, load_tokenizer

    cfg = build_config(args)
    tok = load_tokenizer(cfg.model, cfg.model.model_name_or_path)
    model = apply_finetuning(load_model(cfg, cfg.model.model_name_or_path, tok), cfg.finetune, cfg.model)
    return count_parameters(model)


@pytest.mark.parametrize("method", ["lora", "full", "freeze", "prompt", "ia3"])
def test_the_plan_counts_what_the_run_trains_exactly_and_writes_nothing(method, base_args, tmp_path):
    """The method applied to a weightless copy of the model counts the same trained and total
    parameters as the real run; the memory table adds up; no output_dir appears."""
    args = {**base_args, "finetuning_type": method}
    plan, stdout = _plan(tmp_path, args)
    assert (plan["trainable"], plan["params"]) == _real_counts(args)
    parts = _parts(plan)
    assert plan["total"] == sum(p["bytes"] for p in plan["parts"] if p["where"] == "device")
    assert parts["activations"] > 0 and parts["weights"] > 0 and parts["runtime"] > 100 * 2**20
    # Adam: two float32 states per trained parameter, a float32 gradient each
    assert parts["optimizer states"] == 8 * plan["trainable"] and parts["gradients"] == 4 * plan["trainable"]
    assert plan["steps"] == 12 and plan["fits"] is True and plan["tokens_per_s"] > 0
    assert "memory per device" in stdout and "fits" in stdout
    assert not Path(base_args["output_dir"]).exists()


def test_settings_move_the_estimate_the_way_they_should(base_args, tmp_path):
    """Gradient checkpointing keeps less; a larger batch keeps more; ZeRO-3 over 2 GPUs halves
    the weights and the optimizer states; 4-bit weights are about a seventh of float32's."""
    args = {**base_args, "finetuning_type": "full"}
    base, _ = _plan(tmp_path, args, name="base")
    gc, _ = _plan(tmp_path, {**args, "gradient_checkpointing": True}, name="gc")
    big, _ = _plan(tmp_path, {**args, "per_device_train_batch_size": 32}, name="big")
    assert _parts(gc)["activations"] < _parts(base)["activations"] < _parts(big)["activations"]
    one, _ = _plan(tmp_path, args, "gpus=1", "gpu_memory=80", "deepspeed=ds_z3", name="gpu1")
    z3, out = _plan(tmp_path, args, "gpus=2", "gpu_memory=80", "deepspeed=ds_z3", name="z3")
    assert z3["processes"] == 2 and z3["device"] == "GPU" and "ZeRO-3" in z3["engine"]
    for part in ("weights", "optimizer states", "gradients"):
        assert _parts(z3)[part] == pytest.approx(_parts(one)[part] / 2, rel=0.01), part
    assert "sharded over 2" in out
    q, _ = _plan(tmp_path, {**base_args, "quantization_bit": 4}, "gpus=1", "gpu_memory=80", name="q4")
    lora, _ = _plan(tmp_path, base_args, "gpus=1", "gpu_memory=80", name="lora")
    assert _parts(q)["weights"] < _parts(lora)["weights"]


def test_a_run_that_does_not_fit_gets_what_to_change(base_args, tmp_path):
    args = {**base_args, "finetuning_type": "full", "gradient_checkpointing": False}
    plan, out = _plan(tmp_path, args, "gpus=1", "gpu_memory=0.01")
    assert plan["fits"] is False and plan["checkpointing"] is False
    assert "does NOT fit" in out
    assert "gradient_checkpointing: true (saves about" in out and "finetuning_type: lora" in out


def test_unset_gradient_checkpointing_is_what_the_plan_decides(base_args, tmp_path):
    """Unset, the plan turns checkpointing on only where the run would not fit without it, and
    then counts the activations it keeps; set, it is as set."""
    args = {**base_args, "finetuning_type": "full"}
    roomy, out = _plan(tmp_path, args, "gpus=1", "gpu_memory=80", name="roomy")
    assert roomy["checkpointing"] is False
    assert "gradient checkpointing off (unset: the plan needs" in out and "within the 80.00 GiB" in out
    tight, out = _plan(tmp_path, args, "gpus=1", "gpu_memory=0.01", name="tight")
    assert tight["checkpointing"] is True and "gradient checkpointing on (unset: the plan needs" in out
    assert "gradient_checkpointing: true (saves" not in out  # not advised: already on
    assert _parts(tight)["activations"] < _parts(roomy)["activations"]
    kept, _ = _plan(tmp_path, {**args, "gradient_checkpointing": True}, "gpus=1", "gpu_memory=80", name="kept")
    assert _parts(kept)["activations"] == _parts(tight)["activations"] and kept["checkpointing_why"] is None
    budget, out = _plan(tmp_path, {**args, "device_memory": 0.01}, "gpus=1", name="budget")
    assert budget["checkpointing"] is True and "of device_memory" in out
    assert budget["available"] == int(0.01 * 2**30)


def test_training_turns_checkpointing_on_only_where_the_plan_needs_it(base_args, tmp_path):
    """`lathe train` with gradient_checkpointing unset: on where device_memory is too small for the
    run without it (the summary says why, the run's config.yaml records it, the losses are the same
    as without it), off where it fits."""
    import yaml

    from tests.conftest import logged

    runs = {}
    for name, keys in (("tight", {"device_memory": 0.2}), ("roomy", {}), ("off", {"gradient_checkpointing": False})):
        out = tmp_path / name
        args = {**base_args, **keys, "max_steps": 3, "logging_steps": 1, "output_dir": str(out)}
        proc = run_cli("train", str(write_yaml(tmp_path / f"{name}.yaml", args)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (out, proc.stdout)
    (tight, said), (_, roomy_said), (off, off_said) = runs["tight"], runs["roomy"], runs["off"]
    assert "gradient checkpointing on (unset: the plan needs" in said and "0.20 GiB of device_memory" in said
    assert "gradient checkpointing off (unset: the plan needs" in roomy_said
    assert "gradient checkpointing" not in off_said
    saved = {name: yaml.safe_load((out / "config.yaml").read_text())["gradient_checkpointing"]
             for name, (out, _) in runs.items()}
    assert saved == {"tight": True, "roomy": False, "off": False}
    assert logged(tight, "loss") == pytest.approx(logged(off, "loss"), rel=1e-5)


def test_a_model_whose_config_cannot_be_read_is_one_line(base_args, tmp_path):
    model = tmp_path / "broken-model"
    model.mkdir()
    for f in Path(base_args["model_name_or_path"]).iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    r = run_main("plan", str(write_yaml(tmp_path / "cfg.yaml", {**base_args, "model_name_or_path": str(model)})))
    assert "config.json cannot be read" in one_error(r)


@pytest.mark.parametrize(("keys", "says"), [
    ({"gpus": "two"}, "gpus is a whole number of GPUs"),
    ({"gpus": 0}, "gpus=0 must be at least 1"),
    ({"streaming": True, "max_steps": 4}, "streaming: true: lathe plan reads the lengths"),
])
def test_bad_plan_input_is_one_line(keys, says, base_args, tmp_path):
    plain = {k: v for k, v in keys.items() if k not in ("gpus",)}
    extra = [f"gpus={keys['gpus']}"] if "gpus" in keys else []
    r = run_main("plan", str(write_yaml(tmp_path / "cfg.yaml", {**base_args, **plain})), *extra)
    assert says in one_error(r)


def test_preference_stages_count_both_replies_and_the_reference(base_args, tmp_path):
    """dpo plans from its pairs; full tuning keeps a frozen reference copy beside
    the policy (an adapter method switches its adapter off instead: no copy); the split backward
    counts one side's activations."""
    from tests.conftest import write_pref_pairs

    pairs = write_pref_pairs(tmp_path / "pairs")
    args = {**base_args, "stage": "dpo", "dataset": "pairs", "dataset_dir": str(pairs)}
    full, _ = _plan(tmp_path, {**args, "finetuning_type": "full"}, name="dpo-full")
    lora, _ = _plan(tmp_path, args, name="dpo-lora")
    assert _parts(full)["reference model"] == _parts(full)["weights"]
    assert "reference model" not in _parts(lora)
    assert full["parts"][0]["bytes"] > 0 and full["steps"] == lora["steps"] == 12
    # the split backward (the default) keeps one side's activations at a time; both sides at once keep more
    joint, _ = _plan(tmp_path, {**args, "pref_split_backward": False}, name="dpo-joint")
    assert lora["peak_step_tokens"] < joint["peak_step_tokens"]
    assert _parts(lora)["activations"] < _parts(joint)["activations"]
    assert lora["tokens_per_step"] == joint["tokens_per_step"]  # both sides are still computed
