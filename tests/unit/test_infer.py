"""Batched generation: left padding must not change a single greedy token."""

from __future__ import annotations

import json

import pytest

from lathe.config.schema import GenerateConfig
from lathe.data.templates import get_template
from lathe.infer import answer, cut_at_stop, generate_replies, generation_kwargs

GREEDY = GenerateConfig(max_new_tokens=12, do_sample=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def prompts(loaded):
    """20 identity questions (some with a history turn), so lengths differ."""
    from tests.conftest import IDENTITY

    _, tok = loaded
    template = get_template("chatml")
    rows = json.loads(IDENTITY.read_text(encoding="utf-8"))[:20]
    out = [template.encode_prompt([("Hello there, who is speaking?", r["output"])] if i % 3 == 0 else [],
                                  r["instruction"], tok) for i, r in enumerate(rows)]
    assert len({len(p) for p in out}) > 5  # really different lengths: padding happens
    return out


def test_batched_equals_unbatched_token_for_token(loaded, prompts):
    model, tok = loaded
    stops = [tok.eos_token_id]
    one = generate_replies(model, tok, prompts, GREEDY, stops, batch_size=1, progress=False)
    many = generate_replies(model, tok, prompts, GREEDY, stops, batch_size=16, progress=False)
    assert many == one
    assert len({tuple(r) for r in one}) > 1  # replies differ, so the order check means something
    assert all(len(r) > 0 for r in one)


def test_stop_tokens_cut_each_reply(loaded, prompts):
    model, tok = loaded
    free = generate_replies(model, tok, prompts, GREEDY, [tok.eos_token_id], batch_size=8,
                            progress=False)
    long_one = next(r for r in free if len(r) >= 6)
    stop = next(t for k, t in enumerate(long_one) if k >= 2 and t not in long_one[:k])
    cut = generate_replies(model, tok, prompts, GREEDY, [tok.eos_token_id, stop], batch_size=8,
                           progress=False)
    assert cut == [cut_at_stop(r, [stop]) for r in free]
    assert all(stop not in r for r in cut)
    assert any(len(c) < len(f) for c, f in zip(cut, free))


def test_beams_and_sampling_run_batched(loaded, prompts):
    import torch

    model, tok = loaded
    beams = GenerateConfig(max_new_tokens=6, do_sample=False, num_beams=2)
    assert len(generate_replies(model, tok, prompts[:5], beams, [tok.eos_token_id], 4, False)) == 5
    sample = GenerateConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5)
    torch.manual_seed(0)
    a = generate_replies(model, tok, prompts[:5], sample, [tok.eos_token_id], 4, False)
    torch.manual_seed(0)
    assert generate_replies(model, tok, prompts[:5], sample, [tok.eos_token_id], 4, False) == a


def test_generation_kwargs_follow_the_generate_keys():
    greedy = generation_kwargs(GREEDY, [7, 9], pad_id=3)
    assert greedy["eos_token_id"] == [7, 9] and greedy["pad_token_id"] == 3
    assert "temperature" not in greedy and "top_k" not in greedy
    sampled = generation_kwargs(GenerateConfig(temperature=0.5, top_p=0.9, top_k=0), [7], 3)
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.5, 0.9, 0)
    assert cut_at_stop([5, 6, 7, 8, 7], [7]) == [5, 6] and cut_at_stop([5, 6], [7]) == [5, 6]


def test_answer_matches_a_plain_generate_call(loaded):
    import torch

    model, tok = loaded
    template = get_template("chatml")
    ids = template.encode_prompt([], "Who are you?", tok)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=template.stop_token_ids(tok))
    expected = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert answer(model, tok, template, "Who are you?", max_new_tokens=10) == expected


def test_split_row_takes_the_last_trained_run_as_the_reply():
    from lathe.recipes.predict import split_row

    x = -100
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    labels = [x, x, 3, 4, x, x, 7, 8, 9]  # two turns: the earlier reply belongs to the prompt
    assert split_row(ids, labels) == ([1, 2, 3, 4, 5, 6], [7, 8, 9])
    assert split_row([1, 2, 3], [x, 2, 3]) == ([1], [2, 3])
