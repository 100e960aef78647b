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

from lathe.config.schema import FinetuneConfig, ModelConfig
from lathe.errors import ConfigError
from lathe.model.methods import Method, register, start_from_adapters

# Architectures whose attention cache peft cannot prepend a prefix to (found by the
# compatibility matrix, tests/unit/test_compat_matrix.py).
NO_PREFIX = {"chatglm": "ChatGLM keeps its own cache layout"}


def _config(model: Any, ft: FinetuneConfig, kind: str) -> Any:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    hidden = model.config.get_text_config().hidden_size
    if kind == "prefix":
        model_type = getattr(model.config, "model_type", "")
        if model_type in NO_PREFIX:
            raise ConfigError(f"finetuning_type: prefix cannot run on {model_type} ({NO_PREFIX[model_type]}); "
                              "use ptuning, prompt or lora")
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=ft.num_virtual_tokens,
                                  prefix_projection=ft.prefix_projection,
                                  encoder_hidden_size=ft.encoder_hidden_size or hidden)
    if kind == "ptuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=ft.num_virtual_tokens,
                                   encoder_hidden_size=ft.encoder_hidden_size or hidden,
                                   encoder_reparameterization_type=ft.encoder_reparameterization_type)
    if ft.prompt_tuning_init_text:
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=ft.num_virtual_tokens,
                                  prompt_tuning_init="TEXT", prompt_tuning_init_text=ft.prompt_tuning_init_text,
                                  tokenizer_name_or_path=model.name_or_path)
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=ft.num_virtual_tokens,
                              prompt_tuning_init="SAMPLE_VOCAB")


def _applier(kind: str) -> Any:
    def apply(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig) -> Any:
        from peft import get_peft_model

        model, continued = start_from_adapters(model, model_cfg)
        if continued:
            return model
        return get_peft_model(model, _config(model, ft, kind))

    return apply


_COMMON = dict(adapter=True, can_merge=False, reference="the adapter switched off", quantized_base=False,
               stages=("pt", "sft", "dpo", "kto"), packs=False)

register(Method(name="prefix", peft_type="PREFIX_TUNING", apply=_applier("prefix"),
                summary="prefix tuning / P-tuning v2 (peft): learned keys and values before every layer",
                **_COMMON))
register(Method(name="ptuning", peft_type="P_TUNING", apply=_applier("ptuning"),
                summary="P-tuning (peft): virtual tokens from a small prompt encoder (MLP or LSTM)",
                **_COMMON))
register(Method(name="prompt", peft_type="PROMPT_TUNING", apply=_applier("prompt"),
                summary="prompt tuning (peft): virtual token embeddings, from a text or the vocabulary",
                **_COMMON))
