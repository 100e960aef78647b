"""Conversations -> input_ids + labels for supervised fine-tuning.

Prompt tokens get label -100 (not trained); each assistant reply, including its end
token, is trained. When a conversation is longer than `cutoff_len`, each turn's
prompt and reply are cut in proportion to their lengths, and later turns are
dropped first. A row whose reply would vanish entirely is dropped and counted,
never trained on an empty label.
"""

from __future__ import annotations

from typing import Any

from lathe.data.conversation import Conversation
from lathe.data.templates import Template

IGNORE_INDEX = -100


def split_budget(prompt_len: int, response_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and response tokens of one turn fit in `budget` tokens."""
    if prompt_len + response_len <= budget:
        return prompt_len, response_len
    if budget <= 0:
        return 0, 0
    keep_response = round(budget * response_len / (prompt_len + response_len))
    keep_response = min(response_len, max(keep_response, 1 if response_len else 0))
    keep_prompt = min(prompt_len, budget - keep_response)
    return keep_prompt, keep_response


def tokenize_conversation(
    conv: Conversation,
    template: Template,
    tokenizer: Any,
    cutoff_len: int,
    train_on_prompt: bool = False,
    train_on_last_turn_only: bool = False,
) -> dict[str, list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    budget = cutoff_len
    turns = template.encode_turns(conv, tokenizer)
    for i, (prompt, response) in enumerate(turns):
        if budget <= 0:
            break  # later turns are dropped first
        keep_p, keep_r = split_budget(len(prompt), len(response), budget)
        # Keep the end of the prompt (it holds the assistant header) and the start of the reply.
        prompt = prompt[len(prompt) - keep_p:] if keep_p else []
        response = response[:keep_r]
        input_ids += prompt + response
        trained = not train_on_last_turn_only or i == len(turns) - 1
        labels += (prompt if train_on_prompt and trained else [IGNORE_INDEX] * len(prompt))
        labels += response if trained else [IGNORE_INDEX] * len(response)
        budget -= keep_p + keep_r
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def rows_to_conversations(batch: dict[str, list]) -> list[Conversation]:
    keys = list(batch)
    return [Conversation.from_row({k: batch[k][i] for k in keys}) for i in range(len(batch[keys[0]]))]


def make_sft_preprocess(template: Template, tokenizer: Any, cutoff_len: int, train_on_prompt: bool,
                        train_on_last_turn_only: bool = False):
    """A batched `datasets.map` function; rows with no trained token get empty ids."""

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
        for conv in rows_to_conversations(batch):
            enc = tokenize_conversation(conv, template, tokenizer, cutoff_len, train_on_prompt,
                                        train_on_last_turn_only)
            if not any(label != IGNORE_INDEX for label in enc["labels"]):
                enc = {"input_ids": [], "labels": [], "attention_mask": []}  # filtered out later
            for key in out:
                out[key].append(enc[key])
        return out

    return preprocess
