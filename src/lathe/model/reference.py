"""The reference policy of dpo, kto and ppo, without a second model copy where possible.

- LoRA on a fresh adapter: the reference is the base model, i.e. the policy with its
  adapter disabled (no extra memory).
- LoRA continuing an adapter (e.g. the SFT run's, via adapter_name_or_path): the
  reference is that adapter as it was at the start, loaded once more, frozen, under
  the name "ref" (the memory of one adapter, not of a model).
- full / freeze: a frozen copy of the starting model (or of `ref_model` when given).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

REF_ADAPTER = "ref"


def add_reference_adapter(model: Any, adapter_path: str | None) -> None:
    """Keep a frozen copy of the adapter being continued as the reference (LoRA only)."""
    if adapter_path is None:
        return
    model.load_adapter(adapter_path, adapter_name=REF_ADAPTER, is_trainable=False)
    model.set_adapter("default")  # training continues on the original adapter
    for name, param in model.named_parameters():
        if f".{REF_ADAPTER}." in name:
            param.requires_grad = False


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextlib.contextmanager
def as_reference(model: Any) -> Iterator[Any]:
    """Inside the block, `model` computes the reference policy (LoRA models only)."""
    if not is_peft(model):
        raise ValueError("as_reference needs a peft model; full tuning keeps a separate reference")
    if REF_ADAPTER in model.peft_config:
        active = model.active_adapter
        model.set_adapter(REF_ADAPTER)
        try:
            yield model
        finally:
            model.set_adapter(active)
            for name, param in model.named_parameters():  # set_adapter marks the adapter trainable
                if f".{REF_ADAPTER}." in name:
                    param.requires_grad = False
    else:
        with model.disable_adapter():
            yield model


def load_reference_model(path: str, dtype: Any, trust_remote_code: bool) -> Any:
    """A frozen, eval-mode causal LM used as the reference for full / freeze tuning."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    ref.eval()
    ref.requires_grad_(False)
    return ref
