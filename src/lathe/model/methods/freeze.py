"""Freeze tuning: train the last (or first) N transformer blocks, or chosen modules of them,
plus named modules outside the blocks; everything else keeps its weights."""

from __future__ import annotations

from typing import Any

from lathe.config.schema import FinetuneConfig, ModelConfig
from lathe.errors import ConfigError, ModelError, did_you_mean
from lathe.model.methods import Method, register


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
    outside = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                      if name and not name.startswith(prefix)})
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


def apply(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig, task_type: str = "CAUSAL_LM") -> Any:
    return apply_freeze(model, ft)


register(Method(
    name="freeze",
    summary="train the last (or first) N blocks, or chosen modules of them; the rest frozen",
    apply=apply,
    adapter=False,
    can_merge=True,
    reference="a frozen copy of the starting model (or ref_model)",
    quantized_base=False,
))
