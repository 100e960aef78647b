"""Full fine-tuning: every weight trains."""

from __future__ import annotations

from typing import Any

from lathe.config.schema import FinetuneConfig, ModelConfig
from lathe.model.methods import Method, register


def apply(model: Any, ft: FinetuneConfig, model_cfg: ModelConfig, task_type: str = "CAUSAL_LM") -> Any:
    for param in model.parameters():
        param.requires_grad = True
    return model


register(Method(
    name="full",
    summary="every weight trains",
    apply=apply,
    adapter=False,
    can_merge=True,
    reference="a frozen copy of the starting model (or ref_model)",
    quantized_base=False,
))
