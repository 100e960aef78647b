"""lathe.infer: per-row settings inside one batched generate, streaming, stop strings, deadlines,
cancellation, the JSON-object constraint, and OpenAI messages <-> Lathe conversations."""

from __future__ import annotations

import json
import time

import pytest

from lathe.data.templates import get_template
from lathe.infer.engine import Sampling, Sequence, decode
from lathe.infer.jsonmode import START, distance, feed
from lathe.infer.messages import (
    MessageError,
    check_tools,
    may_be_tool_call,
    parse_tool_calls,
    prompt_ids,
    to_conversation,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval(), \
        AutoTokenizer.from_pretrained(tiny_model)


def prompt(tok, text: str) -> list[int]:
    return get_template("chatml").encode_prompt([], text, tok)


QUESTIONS = ["Who are you?", "What can you do for me today?", "Hello", "Tell me about Lathe, please."]


def test_each_row_keeps_its_own_settings_inside_one_batch(loaded):
    model, tok = loaded
    settings = [Sampling(max_tokens=10), Sampling(max_tokens=6, temperature=0.9, seed=3),
                Sampling(max_tokens=8, temperature=1.3, top_p=0.8, top_k=20, seed=5),
                Sampling(max_tokens=10, presence_penalty=1.5, frequency_penalty=0.5)]
    alone = []
    for q, s in zip(QUESTIONS, settings):
        seq = Sequence(prompt(tok, q), s)
        decode(model, tok, [seq], [tok.eos_token_id])
        alone.append(seq.tokens)
    together = [Sequence(prompt(tok, q), s) for q, s in zip(QUESTIONS, settings)]
    decode(model, tok, together, [tok.eos_token_id])
    assert [s.tokens for s in together] == alone
    assert [len(t) for t in alone] == [10, 6, 8, 10]  # each its own max_tokens
    assert all(s.finish_reason == "length" for s in together)
    # the penalties change the greedy reply
    plain = Sequence(prompt(tok, QUESTIONS[3]), Sampling(max_tokens=10))
    decode(model, tok, [plain], [tok.eos_token_id])
    assert plain.tokens != alone[3]
    assert len(set(alone[3])) >= len(set(plain.tokens))


def test_streamed_pieces_join_to_the_text_and_stop_strings_cut_it(loaded):
    model, tok = loaded
    pieces: list[str] = []
    seq = Sequence(prompt(tok, "Who are you?"), Sampling(max_tokens=20),
                   on_text=lambda text, _: pieces.append(text))
    decode(model, tok, [seq], [tok.eos_token_id])
    assert "".join(pieces) == seq.text == tok.decode(seq.tokens, skip_special_tokens=True).strip()
    assert len(pieces) > 2
    words = seq.text.split()
    stop = words[len(words) // 2]
    cut_pieces: list[str] = []
    cut = Sequence(prompt(tok, "Who are you?"), Sampling(max_tokens=20, stop=(stop,)),
                   on_text=lambda text, _: cut_pieces.append(text))
    decode(model, tok, [cut], [tok.eos_token_id])
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert cut.text == seq.text[:seq.text.index(stop)].rstrip() and "".join(cut_pieces) == cut.text
    assert len(cut.tokens) < len(seq.tokens)  # generation itself stopped early


def test_logprobs_are_the_models_and_greedy_picks_the_top_one(loaded):
    import torch

    model, tok = loaded
    seq = Sequence(prompt(tok, "Hello"), Sampling(max_tokens=3, logprobs=3))
    decode(model, tok, [seq], [tok.eos_token_id])
    assert [t.token_id for t in seq.logprobs] == seq.tokens
    ids = torch.tensor([seq.prompt])
    with torch.no_grad():
        first = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
    assert seq.logprobs[0].logprob == pytest.approx(float(first.max()), abs=1e-5)
    assert seq.logprobs[0].top[0][0] == seq.tokens[0] and len(seq.logprobs[0].top) == 3


def test_a_deadline_or_a_cancel_ends_a_row_and_leaves_the_others(loaded):
    model, tok = loaded
    late = Sequence(prompt(tok, "Hello"), Sampling(max_tokens=30), deadline=time.monotonic() - 1)
    cancelled = Sequence(prompt(tok, "Who are you?"), Sampling(max_tokens=30))
    seen = []

    def cancel_after_two(text, _):
        seen.append(text)
        if len(seen) == 2:
            cancelled.cancelled.set()

    cancelled.on_text = cancel_after_two
    other = Sequence(prompt(tok, "Tell me about Lathe, please."), Sampling(max_tokens=12))
    decode(model, tok, [late, cancelled, other], [tok.eos_token_id])
    assert late.finish_reason == "timeout" and len(late.tokens) == 1
    assert cancelled.finish_reason == "cancelled" and len(cancelled.tokens) < 30
    assert other.finish_reason == "length" and len(other.tokens) == 12


def test_json_object_replies_are_valid_json(loaded):
    model, tok = loaded
    for q, budget in (("Who are you?", 40), ("Hello", 12), ("Tell me about Lathe, please.", 25)):
        seq = Sequence(prompt(tok, q), Sampling(max_tokens=budget, json_object=True))
        decode(model, tok, [seq], [tok.eos_token_id])
        assert isinstance(json.loads(seq.text), dict), seq.text  # closed in time, even when short


@pytest.mark.parametrize("text, ok", [
    ('{"a": 1}', True), ('{"a": [1, 2.5e-3, true, null, "x\\u00e9"]}', True), ("  {", True), ('{"a', True),
    ("[1]", False), ('{"a": 01}', False), ('{"a" 1}', False), ('{"a": tru', True), ('{"a": trux', False),
    ('{"a": 1,}', False), ('{"a": "\\q"}', False), ('{"a": {"b": {}}}', True), ('{"a": 1} x', False),
])
def test_the_json_automaton(text, ok):
    assert (feed(START, text) is not None) == ok


def test_distance_says_how_far_from_closed():
    assert distance(feed(START, '{"a": {"b": [1')) == 3
    assert distance(feed(START, '{"a": 1}')) == 0


def test_openai_messages_become_the_trained_conversation(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                  "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "21"},
            {"role": "tool", "tool_call_id": "c2", "content": "sunny"}]
    conv = to_conversation(msgs, tools)
    assert [m.role for m in conv.messages] == ["user", "function", "observation", "assistant"]
    assert json.loads(conv.messages[1].content) == {"name": "weather", "arguments": {"city": "Paris"}}
    assert json.loads(conv.messages[2].content) == ["21", "sunny"]  # parallel results joined
    assert conv.system == "Be brief." and json.loads(conv.tools) == [tools[0]["function"]]
    text = tok.decode(prompt_ids(get_template("chatml"), conv, tok))
    assert text.endswith("<|im_start|>tool\n[\"21\", \"sunny\"]<|im_end|>\n<|im_start|>assistant\n")
    assert "You can call these tools:" in text

    for bad, param in (([{"role": "wizard", "content": "x"}], "messages[0].role"),
                       ([{"role": "user", "content": ""}], "messages[0].content"),
                       ([{"role": "assistant", "content": "hi"}], "messages[0].role"),
                       ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
                       ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content")):
        with pytest.raises(MessageError) as e:
            to_conversation(bad)
        assert e.value.param == param


def test_tool_calls_are_parsed_back_and_schemas_checked():
    names = {"weather"}
    [call] = parse_tool_calls('{"name": "weather", "arguments": {"city": "Paris"}}', names)
    assert call.name == "weather" and json.loads(call.arguments) == {"city": "Paris"}
    two = parse_tool_calls('<tool_call>{"name": "weather", "arguments": {}}</tool_call>\n'
                           '<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>', names)
    assert [json.loads(c.arguments) for c in two] == [{}, {"city": "Rome"}]
    assert parse_tool_calls('{"name": "other", "arguments": {}}', names) is None
    assert parse_tool_calls("It is sunny.", names) is None
    assert may_be_tool_call(' {"na') and may_be_tool_call("<tool_") and not may_be_tool_call("It is")
    check_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "array", "items": {"type": "integer"}}}}}}])
    for bad in ({"type": "function", "function": {"name": "f", "parameters": {"type": "thing"}}},
                {"type": "function", "function": {"name": "bad name!"}},
                {"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": 3}}}},
                {"type": "retrieval"}):
        with pytest.raises(MessageError):
            check_tools([bad])


def test_rows_that_join_a_running_batch_get_the_replies_they_get_alone(loaded):
    """Continuous batching: rows join after 0, 3 and 5 steps and leave when done; every reply
    (greedy, sampled with a seed, penalised, stopped by a string) is token for token the one
    `decode` gives the row alone."""
    from lathe.infer.continuous import RunningBatch, continuous_blocker

    model, tok = loaded
    assert continuous_blocker(model, tok) is None
    settings = [Sampling(max_tokens=10), Sampling(max_tokens=6, temperature=0.9, seed=3),
                Sampling(max_tokens=8, temperature=1.3, top_p=0.8, top_k=20, seed=5),
                Sampling(max_tokens=12, presence_penalty=1.5, frequency_penalty=0.5, logprobs=2)]
    alone = []
    for q, s in zip(QUESTIONS, settings):
        seq = Sequence(prompt(tok, q), s)
        decode(model, tok, [seq], [tok.eos_token_id])
        alone.append(seq)
    rows = [Sequence(prompt(tok, q), s) for q, s in zip(QUESTIONS, settings)]
    batch = RunningBatch(model, tok, [tok.eos_token_id])
    arrivals = {0: rows[:2], 3: rows[2:3], 5: rows[3:]}
    finished, step, sizes = [], 0, []
    while step == 0 or len(batch):
        if step in arrivals:
            batch.add(arrivals[step])
        sizes.append(len(batch))
        batch.step()
        finished += batch.prune()
        step += 1
    assert sorted(map(id, finished)) == sorted(map(id, rows))
    assert [r.tokens for r in rows] == [a.tokens for a in alone]
    assert [r.text for r in rows] == [a.text for a in alone]
    assert [t.logprob for t in rows[3].logprobs] == pytest.approx([t.logprob for t in alone[3].logprobs], abs=1e-4)
    assert max(sizes) >= 3 and sizes[-1] < max(sizes)  # they overlapped, and left one by one
