"""The fused output layer + cross-entropy: the model's own loss and gradients, chunk by chunk."""

from __future__ import annotations

import pytest
import torch

from lathe.recipes.fused_loss import fused_lm_loss, linear_cross_entropy, linear_logprobs, output_layer, probe

VOCAB = 97


def _tiny(arch: str = "llama", tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  tie_word_embeddings=tie, initializer_range=0.2)
    torch.manual_seed(0)
    return cls(cfg).train()


@pytest.mark.parametrize("rows", [1, 5, 1000])
def test_linear_cross_entropy_equals_the_plain_loss_and_gradients(rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (13,), generator=g)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    plain.backward()
    want = (plain.item(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    fused = linear_cross_entropy(hidden, weight, targets, rows)
    (fused * 0.5).backward()  # the incoming gradient is applied
    assert fused.item() == pytest.approx(want[0], rel=1e-6)
    assert torch.allclose(hidden.grad, 0.5 * want[1], atol=1e-5)
    assert torch.allclose(weight.grad, 0.5 * want[2], atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 1000])
def test_linear_logprobs_equal_the_log_softmax_and_weigh_each_tokens_gradient(rows):
    """Per-token log-probs with a different coefficient per token (a preference loss's): values
    and gradients of the hidden states and the weight equal log_softmax + gather's."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(13, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (13,), generator=g)
    coef = torch.randn(13, generator=g)
    plain = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    (plain * coef).sum().backward()
    want = (plain.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    fused = linear_logprobs(hidden, weight, targets, rows)
    (fused * coef).sum().backward()
    assert torch.allclose(fused, want[0], atol=1e-6)
    assert torch.allclose(hidden.grad, want[1], atol=1e-5)
    assert torch.allclose(weight.grad, want[2], atol=1e-5)
    frozen = weight.detach()  # LoRA: the output layer is frozen, only the hidden states get a gradient
    h = hidden.detach().requires_grad_()
    (linear_logprobs(h, frozen, targets, rows) * coef).sum().backward()
    assert torch.allclose(h.grad, want[1], atol=1e-5)


@pytest.mark.parametrize(("arch", "tie"), [("llama", False), ("qwen2", True)])
def test_the_fused_loss_is_the_models_own_with_padding_and_tied_weights(arch, tie):
    model = _tiny(arch, tie)
    head = output_layer(model)
    assert head is not None and probe(model, head, VOCAB) is not None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels[2, 6:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = []
    for fused in (False, True):
        model.zero_grad()
        loss = fused_lm_loss(model, batch, head, num_items_in_batch=torch.tensor(11), rows=4) if fused \
            else model(**batch, num_items_in_batch=torch.tensor(11)).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (own, g_own), (fused, g_fused) = results
    assert fused == pytest.approx(own, rel=1e-5)
    assert max((g_own[n] - g_fused[n]).abs().max().item() for n in g_own) < 1e-5


def test_a_head_it_cannot_read_keeps_the_models_own_loss():
    from peft import LoraConfig, get_peft_model

    model = _tiny()
    lora_head = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert output_layer(lora_head) is None  # a LoRA on the output layer: the fusion would miss it
    plain = get_peft_model(_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert output_layer(plain) is not None
    scaled = _tiny()
    scaled.config.logit_scale = 1.0

    class Capped(type(scaled)):  # an architecture that changes the logits after the projection
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if out.loss is not None:
                out.loss = out.loss * 1.5
            return out

    capped = Capped(scaled.config)
    assert probe(capped, output_layer(capped), VOCAB) is None


def test_required_but_not_reproduced_is_one_line_and_unset_is_a_note():
    from types import SimpleNamespace

    from lathe.errors import ConfigError
    from lathe.recipes.common import fused_loss_head

    class Capped(type(_tiny())):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if out.loss is not None:
                out.loss = out.loss * 1.5
            return out

    model = Capped(_tiny().config)
    cfg = lambda value, qat=False: SimpleNamespace(  # noqa: E731
        train=SimpleNamespace(fused_loss=value, do_train=True, extra={}),
        finetune=SimpleNamespace(quantization_aware_training=qat))
    head, note = fused_loss_head(cfg(None), model)
    assert head is None and note.startswith("fused loss off: Capped's own loss is not reproduced")
    with pytest.raises(ConfigError, match="fused_loss: true, but Capped's own loss is not reproduced.*false"):
        fused_loss_head(cfg(True), model)
    assert fused_loss_head(cfg(False), model) == (None, None)
    head, note = fused_loss_head(cfg(None), _tiny())
    assert head is not None and note.startswith("fused loss: the output layer and cross-entropy")
    head, note = fused_loss_head(cfg(None, qat=True), _tiny())
    assert head is None and "quantization-aware training" in note
