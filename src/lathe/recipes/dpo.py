"""Direct preference optimisation (pref_loss sigmoid | hinge | ipo | orpo | simpo).

tokenizer -> preference pairs -> policy (+ reference) -> trainer -> save. A batch is
one block, chosen rows then rejected rows: padding-free by default (each side's replies in one
row under Lathe's varlen sdpa, else side by side in rows no longer than the longest;
PaddingFreePairCollator), else right-padded. Log-probs
come from the final hidden states and the output layer a chunk at a time (fused_loss), so the
batch's logits never exist whole. By default the two halves go
forward and backward one after the other (`pref_split_backward`, see `training_step`),
so DPO holds the activations of one side only; orpo and simpo need no reference, so
none is loaded or run.
"""

from __future__ import annotations

from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.collators import PairCollator
from lathe.data.inspect import mark_trained
from lathe.recipes.common import (
    RunResult,
    fused_loss_head,
    install_callbacks,
    open_stage,
    padding_free_pairs,
    print_summary,
    start_run,
)
from lathe.recipes.losses import REFERENCE_FREE
from lathe.recipes.preference import (
    Setup,
    load_policy_and_reference,
    train_and_save,
)

STAGE = "dpo"


def run(cfg: LatheConfig) -> RunResult:
    return train_and_save(build(cfg), cfg)


def build(cfg: LatheConfig) -> Setup:
    """Everything up to a ready trainer (tests inspect it before training)."""
    o = open_stage(cfg)  # bad rows (e.g. sft data, no ranking: true) before the slow imports
    tokenizer, data, notes = o.tokenizer, o.data, o.notes
    example = next(iter(data.train))

    use_reference = cfg.align.pref_loss not in REFERENCE_FREE
    model, ref_model = load_policy_and_reference(cfg, o.model_path, tokenizer, use_reference)
    notes.append(_reference_note(cfg, use_reference, ref_model))
    collator = padding_free_pairs(cfg, data, (model, ref_model), tokenizer, notes) \
        or PairCollator(tokenizer.pad_token_id)  # padding-free: each side of the batch in one row
    head, note = fused_loss_head(cfg, model)
    if note:
        notes.append(note.replace("cross-entropy", "log-probs"))

    start_run(cfg, o)
    shown = mark_trained(example["chosen_input_ids"], example["chosen_labels"], tokenizer, color=False)
    print_summary(cfg, model, o.model_path, data, shown, notes,
                  example_caption="a chosen reply, trained tokens marked")

    from lathe.recipes.trainers import DPOTrainer  # transformers: after the cheap checks

    trainer = DPOTrainer(
        model=model, args=o.args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer, data_collator=collator,
        ref_model=ref_model, use_reference=use_reference, align=cfg.align, fused=head is not None,
    )
    install_callbacks(trainer, cfg, perplexity=False)
    return Setup(trainer, data, tokenizer, o.template.stop_token_ids(tokenizer), o.resume_from)


def _reference_note(cfg: LatheConfig, use_reference: bool, ref_model: Any) -> str:
    a = cfg.align
    if not use_reference:
        ref = "none (reference-free)"
    elif ref_model is not None:
        ref = f"a frozen copy of {a.ref_model or 'the starting model'}"
    elif cfg.model.adapter_name_or_path and not cfg.finetune.create_new_adapter:
        ref = "the continued adapter, frozen as 'ref'"
    else:
        merged = " with the given adapters merged" if cfg.model.adapter_name_or_path else ""
        ref = f"the base model{merged} (adapter disabled)"
    return f"pref_loss {a.pref_loss}, beta {a.pref_beta}, pref_ftx {a.pref_ftx}; reference: {ref}"
