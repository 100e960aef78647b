"""Conversations -> input_ids + labels for supervised fine-tuning.

Prompt tokens get label -100 (not trained); each assistant reply, including its end
token, is trained. When a conversation is longer than `cutoff_len`, each turn's
prompt and reply are cut in proportion to their lengths, and later turns are
dropped first. A row whose reply would vanish entirely is dropped and counted,
never trained on an empty label.
"""

from __future__ import annotations

from typing import Any

from lathe.data.conversation import Conversation, Message
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


# --- the other stages ------------------------------------------------------------------

def prompt_and_reply(conv: Conversation, template: Template, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of everything before the last reply, and of the last reply (with its end token)."""
    turns = template.encode_turns(conv, tokenizer)
    prompt: list[int] = []
    for p, r in turns[:-1]:
        prompt += p + r
    return prompt + turns[-1][0], turns[-1][1]


def fit_prompt_and_replies(prompt: list[int], replies: list[list[int]],
                           cutoff_len: int) -> tuple[list[int], list[list[int]]]:
    """Cut prompt and replies to `cutoff_len` in proportion (the longest reply sets the
    reply share); the end of the prompt (the assistant header) and the start of each
    reply are kept."""
    keep_p, keep_r = split_budget(len(prompt), max(map(len, replies)), cutoff_len)
    return (prompt[len(prompt) - keep_p:] if keep_p else []), [r[:keep_r] for r in replies]


def _with_reply(conv: Conversation, reply: str) -> Conversation:
    return Conversation(conv.messages + (Message("assistant", reply),), conv.system, conv.tools, conv.origin)


def make_pairwise_preprocess(template: Template, tokenizer: Any, cutoff_len: int, *_: Any):
    """Preference pairs -> chosen/rejected ids and labels (only the final reply is trained).

    The prompt is rendered with each reply (so the tokens are exactly what the template
    produces) and both are cut by the same budget; a pair whose replies vanish is dropped.
    """

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in PAIRWISE_COLUMNS}
        for i, conv in enumerate(rows_to_conversations(batch)):
            chosen = prompt_and_reply(_with_reply(conv, batch["chosen"][i]), template, tokenizer)
            rejected = prompt_and_reply(_with_reply(conv, batch["rejected"][i]), template, tokenizer)
            budget = split_budget(max(len(chosen[0]), len(rejected[0])),
                                  max(len(chosen[1]), len(rejected[1])), cutoff_len)
            for name, (prompt, reply) in (("chosen", chosen), ("rejected", rejected)):
                prompt = prompt[len(prompt) - budget[0]:] if budget[0] else []
                reply = reply[:budget[1]]
                ids, labels = prompt + reply, [IGNORE_INDEX] * len(prompt) + reply
                if not budget[1]:
                    ids, labels = [], []  # filtered out later
                out[f"{name}_input_ids"].append(ids)
                out[f"{name}_labels"].append(labels)
        return out

    return preprocess


PAIRWISE_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def make_kto_preprocess(template: Template, tokenizer: Any, cutoff_len: int, *_: Any):
    """Tagged conversations -> ids, labels (the last reply only) and kto_tag."""

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "kto_tag": []}
        for i, conv in enumerate(rows_to_conversations(batch)):
            prompt, reply = prompt_and_reply(conv, template, tokenizer)
            prompt, (reply,) = fit_prompt_and_replies(prompt, [reply], cutoff_len)
            ids, labels = (prompt + reply, [IGNORE_INDEX] * len(prompt) + reply) if reply else ([], [])
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["kto_tag"].append(bool(batch["kto_tag"][i]))
        return out

    return preprocess


def make_prompt_preprocess(template: Template, tokenizer: Any, cutoff_len: int, *_: Any):
    """Prompts for generation (ppo): every turn so far plus the assistant header, the
    last `cutoff_len` tokens kept."""

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": []}
        for conv in rows_to_conversations(batch):
            prompt, _ = prompt_and_reply(_with_reply(conv, ""), template, tokenizer)
            out["input_ids"].append(prompt[-cutoff_len:])
        return out

    return preprocess


def make_text_preprocess(template: Template, tokenizer: Any, cutoff_len: int, *_: Any):
    """Plain text (pt): each document + eos, concatenated and cut into blocks of
    `cutoff_len` (the last, shorter block is kept). Every token is trained."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) \
        and tokenizer.bos_token_id is not None else []

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        stream: list[int] = []
        for text in batch["text"]:
            stream += bos + list(tokenizer.encode(text, add_special_tokens=False)) + eos
        blocks = [stream[i:i + cutoff_len] for i in range(0, len(stream), cutoff_len)]
        blocks = [b for b in blocks if len(b) >= 2]  # one token teaches nothing
        return {"input_ids": blocks, "labels": [list(b) for b in blocks],
                "attention_mask": [[1] * len(b) for b in blocks]}

    return preprocess
