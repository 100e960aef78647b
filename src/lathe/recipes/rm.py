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
import functools
import os
from pathlib import Path
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.inspect import mark_trained
from lathe.data.loader import load_stage_data
from lathe.data.packing import PAD_MULTIPLE
from lathe.data.templates import check_against_tokenizer, get_template
from lathe.errors import ConfigError
from lathe.model.adapters import apply_finetuning
from lathe.model.load import fix_pad_token, load_tokenizer, pick_dtype, resolve_model_path
from lathe.model.methods.lora import apply_lora
from lathe.model.reward import (
    load_reward_backbone,
    merge_adapters,
    reward_scores,
    score_head,
    write_marker,
)
from lathe.recipes.common import (
    RunResult,
    check_output_dir,
    finish_run,
    install_callbacks,
    log,
    open_run,
    print_summary,
    read_rows,
    ready_for_training,
    run_eval,
)

TRAIN_METRIC_PAIRS = 1024  # training pairs re-scored at the end for train_pair_accuracy


def run(cfg: LatheConfig) -> RunResult:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("stage rm runs in a single process for now (the reward is read inside "
                          "the model, past DDP's wrapper); start it without torchrun/accelerate")
    if cfg.data.packing:
        raise ConfigError("packing applies to stage sft; stage rm scores whole chosen/rejected "
                          "sequences, so remove packing")
    template = get_template(cfg.data.template)
    resume_from = check_output_dir(cfg)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    conversations = read_rows(cfg)  # non-preference data fails here, in one line

    from transformers import set_seed  # slow: after cheap checks

    set_seed(cfg.train.seed)  # before the head and adapters are created: their init is random
    tokenizer = load_tokenizer(cfg.model, model_path)
    notes = [n for n in [fix_pad_token(tokenizer), check_against_tokenizer(template, tokenizer)] if n]
    data = load_stage_data("rm", cfg.data, tokenizer, template, seed=cfg.train.seed,
                           conversations=conversations)
    example = next(iter(data.train))

    model, merged = build_model(cfg, model_path, tokenizer)
    if merged:
        notes.append(f"merged into the backbone before training: {', '.join(merged)}")

    args = open_run(cfg, has_eval=data.eval is not None, resuming=resume_from is not None)
    print_summary(cfg, model, model_path, data, _show_pair(example, tokenizer), notes,
                  example_caption="chosen, then rejected; each is scored at its last token")

    trainer = build_trainer(model, args, tokenizer, data.train, data.eval)
    install_callbacks(trainer, cfg, perplexity=False)

    train_metrics: dict[str, Any] = {}
    if cfg.train.do_train:
        train_metrics = dict(trainer.train(resume_from_checkpoint=resume_from).metrics)
        train_metrics.update(train_pair_metrics(trainer, data.train))
        trainer.save_model()
        if trainer.is_world_process_zero():
            write_marker(cfg.train.output_dir, _portable(model_path), cfg.finetune.finetuning_type,
                         merged, cfg.data.template)
    eval_metrics = run_eval(trainer, perplexity=False) if data.eval is not None else None
    return finish_run(trainer, cfg, tokenizer, train_metrics, eval_metrics)


# --- the model ----------------------------------------------------------------------------

def build_model(cfg: LatheConfig, model_path: str, tokenizer: Any) -> tuple[Any, list[str]]:
    """The reward backbone with what trains marked; returns the adapters merged into it."""
    model = load_reward_backbone(model_path, pick_dtype(cfg), cfg.model.trust_remote_code, tokenizer)
    ft = cfg.finetune
    merged: list[str] = []
    if ft.finetuning_type == "lora":
        merged = [_portable(p) for p in cfg.model.adapter_name_or_path or []]
        model = merge_adapters(model, merged)
        fresh = dataclasses.replace(cfg.model, adapter_name_or_path=None)
        model = apply_lora(model, ft, fresh, task_type="SEQ_CLS")  # peft saves `score` with it
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

@dataclasses.dataclass
class PairwiseCollator:
    """Chosen rows, then rejected rows, in one right-padded batch, so one forward scores both
    (the score is read at the last token with attention_mask 1, whatever the pad id)."""

    pad_token_id: int
    pad_to_multiple_of: int = PAD_MULTIPLE

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        m = self.pad_to_multiple_of
        length = -(-max(map(len, seqs)) // m) * m
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, seq in enumerate(seqs):
            input_ids[i, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            attention_mask[i, :len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def pair_rewards(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """(r_chosen, r_rejected) for a batch made by PairwiseCollator."""
    scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def build_trainer(model: Any, args: Any, tokenizer: Any, train: Any, eval_data: Any = None) -> Any:
    return _trainer_class()(model=model, args=args, train_dataset=train, eval_dataset=eval_data,
                            processing_class=tokenizer,
                            data_collator=PairwiseCollator(tokenizer.pad_token_id),
                            compute_metrics=_eval_metrics)


def _eval_metrics(prediction: Any) -> dict[str, float]:
    import torch

    rewards = torch.as_tensor(prediction.predictions)  # (pairs, 2): chosen, rejected
    return pair_metrics(rewards[:, 0], rewards[:, 1])


@functools.cache
def _trainer_class() -> type:
    import torch
    from transformers import Trainer

    class PairwiseTrainer(Trainer):
        """The pairwise loss, averaged over every pair of the accumulated batch: the Trainer
        counts the pairs of all its micro-batches (get_batch_samples) and each micro-batch
        contributes sum(loss) / pairs, so accumulation equals one large batch even when the
        last micro-batch is smaller."""

        loss_is_scaled_for_ga = True

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            pairs = torch.tensor(sum(b["input_ids"].shape[0] // 2 for b in batches), device=device)
            return batches, pairs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            chosen, rejected = pair_rewards(model, inputs)
            losses = pairwise_loss(chosen, rejected)
            loss = losses.mean() if num_items_in_batch is None else losses.sum() / num_items_in_batch
            return (loss, torch.stack([chosen, rejected], -1)) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                chosen, rejected = pair_rewards(model, inputs)
                loss = pairwise_loss(chosen, rejected).mean().detach()
            if prediction_loss_only:
                return loss, None, None
            # labels are a placeholder: the Trainer only calls compute_metrics when there are some
            return loss, torch.stack([chosen, rejected], -1).detach(), torch.zeros_like(chosen)

    return PairwiseTrainer


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
