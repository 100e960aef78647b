"""Templates, truncation and the alpaca format on the tiny tokenizer."""

from __future__ import annotations

import pytest

from lathe.data.conversation import Conversation, Message
from lathe.data.formats import alpaca_to_conversation
from lathe.data.processors import IGNORE_INDEX, split_budget, tokenize_conversation
from lathe.data.registry import DEFAULT_COLUMNS, DatasetSpec
from lathe.data.sources import Row
from lathe.data.templates import TEMPLATES, get_template
from lathe.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _conv(*texts: str, system: str | None = None) -> Conversation:
    roles = ["user", "assistant"] * len(texts)
    return Conversation(tuple(Message(r, t) for r, t in zip(roles, texts)), system=system)


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_chatml_matches_the_tokenizer_chat_template_token_for_token(tokenizer, system):
    conv = _conv("Hi there", "Hello! How can I help?", "Who are you?", "I am Lathe Assistant.",
                 system=system)
    ours = tokenize_conversation(conv, get_template("chatml"), tokenizer, cutoff_len=10_000)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m.role, "content": m.content} for m in conv.messages
    ]
    theirs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ours["input_ids"] == list(theirs)


def test_prompt_is_masked_and_every_reply_with_its_end_token_is_trained(tokenizer):
    conv = _conv("one", "first reply", "two", "second reply")
    enc = tokenize_conversation(conv, get_template("chatml"), tokenizer, cutoff_len=10_000)
    trained = [i for i, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]
    text = tokenizer.decode(trained)
    assert text == "first reply<|im_end|>\nsecond reply<|im_end|>\n"
    assert tokenizer.decode([i for i, lab in zip(enc["input_ids"], enc["labels"])
                             if lab == IGNORE_INDEX]).count("<|im_start|>user") == 2


def test_default_template_trains_the_eos(tokenizer):
    enc = tokenize_conversation(_conv("q", "a"), get_template("default"), tokenizer, 10_000)
    assert enc["labels"][-1] == tokenizer.eos_token_id


def test_split_budget_cuts_in_proportion_and_keeps_a_reply_token():
    assert split_budget(10, 10, 100) == (10, 10)
    p, r = split_budget(300, 100, 100)
    assert (p, r) == (75, 25)
    assert split_budget(1000, 1, 10) == (9, 1)
    assert split_budget(5, 5, 0) == (0, 0)


def test_truncation_drops_later_turns_first(tokenizer):
    long = "word " * 50
    conv = _conv("short", "ok", long, long)
    full = tokenize_conversation(conv, get_template("chatml"), tokenizer, 10_000)
    first_turn = tokenize_conversation(_conv("short", "ok"), get_template("chatml"), tokenizer, 10_000)
    cut = tokenize_conversation(conv, get_template("chatml"), tokenizer, len(first_turn["input_ids"]))
    assert cut["input_ids"] == first_turn["input_ids"] and len(full["input_ids"]) > len(cut["input_ids"])


def test_unknown_template_names_close_ones():
    with pytest.raises(ConfigError, match="did you mean llama3"):
        get_template("llama33")
    assert {"default", "alpaca", "chatml", "qwen", "llama3", "empty"} <= set(TEMPLATES.names())


SPEC = DatasetSpec(name="t", path=None, columns=dict(DEFAULT_COLUMNS["alpaca"], history="history", system="system"))


def test_alpaca_joins_instruction_and_input_and_keeps_history_and_system():
    row = Row({"instruction": "Translate", "input": "bonjour", "output": "hello",
               "history": [["hi", "hey"]], "system": "be brief"}, "f.json row 0")
    conv = alpaca_to_conversation(row, SPEC)
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[2].content == "Translate\nbonjour" and conv.system == "be brief"


@pytest.mark.parametrize("data,match", [
    ({"instruction": "x"}, "'output' \\(response\\) is missing"),
    ({"instruction": "x", "output": ""}, "is empty"),
    ({"instruction": "x", "output": 3}, "must be a string"),
    ({"instruction": "x", "output": "y", "history": "no"}, "list of \\[user, assistant\\] pairs"),
    ({"instruction": "x", "output": "y", "history": [["a", "b", "c"]]}, "history\\[0\\]"),
])
def test_alpaca_errors_name_the_row_and_key(data, match):
    with pytest.raises(DataError, match=match) as e:
        alpaca_to_conversation(Row(data, "f.json row 7"), SPEC)
    assert "f.json row 7" in str(e.value)
