"""Tokenized rows -> batches, for every stage, through one right-padding helper.

Rows are padded on the RIGHT to a multiple of PAD_MULTIPLE: ids with the pad token, labels
with IGNORE_INDEX (not trained), attention_mask 1 over the real tokens. Stages that score
two sequences per example (dpo, rm) or a row and its KL row (kto) put both in one block, so
one forward pass covers them. (Packing has its own collator in packing.py; generation pads
on the left, in lathe.infer.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lathe.data.processors import IGNORE_INDEX

PAD_MULTIPLE = 8  # tensor shapes that repeat: fewer kernel variants, tidier memory


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
        input_ids[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, :len(lab)] = torch.as_tensor(lab, dtype=torch.long)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass
class LMCollator:
    """pt and sft: each row's ids and labels."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return pad_rows([(f["input_ids"], f["labels"]) for f in features], self.pad_id)


@dataclass
class PairCollator:
    """dpo: chosen rows first, then rejected rows, right-padded together."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [(f["chosen_input_ids"], f["chosen_labels"]) for f in features]
        rows += [(f["rejected_input_ids"], f["rejected_labels"]) for f in features]
        return pad_rows(rows, self.pad_id)


@dataclass
class PairwiseCollator:
    """rm: chosen rows, then rejected rows, in one block without labels (the reward is read at
    the last token with attention_mask 1, whatever the pad id)."""

    pad_token_id: int
    pad_to_multiple_of: int = PAD_MULTIPLE

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        seqs = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        batch = pad_rows([(s, []) for s in seqs], self.pad_token_id, self.pad_to_multiple_of)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@dataclass
class KTOCollator:
    """kto: the rows and their mismatched KL rows (made in the data), padded to one width;
    the KL rows' tensors carry a `kl_` prefix."""

    pad_id: int

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


def add_token_types(batch: dict[str, Any], features: list[dict[str, Any]]) -> None:
    """token_type_ids, right-padded with 0, for models that read them (BERT: 1 on a text pair's
    second text); rows without them (GPT-2 would add a token's embedding) add none."""
    import torch

    if not any(f.get("token_type_ids") for f in features):
        return
    types = torch.zeros_like(batch["input_ids"])
    for i, f in enumerate(features):
        types[i, :len(f["token_type_ids"])] = torch.as_tensor(f["token_type_ids"], dtype=torch.long)
    batch["token_type_ids"] = types


@dataclass
class ClassifierCollator:
    """cls: right-padded ids, attention mask and token type ids, and one label per row: a class
    id (long), or a multi-hot row / a number (float: BCE and MSE losses want floats)."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = pad_rows([(f["input_ids"], []) for f in features], self.pad_id)
        del batch["labels"]
        add_token_types(batch, features)
        labels = [f["labels"] for f in features]
        dtype = torch.long if isinstance(labels[0], int) else torch.float
        batch["labels"] = torch.as_tensor(labels, dtype=dtype)
        return batch


@dataclass
class TaggerCollator:
    """tagging: right-padded ids and one label per piece (IGNORE_INDEX on padding), token type
    ids for models that read them."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:

        batch = pad_rows([(f["input_ids"], f["labels"]) for f in features], self.pad_id)
        add_token_types(batch, features)
        return batch


@dataclass
class Seq2SeqCollator:
    """seq2seq: right-padded source ids and attention mask; the targets padded apart (their own
    length) with IGNORE_INDEX, and the decoder inputs made from them by `decoder_inputs` (the
    model's prepare_decoder_input_ids_from_labels; without it the model makes them itself)."""

    pad_id: int
    decoder_inputs: Any = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad_rows([(f["input_ids"], []) for f in features], self.pad_id)
        batch["labels"] = pad_rows([(f["labels"], f["labels"]) for f in features], self.pad_id)["labels"]
        if self.decoder_inputs is not None:
            batch["decoder_input_ids"] = self.decoder_inputs(labels=batch["labels"])
        return batch


@dataclass
class QACollator:
    """qa: right-padded ids (question, then a window of the context) and the answer's start
    and end token positions."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = pad_rows([(f["input_ids"], []) for f in features], self.pad_id)
        del batch["labels"]
        add_token_types(batch, features)
        batch["start_positions"] = torch.as_tensor([f["start_positions"] for f in features], dtype=torch.long)
        batch["end_positions"] = torch.as_tensor([f["end_positions"] for f in features], dtype=torch.long)
        return batch


@dataclass
class EmbedCollator:
    """embed: anchors, positives and (where given) hard negatives, each right-padded as its own
    block (anchor_*, positive_*, negative_*), and the pairs' scores when they have them."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import math

        import torch

        batch: dict[str, Any] = {}
        blocks = {"anchor": [f["input_ids"] for f in features], "positive": [f["positive_ids"] for f in features],
                  "negative": [f["negative_ids"] for f in features if f.get("negative_ids")]}
        for name, rows in blocks.items():
            if rows:
                padded = pad_rows([(ids, []) for ids in rows], self.pad_id)
                batch[f"{name}_input_ids"] = padded["input_ids"]
                batch[f"{name}_attention_mask"] = padded["attention_mask"]
        scores = [f.get("score") for f in features]
        if all(s is not None and not math.isnan(s) for s in scores):
            batch["scores"] = torch.as_tensor(scores, dtype=torch.float)
        return batch
