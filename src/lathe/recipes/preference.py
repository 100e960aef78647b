"""What dpo and kto share: policy + reference setup, padding, a Trainer that logs
reward metrics, and saving without the frozen "ref" adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.model.adapters import apply_finetuning
from lathe.model.load import load_model, pick_dtype, resolve_model_path
from lathe.model.reference import (
    REF_ADAPTER,
    add_reference_adapter,
    is_peft,
    load_reference_model,
)
from lathe.recipes.common import RunResult, finish_run, ready_for_training, run_eval

# --- policy and reference ----------------------------------------------------------------

def load_policy_and_reference(cfg: LatheConfig, model_path: str, tokenizer: Any,
                              use_reference: bool) -> tuple[Any, Any | None]:
    """The trainable policy and, for full/freeze (or an explicit ref_model), a frozen copy.

    LoRA needs no copy: the reference is the policy with its adapter off, or, when an
    adapter is continued (adapter_name_or_path), that adapter frozen under "ref".
    """
    model = apply_finetuning(load_model(cfg, model_path, tokenizer), cfg.finetune, cfg.model)
    model = ready_for_training(model, cfg)
    if not use_reference:
        return model, None
    if cfg.align.ref_model or not is_peft(model):
        path = resolve_model_path(cfg.align.ref_model) if cfg.align.ref_model else model_path
        ref = load_reference_model(path, pick_dtype(cfg), cfg.model.trust_remote_code)
        if len(tokenizer) > ref.get_input_embeddings().weight.shape[0]:
            ref.resize_token_embeddings(len(tokenizer))  # as load_model did for the policy
        return model, ref
    if cfg.model.adapter_name_or_path and not cfg.finetune.create_new_adapter:
        add_reference_adapter(model, cfg.model.adapter_name_or_path[-1])
    return model, None


def held_parameters(trainer: Any) -> int:
    """Parameters held by the policy and any reference the trainer keeps, each tensor once."""
    seen: set[int] = set()
    total = 0
    for module in (trainer.model, getattr(trainer, "ref_model", None)):
        if module is None:
            continue
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def drop_reference_adapter(model: Any) -> None:
    """The run directory must hold only the trained adapter (plain peft loads it)."""
    if is_peft(model) and REF_ADAPTER in model.peft_config:
        model.delete_adapter(REF_ADAPTER)


# --- batches -----------------------------------------------------------------------------

# --- the trainer ---------------------------------------------------------------------------

# --- after training --------------------------------------------------------------------------

@dataclass
class Setup:
    """A built trainer and what the run needs after it (for tests: inspect before training)."""

    trainer: Any
    data: Any
    tokenizer: Any
    stop_ids: list[int]
    resume_from: str | None


def train_and_save(setup: Setup, cfg: LatheConfig) -> RunResult:
    """Train, evaluate (the reference is still needed), drop "ref", save like sft."""
    from lathe.infer import set_stop_tokens

    trainer = setup.trainer
    train_metrics: dict[str, float] = {}
    if cfg.train.do_train:
        train_metrics = dict(trainer.train(resume_from_checkpoint=setup.resume_from).metrics)
    eval_metrics = run_eval(trainer, perplexity=False) if setup.data.eval is not None else None
    drop_reference_adapter(trainer.model)
    if cfg.train.do_train:
        set_stop_tokens(trainer.model, setup.stop_ids)
        trainer.save_model()
    return finish_run(trainer, cfg, setup.tokenizer, train_metrics, eval_metrics, setup.data.test,
                      perplexity=False)
