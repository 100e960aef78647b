"""What gets trained, per architecture: LoRA targets, freeze blocks."""

from __future__ import annotations

import pytest
import torch

from lathe.config import load_config
from lathe.errors import ConfigError
from lathe.model.adapters import apply_finetuning, count_parameters
from lathe.model.methods.lora import linear_module_names


def _tiny(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1)
        return tf.LlamaForCausalLM(cfg)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2))
    if arch == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=16, n_layer=3, n_head=2))
    raise ValueError(arch)


@pytest.mark.parametrize("arch,expected", [
    ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("gpt2", ["c_attn", "c_fc", "c_proj"]),  # Conv1D layers count as linear
    ("bloom", ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]),
])
def test_all_linear_modules_but_the_head(arch, expected):
    assert linear_module_names(_tiny(arch)) == expected


def _cfg(**keys):
    return load_config({"model_name_or_path": "x", "dataset": "d", "output_dir": "o", **keys})


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
def test_lora_all_wraps_every_linear_layer(arch):
    cfg = _cfg(finetuning_type="lora", lora_rank=2)
    model = apply_finetuning(_tiny(arch), cfg.finetune, cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)


def test_lora_target_by_name_and_a_missing_name():
    cfg = _cfg(lora_target="query_key_value")
    model = apply_finetuning(_tiny("bloom"), cfg.finetune, cfg.model)
    assert all("query_key_value.lora" in n for n, p in model.named_parameters() if p.requires_grad)
    bad = _cfg(lora_target="q_proj")
    with pytest.raises(ConfigError, match="its linear modules are: dense, dense_4h_to_h"):
        apply_finetuning(_tiny("bloom"), bad.finetune, bad.model)


@pytest.mark.parametrize("arch,prefix", [("llama", "model.layers."), ("gpt2", "transformer.h.")])
@pytest.mark.parametrize("k,ids", [(1, {2}), (2, {1, 2}), (-1, {0})])
def test_freeze_trains_only_the_chosen_blocks(arch, prefix, k, ids):
    cfg = _cfg(finetuning_type="freeze", freeze_trainable_layers=k)
    model = apply_finetuning(_tiny(arch), cfg.finetune, cfg.model)
    for name, p in model.named_parameters():
        in_ids = name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) in ids
        assert p.requires_grad == in_ids, name


def test_freeze_modules_and_extra_modules():
    cfg = _cfg(finetuning_type="freeze", freeze_trainable_layers=1, freeze_trainable_modules="mlp",
               freeze_extra_modules="norm")
    model = apply_finetuning(_tiny("llama"), cfg.finetune, cfg.model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["model.layers.2.mlp.down_proj.weight", "model.layers.2.mlp.gate_proj.weight",
                         "model.layers.2.mlp.up_proj.weight", "model.norm.weight"]
    with pytest.raises(ConfigError, match="freeze_trainable_layers=5"):
        bad = _cfg(finetuning_type="freeze", freeze_trainable_layers=5)
        apply_finetuning(_tiny("llama"), bad.finetune, bad.model)
    with pytest.raises(ConfigError, match="did you mean mlp"):
        bad = _cfg(finetuning_type="freeze", freeze_trainable_modules="mpl")
        apply_finetuning(_tiny("llama"), bad.finetune, bad.model)


def test_full_trains_everything():
    cfg = _cfg(finetuning_type="full")
    model = apply_finetuning(_tiny("llama"), cfg.finetune, cfg.model)
    trainable, total = count_parameters(model)
    assert trainable == total > 0


def test_dora_adds_a_trained_magnitude_per_output():
    cfg = _cfg(lora_rank=2, lora_target="q_proj,v_proj", use_dora=True)
    model = apply_finetuning(_tiny("llama"), cfg.finetune, cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trainable)
    assert model.peft_config["default"].use_dora is True


def test_rslora_scales_by_the_square_root_of_the_rank():
    cfg = _cfg(lora_rank=4, lora_alpha=8, lora_target="q_proj", use_rslora=True)
    model = apply_finetuning(_tiny("llama"), cfg.finetune, cfg.model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)
    plain = _cfg(lora_rank=4, lora_alpha=8, lora_target="q_proj")
    tuned = apply_finetuning(_tiny("llama"), plain.finetune, plain.model)
    layer = tuned.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4)


def test_additional_target_trains_whole_modules_beside_the_adapter():
    cfg = _cfg(lora_rank=2, lora_target="q_proj", additional_target="embed_tokens")
    model = apply_finetuning(_tiny("llama"), cfg.finetune, cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    bad = _cfg(additional_target="embed_token")
    with pytest.raises(ConfigError, match="did you mean embed_tokens"):
        apply_finetuning(_tiny("llama"), bad.finetune, bad.model)


def test_lora_variant_keys_need_lora():
    with pytest.raises(ConfigError, match="use_dora applies only to finetuning_type: lora"):
        _cfg(finetuning_type="full", use_dora=True)


@pytest.mark.parametrize("arch,targets,feedforward", [
    ("llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    ("gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    ("bloom", ["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
])
def test_ia3_default_layers_per_architecture(arch, targets, feedforward):
    from lathe.model.methods.ia3 import ia3_modules

    cfg = _cfg(finetuning_type="ia3")
    assert ia3_modules(_tiny(arch), cfg.finetune) == (targets, feedforward)
    model = apply_finetuning(_tiny(arch), cfg.finetune, cfg.model)
    assert all("ia3_l" in n for n, p in model.named_parameters() if p.requires_grad)


def test_ia3_named_layers_are_checked():
    from lathe.model.methods.ia3 import ia3_modules

    cfg = _cfg(finetuning_type="ia3", ia3_target="q_proj,down_proj")
    assert ia3_modules(_tiny("llama"), cfg.finetune) == (["q_proj", "down_proj"], ["down_proj"])
    with pytest.raises(ConfigError, match="did you mean q_proj"):
        ia3_modules(_tiny("llama"), _cfg(finetuning_type="ia3", ia3_target="q_prj").finetune)
    with pytest.raises(ConfigError, match="ia3_feedforward 'up_proj' is not one of ia3_target"):
        ia3_modules(_tiny("llama"), _cfg(finetuning_type="ia3", ia3_target="q_proj",
                                         ia3_feedforward="up_proj").finetune)
