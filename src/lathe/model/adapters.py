"""What is trained: the method named by finetuning_type (lathe.model.methods), and counting it."""

from __future__ import annotations

from typing import Any

from lathe.config.schema import FinetuneConfig, ModelConfig
from lathe.model.methods import get_method


def apply_finetuning(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig,
                     task_type: str | None = "CAUSAL_LM") -> Any:
    """The model with what `ft.finetuning_type` trains marked trainable (adapters added)."""
    return get_method(ft.finetuning_type).apply(model, ft, model_cfg, task_type=task_type)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total), counting each tensor once."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())  # DeepSpeed ZeRO-3: this rank holds a shard
        n *= (2 if type(param).__name__ == "Params4bit" else 1)  # two 4-bit weights a byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
