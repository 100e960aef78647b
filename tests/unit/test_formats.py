"""Every dataset format -> one conversation model; bad rows name file, row and key."""

from __future__ import annotations

import json

import pytest

from lathe.data.formats import convert
from lathe.data.registry import spec_from_entry
from lathe.data.sources import Row
from lathe.errors import DataError


def spec(**entry):
    entry.setdefault("file_name", "x.json")
    return spec_from_entry("ds", entry, dataset_dir=__import__("pathlib").Path("."), where="info.json")


def row(data, where="f.jsonl line 3"):
    return Row(data, where)


def test_sharegpt_with_system_tools_and_function_turns():
    s = spec(formatting="sharegpt", columns={"messages": "conversations", "tools": "tools"})
    out = convert(row({"conversations": [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": {"name": "get_weather"}},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "It is sunny."},
    ], "tools": [{"name": "get_weather"}]}), s, "sft")
    assert out["roles"] == ["user", "function", "observation", "assistant"]
    assert out["system"] == "sys" and json.loads(out["tools"]) == [{"name": "get_weather"}]
    assert json.loads(out["contents"][1]) == {"name": "get_weather"}


def test_sharegpt_custom_tags():
    s = spec(formatting="sharegpt", columns={"messages": "turns"},
             tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "q", "assistant_tag": "a"})
    out = convert(row({"turns": [{"speaker": "q", "text": "hi"}, {"speaker": "a", "text": "yo"}]}), s, "sft")
    assert out["roles"] == ["user", "assistant"] and out["contents"] == ["hi", "yo"]


def test_openai_messages():
    s = spec(formatting="openai")
    out = convert(row({"messages": [{"role": "system", "content": "be nice"},
                                    {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]}), s, "sft")
    assert out["system"] == "be nice" and out["roles"] == ["user", "assistant"]


@pytest.mark.parametrize("msgs,match", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 is 'user'"),
    ([{"role": "assistant", "content": "a"}], "message 0 is 'assistant'"),
    ([{"role": "user", "content": "a"}], "must be a reply"),
    ([{"role": "wizard", "content": "a"}], "messages\\[0\\].role is 'wizard'"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}], "must be a string"),
    ([], "non-empty list"),
])
def test_roles_must_alternate_and_errors_name_the_row(msgs, match):
    with pytest.raises(DataError, match=match) as e:
        convert(row({"messages": msgs}), spec(formatting="openai"), "sft")
    assert "f.jsonl line 3" in str(e.value)


def test_preference_pairs_in_alpaca_and_sharegpt_shape():
    a = convert(row({"instruction": "q", "chosen": "good", "rejected": "bad"}), spec(ranking=True), "pairwise")
    assert a["roles"] == ["user"] and (a["chosen"], a["rejected"]) == ("good", "bad")
    s = spec(formatting="sharegpt", ranking=True)
    b = convert(row({"conversations": [{"from": "human", "value": "q"}],
                     "chosen": {"from": "gpt", "value": "good"},
                     "rejected": {"from": "gpt", "value": "bad"}}), s, "pairwise")
    assert (b["chosen"], b["rejected"]) == ("good", "bad")


def test_preference_errors_say_which_stage_wants_what():
    with pytest.raises(DataError, match="needs both chosen and rejected; column 'rejected'"):
        convert(row({"instruction": "q", "chosen": "good"}), spec(ranking=True), "pairwise")
    with pytest.raises(DataError, match="not preference data; stages rm/dpo want"):
        convert(row({"instruction": "q", "output": "a"}), spec(), "pairwise")
    with pytest.raises(DataError, match="is preference data \\(ranking: true\\)"):
        convert(row({"instruction": "q", "chosen": "a", "rejected": "b"}), spec(ranking=True), "sft")


def test_kto_tag_prompt_text_and_classification():
    k = convert(row({"instruction": "q", "output": "a", "kto_tag": "false"}),
                spec(columns={"kto_tag": "kto_tag"}), "kto")
    assert k["kto_tag"] is False
    with pytest.raises(DataError, match="kto_tag"):
        convert(row({"instruction": "q", "output": "a"}), spec(), "kto")
    p = convert(row({"instruction": "q", "output": "a"}), spec(), "prompt")
    assert p["roles"] == ["user"]
    assert convert(row({"text": "hello world"}), spec(), "text")["text"] == "hello world"
    assert convert(row({"content": "doc"}), spec(columns={"prompt": "content"}), "text")["text"] == "doc"
    c = convert(row({"text": "great film", "label": 1}), spec(), "cls")
    assert c == {"text": "great film", "text_pair": "", "label": "1", "origin": "f.jsonl line 3"}
    assert convert(row({"text": "a", "label": ["x", "y"]}), spec(), "cls")["label"] == '["x", "y"]'
    with pytest.raises(DataError, match="multi-label row lists class names or ids"):
        convert(row({"text": "a", "label": [{"x": 1}]}), spec(), "cls")
    with pytest.raises(DataError, match="label"):
        convert(row({"text": "x"}), spec(), "cls")


def test_dataset_info_entry_errors():
    with pytest.raises(DataError, match="formatting 'sharegtp'.*did you mean sharegpt"):
        spec(formatting="sharegtp")
    with pytest.raises(DataError, match="columns.respones is not a known column.*did you mean response"):
        spec(columns={"respones": "out"})
    with pytest.raises(DataError, match="unknown key 'file'"):
        spec_from_entry("ds", {"file": "x"}, __import__("pathlib").Path("."), "info.json")
    with pytest.raises(DataError, match="names no source"):
        spec_from_entry("ds", {"formatting": "alpaca"}, __import__("pathlib").Path("."), "info.json")
