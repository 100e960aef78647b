"""What dpo and kto share: policy + reference setup, padding, a Trainer that logs
reward metrics, and saving without the frozen "ref" adapter."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.packing import PAD_MULTIPLE
from lathe.model.adapters import apply_finetuning
from lathe.model.load import load_model, pick_dtype, resolve_model_path
from lathe.model.reference import (
    REF_ADAPTER,
    add_reference_adapter,
    as_reference,
    is_peft,
    load_reference_model,
)
from lathe.recipes.common import RunResult, finish_run, ready_for_training, run_eval
from lathe.recipes.losses import IGNORE_INDEX, sequence_logps

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

def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int,
             multiple: int = PAD_MULTIPLE) -> dict[str, Any]:
    """(ids, labels) rows -> right-padded input_ids, attention_mask, labels tensors."""
    import torch

    longest = max(len(ids) for ids, _ in rows)
    width = -(-longest // multiple) * multiple
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# --- the trainer ---------------------------------------------------------------------------

def make_trainer_class() -> type:
    """transformers.Trainer is imported lazily, so the base class is built on demand."""
    from transformers import Trainer

    class PolicyReferenceTrainer(Trainer):
        """A Trainer whose subclass computes a preference loss in `compute_loss`.

        The loss is a mean over pairs/examples, not over tokens, so it must be divided
        by the accumulation steps like a plain mean: `loss_is_scaled_for_ga = False`
        says so (otherwise a batch with "labels" and a model taking loss kwargs would
        be treated as already normalised by `num_items_in_batch`).
        """

        loss_is_scaled_for_ga = False

        def __init__(self, *args: Any, ref_model: Any = None, use_reference: bool = True,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.ref_model = ref_model.to(self.args.device) if ref_model is not None else None
            self.use_reference = use_reference
            self._stats: dict[str, dict[str, list[float]]] = {
                "train": defaultdict(lambda: [0.0, 0.0]), "eval": defaultdict(lambda: [0.0, 0.0])}

        # -- log-probs
        def logps(self, model: Any, batch: dict[str, Any], prefix: str = "") -> tuple[Any, Any]:
            """Summed log-probs of the labelled tokens and their count, per row."""
            ids = batch[f"{prefix}input_ids"]
            logits = model(input_ids=ids, attention_mask=batch[f"{prefix}attention_mask"], use_cache=False).logits
            # P-tuning and prompt tuning return logits for their virtual tokens too, in front
            return sequence_logps(logits[:, -ids.shape[1]:], batch[f"{prefix}labels"])

        def reference_logps(self, model: Any, batch: dict[str, Any], prefix: str = "") -> tuple[Any, Any]:
            import torch

            with torch.no_grad(), self.reference(model) as ref:
                return self.logps(ref, batch, prefix)

        @contextlib.contextmanager
        def reference(self, model: Any) -> Iterator[Any]:
            """The reference policy, in eval mode (deterministic: no dropout)."""
            if self.ref_model is not None:
                yield self.ref_model
                return
            policy = self.accelerator.unwrap_model(model)
            was_training = policy.training
            policy.eval()
            try:
                with as_reference(policy) as ref:
                    yield ref
            finally:
                policy.train(was_training)

        # -- metrics: summed per micro-batch, averaged when the Trainer logs
        def record(self, model: Any, key: str, total: float, count: float) -> None:
            stats = self._stats["train" if model.training else "eval"][key]
            stats[0] += float(total)
            stats[1] += float(count)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
            if mode is not None:
                prefix = "eval_" if mode == "eval" else ""
                means = {k: s / c for k, (s, c) in self._stats[mode].items() if c}
                if {"rewards/chosen", "rewards/rejected"} <= means.keys() and "rewards/margins" not in means:
                    means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
                logs.update({prefix + k: v for k, v in sorted(means.items())})
                self._stats[mode].clear()
            super().log(logs, start_time)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            """Checkpoints hold only the trained adapter: peft writes every adapter, and the
            frozen "ref" copy is rebuilt from adapter_name_or_path on resume anyway."""
            import shutil
            from pathlib import Path

            super()._save(output_dir, state_dict)
            ref_dir = Path(output_dir if output_dir is not None else self.args.output_dir) / REF_ADAPTER
            if self.args.should_save and ref_dir.is_dir() and (ref_dir / "adapter_config.json").is_file():
                shutil.rmtree(ref_dir)

        def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                            ignore_keys: list[str] | None = None) -> tuple[Any, None, None]:
            """Evaluation = the same loss (and metrics) without gradients."""
            import torch

            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return PolicyReferenceTrainer


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
    return finish_run(trainer, cfg, setup.tokenizer, train_metrics, eval_metrics)
