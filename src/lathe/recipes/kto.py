"""Kahneman-Tversky optimisation: single replies tagged desirable or not (kto_tag).

The reference point z0 of the KTO loss is a KL estimate from mismatched pairs: each row
of the data carries, beside itself, its prompt joined with the next row's reply
(`kl_input_ids`, `kl_labels`, formed once over the whole dataset), so any batch size
works, 1 included. Those rows are scored by the policy (no gradient) and the reference,
and z0 = max(0, mean log-ratio over the batch), detached.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lathe.config.schema import LatheConfig
from lathe.data.inspect import mark_trained
from lathe.data.loader import load_stage_data
from lathe.data.templates import check_against_tokenizer, get_template
from lathe.model.load import fix_pad_token, load_tokenizer, resolve_model_path
from lathe.quiet import datasets_bars_off
from lathe.recipes.common import (
    RunResult,
    check_output_dir,
    install_callbacks,
    open_run,
    print_summary,
    read_rows,
)
from lathe.recipes.losses import IGNORE_INDEX, kto_loss
from lathe.recipes.preference import (
    Setup,
    load_policy_and_reference,
    make_trainer_class,
    pad_rows,
    train_and_save,
)

STAGE = "kto"


def run(cfg: LatheConfig) -> RunResult:
    return train_and_save(build(cfg), cfg)


def build(cfg: LatheConfig) -> Setup:
    """Everything up to a ready trainer (tests inspect it before training)."""
    template = get_template(cfg.data.template)
    resume_from = check_output_dir(cfg)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    conversations = read_rows(cfg)  # bad rows are reported before the slow imports

    from transformers import set_seed  # slow: after cheap checks

    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model, model_path)
    notes = [n for n in [fix_pad_token(tokenizer), check_against_tokenizer(template, tokenizer)] if n]
    data = load_stage_data(STAGE, cfg.data, tokenizer, template, seed=cfg.train.seed,
                           conversations=conversations)
    data = replace(data, train=with_kl_rows(data.train, cfg.data.cutoff_len),
                   eval=with_kl_rows(data.eval, cfg.data.cutoff_len) if data.eval is not None else None)
    example = next(iter(data.train))

    model, ref_model = load_policy_and_reference(cfg, model_path, tokenizer, use_reference=True)
    a = cfg.align
    notes.append(f"beta {a.pref_beta}, weights desirable {a.kto_chosen_weight} / "
                 f"undesirable {a.kto_rejected_weight}")

    args = open_run(cfg, has_eval=data.eval is not None, resuming=resume_from is not None)
    shown = mark_trained(example["input_ids"], example["labels"], tokenizer, color=False)
    kind = "desirable" if example["kto_tag"] else "undesirable"
    print_summary(cfg, model, model_path, data, shown, notes,
                  example_caption=f"a {kind} reply, trained tokens marked")

    trainer = make_kto_trainer_class()(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer,
        data_collator=KTOCollator(tokenizer.pad_token_id),
        ref_model=ref_model, align=cfg.align,
    )
    install_callbacks(trainer, cfg, perplexity=False)
    return Setup(trainer, data, tokenizer, template.stop_token_ids(tokenizer), resume_from)


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


class KTOCollator:
    """Rows and their mismatched KL rows (made in the data), padded to one width (`kl_` prefix
    for the latter)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = [(f["input_ids"], f["labels"]) for f in features]
        kl_rows = [(f["kl_input_ids"], f["kl_labels"]) for f in features]
        both = pad_rows(rows + kl_rows, self.pad_id)
        n = len(rows)
        batch = {k: v[:n] for k, v in both.items()}
        batch.update({f"kl_{k}": v[n:] for k, v in both.items()})
        batch["kto_tag"] = torch.tensor([bool(f["kto_tag"]) for f in features])
        return batch


def make_kto_trainer_class() -> type:
    base = make_trainer_class()

    class KTOTrainer(base):
        def __init__(self, *args: Any, align: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.align = align

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            """Mean over examples of the weighted KTO loss; metrics recorded."""
            import torch

            a = self.align
            logps, _ = self.logps(model, inputs)
            with torch.no_grad():
                kl_logps, _ = self.logps(model, inputs, prefix="kl_")
            n = logps.shape[0]
            both = {k: torch.cat([inputs[k], inputs[f"kl_{k}"]])
                    for k in ("input_ids", "attention_mask", "labels")}
            ref_all, _ = self.reference_logps(model, both)  # one pass: rows and KL rows share a width
            ref_logps, ref_kl_logps = ref_all[:n], ref_all[n:]
            tags = inputs["kto_tag"].bool()
            out = kto_loss(logps, ref_logps, tags, kl_logps, ref_kl_logps, beta=a.pref_beta,
                           chosen_weight=a.kto_chosen_weight, rejected_weight=a.kto_rejected_weight)
            self.record(model, "rewards/chosen", out.rewards[tags].sum().item(), tags.sum().item())
            self.record(model, "rewards/rejected", out.rewards[~tags].sum().item(), (~tags).sum().item())
            self.record(model, "kl", out.kl.item(), 1)
            loss = out.losses.mean()
            return (loss, None) if return_outputs else loss

    return KTOTrainer
