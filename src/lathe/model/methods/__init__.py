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

from lathe.config.schema import STAGES
from lathe.registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # (model, FinetuneConfig, ModelConfig, task_type) -> the model to train; task_type is peft's
    # (CAUSAL_LM; SEQ_CLS for a reward model), which decides what peft saves beside the adapter
    apply: Callable[..., Any]
    adapter: bool  # the run directory holds an adapter (else the whole model)
    can_merge: bool  # lathe export merges the adapter into the base weights
    reference: str  # what dpo/kto/ppo compare against
    quantized_base: bool  # trains on a 4/8-bit base (QLoRA)
    peft_type: str | None = None  # what its adapter_config.json says (an adapter method)
    stages: tuple[str, ...] = STAGES  # where it trains
    packs: bool = True  # trains on packed batches (position ids restarting per example)
    # what the Trainer needs beside the model: callbacks, optimizer parameter groups
    prepare_trainer: Callable[[Any, Any], None] | None = None  # (trainer, LatheConfig)
    # after the last save of a training run: returns a line for the user, or None
    after_training: Callable[[Any, Any], str | None] | None = None  # (trainer, LatheConfig)


METHODS: Registry[Method] = Registry("finetuning_type")
MODULES = ("lora", "freeze", "full", "ia3", "prompt_learning", "adalora")


def register(method: Method) -> Method:
    METHODS.add(method.name, method)
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        for module in MODULES:  # registered on import, once
            importlib.import_module(f"lathe.model.methods.{module}")
    return METHODS.get(name)


def all_methods() -> list[Method]:
    """Every method, in the order their modules register them."""
    for module in MODULES:
        importlib.import_module(f"lathe.model.methods.{module}")
    return METHODS.values()


def method_of_adapter(folder: str) -> Method | None:
    """The method that trained the adapter in `folder` (its adapter_config.json), if known."""
    import json
    from pathlib import Path

    try:
        peft_type = json.loads((Path(folder) / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError):
        return None
    return method_of_peft_type(peft_type)


def method_of_peft_type(peft_type: str | None) -> Method | None:
    return next((m for m in all_methods() if m.peft_type and m.peft_type == peft_type), None)


# Task heads peft does not know by name (it trains and saves `classifier` and `score` of a
# SEQ_CLS / TOKEN_CLS model, and `qa_outputs` of a QUESTION_ANS one, by itself).
OTHER_HEADS = ("classification_head",)  # BART, T5, MBart: a dense layer and an out_proj
SPAN_HEADS = ("qa_outputs",)  # extractive QA, when peft's task wrapper is not used (task_type None)


def task_heads(model: Any, task_type: str | None) -> list[str]:
    """The new task head(s) of `model` that an adapter must train in full and save with it
    (peft's modules_to_save), beside those peft adds itself; none for a language model."""
    if task_type == "CAUSAL_LM":
        return []
    children = {name for name, _ in model.named_children()}
    return [h for h in OTHER_HEADS + (SPAN_HEADS if task_type is None else ()) if h in children]


def start_from_adapters(model: Any, model_cfg: Any, continue_last: bool = True) -> tuple[Any, bool]:
    """The adapters of `adapter_name_or_path` on `model`: all but the last merged into the base
    (all of them when not `continue_last`), the last one loaded trainable. Returns the model
    and whether an adapter is being continued (then the method adds no new one)."""
    from lathe.model.load import load_adapter  # one-line errors for a missing or misfit adapter

    adapters = list(model_cfg.adapter_name_or_path or [])
    keep = adapters[-1:] if continue_last else []
    base = str(model_cfg.model_name_or_path)
    for path in adapters[:len(adapters) - len(keep)]:
        model = load_adapter(model, path, base).merge_and_unload()
    if keep:
        return load_adapter(model, keep[0], base, is_trainable=True), True
    return model, False
