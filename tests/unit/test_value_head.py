"""The policy with a value head: one pass, the model's own logits, the final-norm hidden
state, positions that ignore left padding, and a head that saves and loads."""

from __future__ import annotations

import pytest
import torch

from lathe.model.value_head import VALUE_HEAD_FILE, PolicyWithValueHead, disable_dropout


@pytest.fixture()
def lm(tiny_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def test_last_hidden_state_is_after_the_final_norm(lm):
    # transformers 5 records the normed state last; if that changes, values read the wrong layer
    ids = torch.randint(3, 500, (2, 7))
    out = lm(input_ids=ids, output_hidden_states=True)
    backbone = lm.model(input_ids=ids).last_hidden_state
    assert torch.allclose(out.hidden_states[-1], backbone)
    assert torch.allclose(lm.lm_head(backbone), out.logits, atol=1e-6)


def test_forward_gives_the_models_logits_and_one_value_per_token(lm):
    model = PolicyWithValueHead(lm)
    torch.nn.init.normal_(model.value_head.weight)
    ids = torch.randint(3, 500, (2, 6))
    logits, values = model(ids, torch.ones_like(ids))
    assert torch.allclose(logits, lm(input_ids=ids).logits, atol=1e-6)
    hidden = lm.model(input_ids=ids).last_hidden_state
    assert values.shape == (2, 6)
    assert torch.allclose(values, model.value_head(hidden).squeeze(-1), atol=1e-6)


def test_left_padding_does_not_change_the_real_tokens(lm):
    # (rotary positions are shift-invariant; models with absolute positions rely on the
    # position ids the wrapper derives from the attention mask)
    model = PolicyWithValueHead(lm)
    torch.nn.init.normal_(model.value_head.weight)
    ids = torch.randint(3, 500, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    attn = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    logits, values = model(padded, attn)
    ref_logits, ref_values = model(ids, torch.ones_like(ids))
    assert torch.allclose(logits[:, 3:], ref_logits, atol=1e-5)
    assert torch.allclose(values[:, 3:], ref_values, atol=1e-5)


def test_value_head_saves_and_loads(lm, tmp_path):
    model = PolicyWithValueHead(lm)
    assert torch.count_nonzero(model.value_head.weight) == 0  # values start at 0
    torch.nn.init.normal_(model.value_head.weight)
    torch.nn.init.constant_(model.value_head.bias, 0.5)
    model.save_value_head(tmp_path)
    assert (tmp_path / VALUE_HEAD_FILE).is_file()
    other = PolicyWithValueHead(lm)
    other.load_value_head(tmp_path)
    assert torch.equal(other.value_head.weight, model.value_head.weight)
    assert other.value_head.bias.item() == 0.5


def test_gradients_reach_the_adapter_and_the_head(lm):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    model = PolicyWithValueHead(peft_model)
    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.randint(3, 500, (2, 6))
    logits, values = model(ids, torch.ones_like(ids))
    (logits.mean() + values.sum()).backward()
    assert model.value_head.weight.grad is not None and model.value_head.weight.grad.abs().sum() > 0
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n and "value_head" not in n]
    assert all(p.grad is None for p in frozen)
