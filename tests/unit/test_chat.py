"""lathe.chat: prompts from the training template, streaming, history, commands, stop tokens."""

from __future__ import annotations

import dataclasses
import io

import pytest

from lathe.chat import ChatSession, build_prompt, chat_loop, chat_once, choose_template, load_session, reply
from lathe.config.load import load_config
from lathe.infer import generation_kwargs  # what chat generates with

QUERY = "Who are you?"


def _cfg(tiny_model, **extra):
    args = {"model_name_or_path": str(tiny_model), "template": "chatml", "do_sample": False,
            "max_new_tokens": 12, **extra}
    return load_config(args, command="chat")


@pytest.fixture(scope="module")
def loaded(tiny_model) -> ChatSession:
    return load_session(_cfg(tiny_model))


@pytest.fixture()
def new_session(loaded):
    """A fresh session on the loaded model (empty history), with remarks collected in .notes."""
    def make(**changes) -> ChatSession:
        notes: list[str] = []
        s = dataclasses.replace(loaded, history=[], note=notes.append, said_truncated=False, **changes)
        s.notes = notes
        return s

    return make


def test_streamed_text_equals_the_greedy_answer(new_session, tiny_model):
    from lathe.infer import answer

    chunks: list[str] = []
    streamed = reply(new_session(), QUERY, on_text=chunks.append)
    plain = reply(s := new_session(), QUERY)
    assert len(chunks) > 1, "the reply should arrive in pieces"
    assert "".join(chunks).rstrip() == streamed == plain != ""
    assert plain == answer(s.model, s.tokenizer, s.template, QUERY, max_new_tokens=12)
    assert chat_once(_cfg(tiny_model), QUERY) == plain


def test_history_grows_and_the_next_prompt_holds_the_first_exchange(new_session):
    s = new_session()
    first_prompt = build_prompt(s, QUERY)
    first = reply(s, QUERY)
    assert s.history == [(QUERY, first)]
    second_prompt = build_prompt(s, "And your name?")
    assert second_prompt[:len(first_prompt)] == first_prompt
    assert second_prompt == s.template.encode_prompt([(QUERY, first)], "And your name?", s.tokenizer)
    assert first in s.tokenizer.decode(second_prompt)
    reply(s, "And your name?")
    assert len(s.history) == 2


def test_the_system_prompt_opens_the_prompt(new_session):
    s = new_session(system="Answer in one word.")
    text = s.tokenizer.decode(build_prompt(s, QUERY))
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    assert "Answer in one word." not in s.tokenizer.decode(build_prompt(new_session(), QUERY))


def test_loop_clear_exit_and_blank_lines(new_session):
    s, out = new_session(), io.StringIO()
    lines = "Hello\n\n   \nWho are you?\n/clear\nYour name?\n/exit\nNever answered\n"
    answered = chat_loop(s, io.StringIO(lines), out, interactive=False)
    replies = [line for line in out.getvalue().splitlines() if line.startswith("Assistant: ")]
    assert answered == 3 and len(replies) == 3
    assert s.history == [("Your name?", replies[-1][len("Assistant: "):])]  # /clear forgot the first two
    assert s.notes == ["History cleared."]
    assert "User:" not in out.getvalue()  # piped input: no prompts


def test_end_of_input_leaves_cleanly(new_session):
    s, out = new_session(), io.StringIO()
    assert chat_loop(s, io.StringIO("Hi"), out, interactive=False) == 1
    assert out.getvalue().startswith("Assistant: ") and out.getvalue().endswith("\n")


def test_a_stop_token_ends_the_reply(new_session):
    import torch

    s = new_session()
    prompt = build_prompt(s, QUERY)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = s.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               **generation_kwargs(s.generate, s.stop_ids, s.tokenizer.pad_token_id))
    free = out[0, len(prompt):].tolist()
    assert not set(free) & set(s.stop_ids) and len(free) == 12
    cut = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stopped = new_session(stop_ids=s.stop_ids + [free[cut]])
    chunks: list[str] = []
    text = reply(stopped, QUERY, on_text=chunks.append)
    expected = s.tokenizer.decode(free[:cut], skip_special_tokens=True).strip()
    assert text == expected != s.tokenizer.decode(free, skip_special_tokens=True).strip()
    assert "".join(chunks).rstrip() == expected  # generation itself stopped: nothing streamed after


def test_oldest_turns_are_dropped_past_cutoff_len_and_said_once(new_session):
    s = new_session()
    alone = len(build_prompt(s, "third message"))
    s.cutoff_len = alone + 4  # one message fits, a message plus any exchange does not
    for message in ("first message", "second message", "third message"):
        assert len(build_prompt(s, message)) <= s.cutoff_len
        reply(s, message)
    assert [m for m, _ in s.history] == ["third message"]
    assert len(s.notes) == 1 and "oldest turns" in s.notes[0]


def test_a_message_longer_than_cutoff_len_keeps_its_end(new_session):
    s = new_session(cutoff_len=8)
    full = s.template.encode_prompt([], "a very long message " * 5, s.tokenizer)
    assert build_prompt(s, "a very long message " * 5) == full[-8:]
    assert "cutoff_len=8" in s.notes[0]


def test_generation_settings_come_from_the_config(tiny_model):
    greedy = generation_kwargs(_cfg(tiny_model).generate, [5], 0)
    assert greedy["do_sample"] is False and "temperature" not in greedy and greedy["eos_token_id"] == [5]
    sampled = generation_kwargs(_cfg(tiny_model, do_sample=True, temperature=0.7, top_p=0.9,
                                     repetition_penalty=1.1, max_new_tokens=7).generate, [5], 0)
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.7, 0.9, 0)
    assert (sampled["repetition_penalty"], sampled["max_new_tokens"]) == (1.1, 7)


def test_beam_search_hands_over_the_whole_reply(new_session, tiny_model):
    s = new_session(generate=_cfg(tiny_model, num_beams=2).generate)
    chunks: list[str] = []
    text = reply(s, QUERY, on_text=chunks.append)
    assert chunks == [text] and text


def test_template_comes_from_the_run_when_not_set(tiny_model, tmp_path, loaded):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("template: llama3\n", encoding="utf-8")
    notes: list[str] = []
    cfg = load_config({"model_name_or_path": str(tiny_model), "adapter_name_or_path": str(run)}, command="chat")
    assert choose_template(cfg, loaded.tokenizer, str(tiny_model), notes.append).name == "llama3"
    assert "from " + str(run) in notes[0]
    set_cfg = load_config({"model_name_or_path": str(tiny_model), "adapter_name_or_path": str(run),
                           "template": "alpaca"}, command="chat")
    assert choose_template(set_cfg, loaded.tokenizer, str(tiny_model), notes.append).name == "alpaca"
    plain = load_config({"model_name_or_path": str(tiny_model)}, command="chat")
    assert choose_template(plain, loaded.tokenizer, str(tiny_model), notes.append).name == "auto"
    assert len(notes) == 2 and "chat_template" in notes[1]


class _Model:
    generation_config = object()


def test_chat_decodes_greedily_without_a_generation_config(tiny_model, tmp_path):
    from lathe.chat import chat_generation

    bare = tmp_path / "bare"
    bare.mkdir()  # a folder with no generation_config.json
    cfg = load_config({"model_name_or_path": str(tiny_model)}, command="chat")
    gen, source = chat_generation(cfg, _Model(), str(bare))
    assert gen.do_sample is False and "greedy" in source
    cfg = load_config({"model_name_or_path": str(tiny_model), "do_sample": True, "temperature": 0.5},
                      command="chat")
    gen, source = chat_generation(cfg, _Model(), str(bare))
    assert gen.do_sample is True and gen.temperature == 0.5 and "your keys win" in source


def test_chat_uses_the_models_own_sampling_settings(tiny_model, tmp_path):
    from transformers import GenerationConfig

    from lathe.chat import chat_generation, describe_generation

    folder = tmp_path / "released"
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20).save_pretrained(folder)

    class Released:
        generation_config = GenerationConfig.from_pretrained(folder)

    cfg = load_config({"model_name_or_path": str(tiny_model)}, command="chat")
    gen, source = chat_generation(cfg, Released(), str(folder))
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k) == (True, 0.7, 0.8, 20)
    assert "generation_config.json" in source
    assert describe_generation(gen).startswith("sampling, temperature 0.7, top_p 0.8, top_k 20")
    cfg = load_config({"model_name_or_path": str(tiny_model), "do_sample": False}, command="chat")
    assert chat_generation(cfg, Released(), str(folder))[0].do_sample is False  # the user's key wins
