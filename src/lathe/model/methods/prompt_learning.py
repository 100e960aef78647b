"""Prompt learning (peft): the model stays frozen and a few learned vectors steer it.

- prefix: prefix tuning / P-tuning v2, learned keys and values in front of every layer's
  attention (optionally through an MLP, prefix_projection);
- ptuning: P-tuning, virtual token embeddings produced by a small prompt encoder (MLP/LSTM);
- prompt: prompt tuning, virtual token embeddings learned directly (from a text, or from
  random vocabulary tokens).

None of them changes a weight of the base, so none can merge: `lathe export` writes the
base model with the adapter beside it and verifies that pair. The reference policy of
dpo/kto is the adapter switched off. Position ids are ignored by peft once virtual tokens
are prepended, so packed batches (which rely on them) are refused.
"""

from __future__ import annotations

from typing import Any

from lathe.config.schema import TASK_STAGES, FinetuneConfig, ModelConfig
from lathe.errors import ConfigError
from lathe.model.methods import Method, method_of_peft_type, register, start_from_adapters, task_heads

# Generation of a left-padded batch is not safe with virtual tokens: peft puts them in front
# of the padding, and the positions of a padded row shift (a row then generates other
# tokens than alone; the compatibility matrix measured it on Llama, GPT-J, GPT-NeoX, GLM),
# and on these pairs peft raises outright. So Lathe generates these adapters row by row.
# tests/unit/test_compat_matrix.py keeps this table honest.
PADDED_GENERATION_CRASHES = {
    ("bloom", "prefix"): "Bloom's alibi mask leaves out the prefix",
    ("bloom", "ptuning"): "Bloom's alibi mask leaves out the virtual tokens",
    ("bloom", "prompt"): "Bloom's alibi mask leaves out the virtual tokens",
    ("opt", "ptuning"): "OPT's positions leave out the virtual tokens",
    ("opt", "prompt"): "OPT's positions leave out the virtual tokens",
}
NAMES = ("prefix", "ptuning", "prompt")  # the methods this module registers


def padded_generation_fails(model: Any) -> str | None:
    """Why `model` must not generate a left-padded batch (a prompt-learning adapter), or None."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return None
    method = method_of_peft_type(str(getattr(config.peft_type, "value", config.peft_type)))
    if method is None or method.name not in NAMES:
        return None
    model_type = getattr(model.get_base_model().config, "model_type", "")
    return PADDED_GENERATION_CRASHES.get(
        (model_type, method.name), "the positions of a left-padded row shift behind the virtual tokens")


def _config(model: Any, ft: FinetuneConfig, kind: str, task_type: str) -> Any:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    hidden = model.config.get_text_config().hidden_size
    if kind == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=ft.num_virtual_tokens,
                                  prefix_projection=ft.prefix_projection,
                                  encoder_hidden_size=ft.encoder_hidden_size or hidden)
    if kind == "ptuning":
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=ft.num_virtual_tokens,
                                   encoder_hidden_size=ft.encoder_hidden_size or hidden,
                                   encoder_reparameterization_type=ft.encoder_reparameterization_type)
    if ft.prompt_tuning_init_text:
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=ft.num_virtual_tokens,
                                  prompt_tuning_init="TEXT", prompt_tuning_init_text=ft.prompt_tuning_init_text,
                                  tokenizer_name_or_path=model.name_or_path)
    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=ft.num_virtual_tokens,
                              prompt_tuning_init="SAMPLE_VOCAB")


def _applier(kind: str) -> Any:
    def apply(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig, task_type: str = "CAUSAL_LM") -> Any:
        from peft import get_peft_model

        model, continued = start_from_adapters(model, model_cfg)
        if continued:
            return model
        model_type = getattr(model.config, "model_type", type(model).__name__)
        try:  # peft refuses some architectures (no attention to prefix) and fails on others at the
            config = _config(model, ft, kind, task_type)
            config.modules_to_save = task_heads(model, task_type) or None
            peft_model = get_peft_model(model, config)  # first forward
            _probe(peft_model)
        except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            others = [m for m in NAMES if m != kind]
            raise ConfigError(f"finetuning_type: {kind} does not work on {model_type} in peft ({first}); "
                              f"use {', '.join(others)}, lora or ia3") from None
        return peft_model

    return apply


def _probe(model: Any) -> None:
    """One forward pass of two tokens, without gradients, dropout or a trace in the random
    stream: where peft cannot put virtual tokens in front of this model, it fails here."""
    import torch

    was_training = model.training
    device = next(model.parameters()).device
    if device.type == "meta":  # shapes without weights (lathe plan): nothing to run
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        model.eval()
        try:
            ids = torch.zeros((1, 2), dtype=torch.long, device=device)
            decoder = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **decoder)
        finally:
            model.train(was_training)


# not tagging: peft puts the virtual tokens' logits in front of the tags (0.21)
_TASKS = tuple(s for s in TASK_STAGES if s != "tagging")
_COMMON = dict(adapter=True, can_merge=False, reference="the adapter switched off", quantized_base=False,
               stages=("pt", "sft", "dpo", "kto", *_TASKS), packs=False)

register(Method(name="prefix", peft_type="PREFIX_TUNING", apply=_applier("prefix"),
                summary="prefix tuning / P-tuning v2 (peft): learned keys and values before every layer",
                **_COMMON))
register(Method(name="ptuning", peft_type="P_TUNING", apply=_applier("ptuning"),
                summary="P-tuning (peft): virtual tokens from a small prompt encoder (MLP or LSTM)",
                **_COMMON))
register(Method(name="prompt", peft_type="PROMPT_TUNING", apply=_applier("prompt"),
                summary="prompt tuning (peft): virtual token embeddings, from a text or the vocabulary",
                **_COMMON))
