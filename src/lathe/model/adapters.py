"""What is trained: LoRA (via peft), the last N blocks (freeze), or everything (full)."""

from __future__ import annotations

from typing import Any

from lathe.config.schema import FinetuneConfig, ModelConfig
from lathe.errors import ConfigError, ModelError, did_you_mean

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


def num_blocks(model: Any) -> tuple[str, int]:
    """The qualified name of the decoder block list and its length."""
    import torch.nn as nn

    cfg = model.config
    n = next(
        (getattr(cfg, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if getattr(cfg, k, None)),
        None,
    )
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (n is None or len(module) == n):
            return name, len(module)
    raise ModelError(f"cannot find the transformer blocks of {type(model).__name__} for freeze tuning")


def apply_freeze(model: Any, ft: FinetuneConfig) -> Any:
    """Train only the last (or first, if negative) N blocks, plus any extra modules."""
    prefix, n = num_blocks(model)
    k = ft.freeze_trainable_layers
    if abs(k) > n:
        raise ConfigError(f"freeze_trainable_layers={k}, but {type(model).__name__} has only {n} blocks")
    layer_ids = range(n - k, n) if k > 0 else range(0, -k)
    block_children = sorted({name.split(".")[0] for name, _ in model.get_submodule(prefix)[0].named_children()})
    wanted = ft.freeze_trainable_modules
    if wanted != ["all"]:
        for m in wanted:
            if m not in block_children:
                raise ConfigError(
                    f"freeze_trainable_modules {m!r} is not a module of a block{did_you_mean(m, block_children)}; "
                    f"a block has: {', '.join(block_children)}"
                )
    extra = ft.freeze_extra_modules or []
    outside = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name and not name.startswith(prefix)})
    for m in extra:
        if m not in outside:
            raise ConfigError(
                f"freeze_extra_modules {m!r} is not a module outside the blocks{did_you_mean(m, outside)}"
            )

    block_prefixes = [f"{prefix}.{i}." for i in layer_ids]
    for name, param in model.named_parameters():
        in_block = next((p for p in block_prefixes if name.startswith(p)), None)
        if in_block is not None:
            sub = name[len(in_block):].split(".")[0]
            param.requires_grad = wanted == ["all"] or sub in wanted
        else:
            parts = name.split(".")
            param.requires_grad = not name.startswith(prefix + ".") and any(m in parts for m in extra)
    return model


def apply_finetuning(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig) -> Any:
    if ft.finetuning_type == "lora":
        if model_cfg.quantization_bit is not None:  # QLoRA: norms in float32, inputs that take grads
            from peft import prepare_model_for_kbit_training

            # gradient checkpointing stays the run's choice (ready_for_training), not peft's default
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return apply_lora(model, ft, model_cfg)
    if ft.finetuning_type == "freeze":
        return apply_freeze(model, ft)
    for param in model.parameters():
        param.requires_grad = True
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total), counting each tensor once."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)  # two 4-bit weights a byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
