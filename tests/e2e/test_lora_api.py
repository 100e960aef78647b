"""`lathe.train({...})` from Python: the trained adapter reloads with plain peft."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

import lathe


def test_lora_reloads_with_plain_peft_and_gives_the_same_logits(base_args, tiny_model):
    result = lathe.train({**base_args, "lora_rank": 8, "lora_target": "all", "max_steps": 16})
    losses = result.losses()
    assert losses[-1] < losses[0]

    trained = result.model.eval()
    base_weights = load_file(tiny_model / "model.safetensors")
    lora_b = {n: p for n, p in trained.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # lora_B starts at zero
    targeted = {n.split(".")[-4] for n in lora_b}  # ...q_proj.lora_B.default.weight
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, param in trained.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert not param.requires_grad
        assert torch.equal(param.detach(), base_weights[key]), f"frozen {key} changed"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                         result.output_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        a, b = trained(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
