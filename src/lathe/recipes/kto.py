"""Kahneman-Tversky optimisation: single replies tagged desirable or not (kto_tag).

The reference point z0 of the KTO loss is a KL estimate from mismatched pairs: each row
of the data carries, beside itself, its prompt joined with the next row's reply
(`kl_input_ids`, `kl_labels`, formed once over the whole dataset), so any batch size
works, 1 included. Those rows are scored by the policy (no gradient) and the reference,
and z0 = max(0, mean log-ratio over the batch), detached.

Batches are padding-free by default, as dpo's pairs are (PaddingFreeKTOCollator): the rows in one
row under Lathe's varlen sdpa, their KL rows in another, so the policy's two passes (with and
without gradient) each read one side only and the reference reads both at once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.collators import KTOCollator
from lathe.data.inspect import mark_trained
from lathe.data.packing import PaddingFreeKTOCollator
from lathe.quiet import datasets_bars_off
from lathe.recipes.common import (
    RunResult,
    fused_loss_head,
    install_callbacks,
    open_stage,
    padding_free_pairs,
    print_summary,
    start_run,
)
from lathe.recipes.losses import IGNORE_INDEX
from lathe.recipes.preference import (
    Setup,
    load_policy_and_reference,
    train_and_save,
)

STAGE = "kto"


def run(cfg: LatheConfig) -> RunResult:
    return train_and_save(build(cfg), cfg)


def build(cfg: LatheConfig) -> Setup:
    """Everything up to a ready trainer (tests inspect it before training)."""
    o = open_stage(cfg)
    tokenizer, notes = o.tokenizer, o.notes
    data = replace(o.data, train=with_kl_rows(o.data.train, cfg.data.cutoff_len),
                   eval=with_kl_rows(o.data.eval, cfg.data.cutoff_len) if o.data.eval is not None else None)
    example = next(iter(data.train))

    model, ref_model = load_policy_and_reference(cfg, o.model_path, tokenizer, use_reference=True)
    a = cfg.align
    notes.append(f"beta {a.pref_beta}, weights desirable {a.kto_chosen_weight} / "
                 f"undesirable {a.kto_rejected_weight}")
    collator = padding_free_pairs(cfg, data, (model, ref_model), tokenizer, notes, kind=PaddingFreeKTOCollator) \
        or KTOCollator(tokenizer.pad_token_id)  # padding-free: the rows in one row, the KL rows in another
    head, note = fused_loss_head(cfg, model)
    if note:
        notes.append(note.replace("cross-entropy", "log-probs"))

    start_run(cfg, o)
    shown = mark_trained(example["input_ids"], example["labels"], tokenizer, color=False)
    kind = "desirable" if example["kto_tag"] else "undesirable"
    print_summary(cfg, model, o.model_path, data, shown, notes,
                  example_caption=f"a {kind} reply, trained tokens marked")

    from lathe.recipes.trainers import KTOTrainer  # transformers: after the cheap checks

    trainer = KTOTrainer(
        model=model, args=o.args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer,
        data_collator=collator,
        ref_model=ref_model, align=cfg.align, fused=head is not None,
    )
    install_callbacks(trainer, cfg, perplexity=False)
    return Setup(trainer, data, tokenizer, o.template.stop_token_ids(tokenizer), o.resume_from)


def split_prompt(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt, reply): the reply starts at the first labelled token."""
    start = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
    return ids[:start], ids[start:]


def mismatched_rows(features: list[dict[str, Any]], cutoff_len: int) -> list[tuple[list[int], list[int]]]:
    """Prompt i with the reply of row i+1 (cyclic), cut to cutoff_len, the reply labelled."""
    parts = [split_prompt(f["input_ids"], f["labels"]) for f in features]
    rows = []
    for i, (prompt, _) in enumerate(parts):
        reply = parts[(i + 1) % len(parts)][1][:max(cutoff_len - len(prompt), 1)]
        rows.append((prompt + reply, [IGNORE_INDEX] * len(prompt) + reply))
    return rows


# Rows paired per map() call when the data is a stream (its length is unknown).
STREAM_CHUNK = 1000


def with_kl_rows(ds: Any, cutoff_len: int) -> Any:
    """`ds` with each row's mismatched KL row (its prompt + the next row's reply, cyclic over
    the whole dataset; over chunks of STREAM_CHUNK rows for a stream)."""
    from datasets import Dataset

    def pair(batch: dict[str, list]) -> dict[str, list]:
        features = [{"input_ids": i, "labels": lab} for i, lab in zip(batch["input_ids"], batch["labels"])]
        rows = mismatched_rows(features, cutoff_len)
        return {"kl_input_ids": [r[0] for r in rows], "kl_labels": [r[1] for r in rows]}

    if isinstance(ds, Dataset):
        with datasets_bars_off():
            return ds.map(pair, batched=True, batch_size=max(len(ds), 1), keep_in_memory=True)
    return ds.map(pair, batched=True, batch_size=STREAM_CHUNK)
