"""Reward modelling: preference pairs -> a causal LM with a scalar head that scores the
chosen reply above the rejected one.

The backbone is the base model (plus any adapters in adapter_name_or_path, e.g. an SFT
run, merged in) under a new `score` head. LoRA trains a fresh SEQ_CLS adapter, which
peft saves together with the head; freeze trains the last blocks and the head; full
trains everything. The loss is -log sigmoid(r_chosen - r_rejected), a mean over the
pairs of the whole accumulated batch. The run directory holds the weights and
`reward_model.json`, from which `lathe.model.reward.load_reward_model` rebuilds it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.collators import PairwiseCollator
from lathe.data.inspect import mark_trained
from lathe.errors import ConfigError
from lathe.model.adapters import apply_finetuning
from lathe.model.load import pick_dtype, quantization_kwargs
from lathe.model.reward import (
    load_reward_backbone,
    merge_adapters,
    reward_scores,
    score_head,
    write_marker,
)
from lathe.recipes.common import (
    RunResult,
    finish_run,
    install_callbacks,
    log,
    open_stage,
    padding_free_pairs,
    print_summary,
    ready_for_training,
    run_eval,
    start_run,
)

TRAIN_METRIC_PAIRS = 1024  # training pairs re-scored at the end for train_pair_accuracy


def run(cfg: LatheConfig) -> RunResult:
    if cfg.data.packing:
        raise ConfigError("packing applies to stage sft; stage rm scores whole chosen/rejected "
                          "sequences, so remove packing")
    o = open_stage(cfg)  # non-preference data fails here, in one line
    tokenizer, data, notes = o.tokenizer, o.data, o.notes
    example = next(iter(data.train))

    model, merged = build_model(cfg, o.model_path, tokenizer)
    if merged:
        notes.append(f"merged into the backbone before training: {', '.join(merged)}")
    collator = padding_free_pairs(cfg, data, (model,), tokenizer, notes, labels=False)

    start_run(cfg, o)
    print_summary(cfg, model, o.model_path, data, _show_pair(example, tokenizer), notes,
                  example_caption="chosen, then rejected; each is scored at its last token")

    trainer = build_trainer(model, o.args, tokenizer, data.train, data.eval, collator)
    install_callbacks(trainer, cfg, perplexity=False)

    train_metrics: dict[str, Any] = {}
    if cfg.train.do_train:
        train_metrics = dict(trainer.train(resume_from_checkpoint=o.resume_from).metrics)
        train_metrics.update(train_pair_metrics(trainer, data.train))
        trainer.save_model()
        if trainer.is_world_process_zero():
            write_marker(cfg.train.output_dir, _portable(o.model_path), cfg.finetune.finetuning_type,
                         merged, cfg.data.template)
    eval_metrics = run_eval(trainer, perplexity=False) if data.eval is not None else None
    return finish_run(trainer, cfg, tokenizer, train_metrics, eval_metrics, data.test, perplexity=False)


# --- the model ----------------------------------------------------------------------------

def build_model(cfg: LatheConfig, model_path: str, tokenizer: Any) -> tuple[Any, list[str]]:
    """The reward backbone with what trains marked; returns the adapters merged into it."""
    from lathe.model.methods import get_method

    model = load_reward_backbone(model_path, pick_dtype(cfg), cfg.model.trust_remote_code, tokenizer,
                                 **quantization_kwargs(cfg))
    ft = cfg.finetune
    merged: list[str] = []
    if get_method(ft.finetuning_type).adapter:  # a fresh adapter on the backbone; given ones merged first
        merged = [_portable(p) for p in cfg.model.adapter_name_or_path or []]
        model = merge_adapters(model, merged)
        fresh = dataclasses.replace(cfg.model, adapter_name_or_path=None)
        model = apply_finetuning(model, ft, fresh, task_type="SEQ_CLS")  # peft saves `score` with it
    else:
        model = apply_finetuning(model, ft, cfg.model)
        score_head(model).requires_grad_(True)  # the head is new: it always trains
    return ready_for_training(model, cfg), merged


def _portable(path: str) -> str:
    """Absolute for a local folder (the marker is read from elsewhere), else the hub id."""
    return str(Path(path).resolve()) if Path(path).is_dir() else path


def _show_pair(row: dict[str, list[int]], tokenizer: Any) -> str:
    return "\n".join(mark_trained(row[f"{k}_input_ids"], row[f"{k}_labels"], tokenizer, color=False)
                     for k in ("chosen", "rejected"))


# --- loss and metrics: small pure functions -------------------------------------------------

def pairwise_loss(chosen: Any, rejected: Any) -> Any:
    """Per-pair Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (not reduced)."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen.float() - rejected.float())


def pair_accuracy(chosen: Any, rejected: Any) -> float:
    """Fraction of pairs the model orders right (a tie counts as wrong)."""
    return (chosen > rejected).float().mean().item()


def pair_metrics(chosen: Any, rejected: Any) -> dict[str, float]:
    return {"pair_accuracy": pair_accuracy(chosen, rejected),
            "margin": (chosen.float() - rejected.float()).mean().item()}


# --- batching and the trainer -----------------------------------------------------------------

def pair_rewards(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """(r_chosen, r_rejected) for a batch made by PairwiseCollator (chosen rows, then rejected
    rows) or PaddingFreePairCollator (sequences 0..n-1 chosen, n..2n-1 rejected)."""
    if "seq_index" in batch:
        scores = reward_scores(model, batch["input_ids"], position_ids=batch["position_ids"],
                               seq_index=batch["seq_index"])
    else:
        scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def batch_pairs(batch: dict[str, Any]) -> int:
    if "seq_index" in batch:
        return (int(batch["seq_index"].max()) + 1) // 2
    return batch["input_ids"].shape[0] // 2


def build_trainer(model: Any, args: Any, tokenizer: Any, train: Any, eval_data: Any = None,
                  collator: Any = None) -> Any:
    from lathe.recipes.trainers import PairwiseTrainer

    return PairwiseTrainer(model=model, args=args, train_dataset=train, eval_dataset=eval_data,
                            processing_class=tokenizer,
                            data_collator=collator or PairwiseCollator(tokenizer.pad_token_id),
                            compute_metrics=_eval_metrics)


def _eval_metrics(prediction: Any) -> dict[str, float]:
    import torch

    rewards = torch.as_tensor(prediction.predictions)  # (pairs, 2): chosen, rejected
    return pair_metrics(rewards[:, 0], rewards[:, 1])


def train_pair_metrics(trainer: Any, train: Any) -> dict[str, float]:
    """pair_accuracy and margin on (the first TRAIN_METRIC_PAIRS of) the training pairs."""
    sample = train.select(range(min(len(train), TRAIN_METRIC_PAIRS))) if hasattr(train, "select") \
        else train.take(TRAIN_METRIC_PAIRS)
    metrics = trainer.predict(sample, metric_key_prefix="train").metrics
    found = {k: metrics[k] for k in ("train_pair_accuracy", "train_margin") if k in metrics}
    if found:
        log(f"Training pairs: pair accuracy {found['train_pair_accuracy']:.4f}, "
            f"margin {found['train_margin']:.4f}")
    return found
