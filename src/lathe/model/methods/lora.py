"""LoRA (peft): low-rank updates on linear layers, with DoRA, rsLoRA, modules trained in
full beside it (additional_target), and QLoRA (a 4/8-bit base prepared for k-bit training).
It merges into the base (export), and the reference policy of dpo/kto/ppo is the model with
the adapter switched off (or a frozen copy of a continued adapter)."""

from __future__ import annotations

from typing import Any

from lathe.config.schema import FinetuneConfig, ModelConfig
from lathe.errors import ConfigError, ModelError, did_you_mean
from lathe.model.methods import Method, register

# Output heads that never get LoRA, whatever the architecture calls them.
HEAD_NAMES = {"lm_head", "output_layer", "embed_out", "score", "classifier", "v_head"}


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear layer except the output head (per architecture)."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: set[str] = set()
    for full_name, module in model.named_modules():
        if module is head:
            continue
        is_linear = isinstance(module, (nn.Linear, Conv1D)) or type(module).__name__ in (
            "Linear4bit", "Linear8bitLt"
        )
        leaf = full_name.rsplit(".", 1)[-1]
        if is_linear and leaf not in HEAD_NAMES:
            names.add(leaf)
    return sorted(names)


def resolve_lora_targets(model: Any, requested: list[str]) -> list[str]:
    available = linear_module_names(model)
    if [t.lower() for t in requested] == ["all"]:
        if not available:
            raise ModelError(f"{type(model).__name__} has no linear layers that LoRA can target")
        return available
    for name in requested:
        if name not in available:
            raise ConfigError(
                f"lora_target {name!r} is not a linear module of {type(model).__name__}"
                f"{did_you_mean(name, available)}; its linear modules are: {', '.join(available)} "
                "(or use lora_target: all)"
            )
    return list(requested)


def apply_lora(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig,
               task_type: str = "CAUSAL_LM", continue_adapter: bool = True) -> Any:
    """LoRA on `model`. Given adapters: earlier ones are merged into the base and the last
    is trained further; with `continue_adapter=False` (a new head, e.g. a reward model)
    all of them are merged and a fresh adapter is made."""
    from peft import LoraConfig, get_peft_model

    from lathe.model.load import load_adapter  # one-line errors for a missing or misfit adapter

    adapters = model_cfg.adapter_name_or_path or []
    keep = adapters[-1:] if continue_adapter else []
    base = str(model_cfg.model_name_or_path)
    for path in adapters[:len(adapters) - len(keep)]:  # merged into the base
        model = load_adapter(model, path, base).merge_and_unload()
    if keep:
        return load_adapter(model, keep[0], base, is_trainable=True)
    config = LoraConfig(
        task_type=task_type,
        r=ft.lora_rank,
        lora_alpha=ft.lora_alpha if ft.lora_alpha is not None else 2 * ft.lora_rank,
        lora_dropout=ft.lora_dropout,
        target_modules=resolve_lora_targets(model, ft.lora_target),
        use_dora=ft.use_dora,
        use_rslora=ft.use_rslora,
        modules_to_save=resolve_additional_targets(model, ft.additional_target) or None,
    )
    return get_peft_model(model, config)


def resolve_additional_targets(model: Any, requested: list[str] | None) -> list[str]:
    """additional_target names must be modules of the model (peft would skip a typo silently)."""
    if not requested:
        return []
    leaves = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
    for name in requested:
        if name not in leaves:
            raise ConfigError(
                f"additional_target {name!r} is not a module of {type(model).__name__}"
                f"{did_you_mean(name, leaves)}; e.g. embed_tokens or lm_head"
            )
    return list(requested)




def apply(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig) -> Any:
    if model_cfg.quantization_bit is not None:  # QLoRA: norms in float32, inputs that take grads
        from peft import prepare_model_for_kbit_training

        # gradient checkpointing stays the run's choice (ready_for_training), not peft's default
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return apply_lora(model, ft, model_cfg)


register(Method(
    name="lora",
    summary="low-rank adapters on linear layers (peft); DoRA, rsLoRA, additional_target; QLoRA",
    apply=apply,
    adapter=True,
    can_merge=True,
    reference="the adapter switched off (continuing an adapter: a frozen copy of it)",
    quantized_base=True,
))
