"""Fine-tuning methods, one module each, registered by name (`finetuning_type`).

A method declares how it is applied to a loaded model, whether `lathe export` can merge it
into the base, how dpo/kto/ppo get their reference policy, and whether it trains on a
quantized (QLoRA) base. Its config keys are the schema fields whose metadata names it
(`config/schema.py`, `method=`), so `lathe methods` and the "key of another method" check
come from one place. A new method is one new module here plus its name in the schema's
`finetuning_type` (a test keeps the two in step).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lathe.registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    apply: Callable[[Any, Any, Any], Any]  # (model, FinetuneConfig, ModelConfig) -> model to train
    adapter: bool  # the run directory holds an adapter (else the whole model)
    can_merge: bool  # lathe export merges the adapter into the base weights
    reference: str  # what dpo/kto/ppo compare against
    quantized_base: bool  # trains on a 4/8-bit base (QLoRA)


METHODS: Registry[Method] = Registry("finetuning_type")
MODULES = ("lora", "freeze", "full", "ia3")


def register(method: Method) -> Method:
    METHODS.add(method.name, method)
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        for module in MODULES:  # registered on import, once
            importlib.import_module(f"lathe.model.methods.{module}")
    return METHODS.get(name)


def all_methods() -> list[Method]:
    for module in MODULES:
        importlib.import_module(f"lathe.model.methods.{module}")
    return [METHODS.get(n) for n in MODULES]
