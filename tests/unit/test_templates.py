"""Chat templates render, token for token, what the models' own chat templates render.

Each tokenizer here is a tiny byte-level BPE (demo.build.build_tokenizer, 600 tokens)
carrying a model family's special tokens, with a Jinja chat_template written for these
tests to reproduce that model's published rendering. Lathe's ids must equal
`tokenizer.apply_chat_template(messages, tokenize=True)`'s.

Templates without a token-exact test, because the model has no official Jinja template
to compare with: default and empty (Lathe's own), alpaca (a dataset format, no model),
vicuna (FastChat builds the prompt in Python; its tokenizer has no chat_template),
chatglm2 and baichuan2 (their remote-code tokenizers build prompts in Python, with no
chat_template).
"""

from __future__ import annotations

import copy
import functools
import json

import pytest

from lathe.data.conversation import Conversation, Message
from lathe.data.processors import IGNORE_INDEX, tokenize_conversation
from lathe.data.templates import (
    TEMPLATES,
    Template,
    check_against_tokenizer,
    encode_pieces,
    get_template,
)
from lathe.demo.build import CHATML_JINJA, build_tokenizer
from lathe.errors import ConfigError

# --- the models' chat templates, rewritten for these tests -------------------------------

# Qwen2.5: a default system prompt when the conversation has none; tool results as user turns.
QWEN_TOOL = (
    r"{%- elif m.role == 'tool' %}"
    r"{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    r"{{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}"
    r"{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
)
QWEN25_JINJA = (
    r"{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    r"{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    r"<|im_end|>\n' }}{%- endif %}"
    r"{%- for m in messages %}"
    r"{%- if m.role == 'user' or m.role == 'assistant' %}"
    r"{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
    + QWEN_TOOL +
    r"{%- endif %}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Qwen3 Instruct-2507: as Qwen2.5, without a default system prompt.
QWEN3_2507_JINJA = (
    r"{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    r"{%- endif %}"
    r"{%- for m in messages %}"
    r"{%- if m.role == 'user' or m.role == 'assistant' %}"
    r"{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
    + QWEN_TOOL +
    r"{%- endif %}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Qwen3 (hybrid thinking): thoughts are dropped before the last user message; replies after
# it show their thought block, the last one even when empty.
QWEN3_JINJA = (
    r"{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    r"{%- endif %}"
    r"{%- set ns = namespace(last_query=messages|length - 1) %}"
    r"{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    r"{%- endfor %}"
    r"{%- for m in messages %}"
    r"{%- if m.role == 'user' %}{{- '<|im_start|>user\n' + m.content + '<|im_end|>\n' }}"
    r"{%- elif m.role == 'assistant' %}"
    r"{%- set content = m.content %}{%- set thought = '' %}"
    r"{%- if '</think>' in content %}"
    r"{%- set thought = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    r"{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    r"{%- endif %}"
    r"{%- if loop.index0 > ns.last_query and (loop.last or thought) %}"
    r"{{- '<|im_start|>assistant\n<think>\n' + thought.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
    r"{%- else %}{{- '<|im_start|>assistant\n' + content }}{%- endif %}"
    r"{{- '<|im_end|>\n' }}"
    + QWEN_TOOL +
    r"{%- endif %}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    r"{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    r"{%- endif %}"
)
# Llama-2-chat: bos before every [INST]; the system prompt inside the first one; stripped text.
LLAMA2_JINJA = (
    r"{%- if messages[0].role == 'system' %}{%- set sys = messages[0].content %}{%- set msgs = messages[1:] %}"
    r"{%- else %}{%- set sys = none %}{%- set msgs = messages %}{%- endif %}"
    r"{%- for m in msgs %}"
    r"{%- if loop.first and sys is not none %}{%- set text = '<<SYS>>\n' + sys + '\n<</SYS>>\n\n' + m.content %}"
    r"{%- else %}{%- set text = m.content %}{%- endif %}"
    r"{%- if m.role == 'user' %}{{- bos_token + '[INST] ' + text.strip() + ' [/INST]' }}"
    r"{%- else %}{{- ' ' + text.strip() + ' ' + eos_token }}{%- endif %}"
    r"{%- endfor %}"
)
# Llama 3 instruct: headers, trimmed content, bos once.
LLAMA3_JINJA = (
    r"{%- for m in messages %}{%- if loop.first %}{{- bos_token }}{%- endif %}"
    r"{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
# Mistral tokenizer v1 (7B-Instruct v0.1/v0.2, Mixtral 8x7B): the system prompt opens the first [INST].
MISTRAL_JINJA = (
    r"{{- bos_token }}"
    r"{%- if messages[0].role == 'system' %}{%- set sys = messages[0].content %}{%- set msgs = messages[1:] %}"
    r"{%- else %}{%- set sys = none %}{%- set msgs = messages %}{%- endif %}"
    r"{%- for m in msgs %}"
    r"{%- if m.role == 'user' %}"
    r"{%- if loop.first and sys is not none %}{{- ' [INST] ' + sys + '\n\n' + m.content + ' [/INST]' }}"
    r"{%- else %}{{- ' [INST] ' + m.content + ' [/INST]' }}{%- endif %}"
    r"{%- else %}{{- ' ' + m.content + eos_token }}{%- endif %}"
    r"{%- endfor %}"
)
# Mistral tokenizer v3 style: the system prompt goes before the *last* user message, so a
# conversation's prefixes do not render as prefixes of it (exercises template: auto's fallback).
MISTRAL_V3_JINJA = (
    r"{{- bos_token }}"
    r"{%- if messages[0].role == 'system' %}{%- set sys = messages[0].content %}{%- set msgs = messages[1:] %}"
    r"{%- else %}{%- set sys = none %}{%- set msgs = messages %}{%- endif %}"
    r"{%- for m in msgs %}"
    r"{%- if m.role == 'user' %}"
    r"{%- if loop.last and sys is not none %}{{- '[INST] ' + sys + '\n\n' + m.content + '[/INST]' }}"
    r"{%- else %}{{- '[INST] ' + m.content + '[/INST]' }}{%- endif %}"
    r"{%- else %}{{- ' ' + m.content | trim + eos_token }}{%- endif %}"
    r"{%- endfor %}"
)
# Gemma 3 (text): no system role, its text opens the first user turn; trimmed content.
GEMMA_JINJA = (
    r"{{- bos_token }}"
    r"{%- if messages[0].role == 'system' %}{%- set first = messages[0].content + '\n\n' %}"
    r"{%- set msgs = messages[1:] %}{%- else %}{%- set first = '' %}{%- set msgs = messages %}{%- endif %}"
    r"{%- for m in msgs %}"
    r"{%- set role = 'model' if m.role == 'assistant' else m.role %}"
    r"{{- '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m.content | trim + '<end_of_turn>\n' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)
# Zephyr: every message ends with eos and a newline.
ZEPHYR_JINJA = (
    r"{%- for m in messages %}{{- '<|' + m.role + '|>\n' + m.content + eos_token + '\n' }}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)
# Phi-3 mini instruct: bos first; eos closes a finished conversation.
PHI3_JINJA = (
    r"{{- bos_token }}"
    r"{%- for m in messages %}{{- '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)
# DeepSeek LLM chat: "User: ...\n\nAssistant: ...<eos>", prompted with "Assistant:".
DEEPSEEK_JINJA = (
    r"{{- bos_token }}"
    r"{%- for m in messages %}"
    r"{%- if m.role == 'system' %}{{- m.content + '\n\n' }}"
    r"{%- elif m.role == 'user' %}{{- 'User: ' + m.content + '\n\n' }}"
    r"{%- else %}{{- 'Assistant: ' + m.content + eos_token }}{%- endif %}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)
# ChatGLM3-6B: role tokens, "\n " before each message, no end tokens.
CHATGLM3_JINJA = (
    r"{%- for m in messages %}{%- if loop.first %}{{- '[gMASK]sop' }}{%- endif %}"
    r"{{- '<|' + m.role + '|>\n ' + m.content }}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)

DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
FAMILIES = {  # special tokens (besides the demo's <|endoftext|> <|im_start|> <|im_end|>), bos, eos
    "chatml": (["<think>", "</think>"], None, "<|im_end|>"),
    "yi": (["<|startoftext|>"], None, "<|endoftext|>"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|eom_id|>"], "<|begin_of_text|>", "<|end_of_text|>"),
    "llama": (["<s>", "</s>"], "<s>", "</s>"),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "phi": (["<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|endoftext|>"),
    "deepseek": ([DEEPSEEK_BOS, DEEPSEEK_EOS], DEEPSEEK_BOS, DEEPSEEK_EOS),
    "chatglm3": (["[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "</s>"],
                 None, "</s>"),
}
# Lathe template -> (tokenizer family, the model's chat template)
JINJA_CASES = {
    "chatml": ("chatml", CHATML_JINJA),
    "qwen": ("chatml", QWEN25_JINJA),
    "qwen3": ("chatml", QWEN3_JINJA),
    "qwen3_nothink": ("chatml", QWEN3_2507_JINJA),
    "yi": ("yi", CHATML_JINJA),
    "llama2": ("llama", LLAMA2_JINJA),
    "llama3": ("llama3", LLAMA3_JINJA),
    "mistral": ("llama", MISTRAL_JINJA),
    "zephyr": ("llama", ZEPHYR_JINJA),
    "gemma": ("gemma", GEMMA_JINJA),
    "phi": ("phi", PHI3_JINJA),
    "deepseek": ("deepseek", DEEPSEEK_JINJA),
    "chatglm3": ("chatglm3", CHATGLM3_JINJA),
}
OBSERVATION_ROLE = {"chatml": "tool", "qwen": "tool", "qwen3": "tool", "qwen3_nothink": "tool",
                    "llama3": "ipython", "chatglm3": "observation"}


@functools.cache
def _family(family: str):
    specials, bos, eos = FAMILIES[family]
    tok = build_tokenizer(600, specials)
    tok.add_special_tokens({k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v})
    return tok


def tokenizer_for(name: str, chat_template: str | None = None):
    """A fresh tokenizer of the template's family, carrying the model's chat template."""
    family, jinja = JINJA_CASES[name]
    tok = copy.deepcopy(_family(family))
    tok.chat_template = chat_template if chat_template is not None else jinja
    return tok


# --- conversations -----------------------------------------------------------------------

TWO = (("Hi there", "Hello! How can I help?"), ("Who are you?", "I am Lathe Assistant."))
THREE = (
    ("What is BPE? Café ☕, naïve {content} {eos}", "Byte pair encoding:\nmerge frequent pairs."),
    ("  Does it split words?  \n", " Sometimes, at spaces.\n"),
    ("Thanks", "You are welcome."),
)
SYSTEM = "You are terse.\nAnswer in one line."


def conv_of(pairs, system=None, roles=("user", "assistant")) -> Conversation:
    msgs = tuple(Message(role, text) for pair in pairs for role, text in zip(roles, pair))
    return Conversation(msgs, system=system)


def jinja_messages(conv: Conversation, template: str = "chatml") -> list[dict]:
    role = {"user": "user", "assistant": "assistant", "function": "assistant",
            "observation": OBSERVATION_ROLE.get(template, "tool")}
    head = [{"role": "system", "content": conv.system}] if conv.system else []
    return head + [{"role": role[m.role], "content": m.content} for m in conv.messages]


def theirs(tok, conv: Conversation, template: str = "chatml") -> list[int]:
    return list(tok.apply_chat_template(jinja_messages(conv, template), tokenize=True, return_dict=False))


def ours(template, tok, conv: Conversation) -> list[int]:
    return [t for prompt, response in template.encode_turns(conv, tok) for t in prompt + response]


def trained_spans(template, tok, conv: Conversation) -> list[str]:
    enc = tokenize_conversation(conv, template, tok, cutoff_len=100_000)
    spans, run = [], []
    for tid, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            assert label == tid
            run.append(tid)
        elif run:
            spans.append(run)
            run = []
    spans += [run] if run else []
    return [tok.decode(s) for s in spans]


# --- token-exact against the models' chat templates -------------------------------------

@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no-system", "system"])
@pytest.mark.parametrize("pairs", [TWO, THREE], ids=["2-turns", "3-turns"])
@pytest.mark.parametrize("name", sorted(JINJA_CASES))
def test_renders_token_for_token_like_the_models_chat_template(name, pairs, system):
    tok = tokenizer_for(name)
    template = get_template(name)
    conv = conv_of(pairs, system)
    expected = theirs(tok, conv, name)
    got = ours(template, tok, conv)
    if template.efficient_eos:  # one eos closes the last reply; the chat template writes none
        assert got[-1] == tok.eos_token_id
        got = got[:-1]
    assert got == expected, f"\nours:   {tok.decode(got)!r}\ntheirs: {tok.decode(expected)!r}"


@pytest.mark.parametrize("name", sorted(JINJA_CASES))
def test_generation_prompt_matches_the_chat_templates(name):
    tok = tokenizer_for(name)
    for system in (None, SYSTEM):
        history = [TWO[0]]
        messages = jinja_messages(conv_of(TWO, system), name)[:-1]  # up to the last question
        expected = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
        got = get_template(name).encode_prompt(history, TWO[1][0], tok, system=system)
        assert got == expected, f"\nours:   {tok.decode(got)!r}\ntheirs: {tok.decode(expected)!r}"


@pytest.mark.parametrize("name", ["chatml", "qwen", "qwen3", "qwen3_nothink", "llama3", "chatglm3"])
def test_tool_turns_match_the_chat_templates(name):
    call = '{"name": "weather", "arguments": {"city": "Paris"}}'
    conv = Conversation((Message("user", "Weather in Paris?"), Message("function", call),
                         Message("observation", '{"temp": 21}'), Message("assistant", "It is 21 degrees.")))
    tok = tokenizer_for(name)
    got = ours(get_template(name), tok, conv)
    if get_template(name).efficient_eos:
        got = got[:-1]
    assert got == theirs(tok, conv, name)


def test_qwen_injects_its_default_system_prompt_like_the_model():
    tok = tokenizer_for("qwen")
    ids = ours(get_template("qwen"), tok, conv_of(TWO))
    assert ids == theirs(tok, conv_of(TWO), "qwen")
    assert tok.decode(ids).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    with_own = tok.decode(ours(get_template("qwen"), tok, conv_of(TWO, SYSTEM)))
    assert "You are Qwen" not in with_own and SYSTEM in with_own


def test_qwen3_keeps_only_the_last_replys_thought_like_the_model():
    pairs = (("2+2?", "<think>\nadd them\n</think>\n\n4"), ("3+3?", "<think>\nadd again\n</think>\n\n6"))
    tok = tokenizer_for("qwen3")
    conv = conv_of(pairs)
    ids = ours(get_template("qwen3"), tok, conv)
    assert ids == theirs(tok, conv, "qwen3")
    text = tok.decode(ids)
    assert "add them" not in text and "<think>\nadd again\n</think>\n\n6<|im_end|>" in text
    assert trained_spans(get_template("qwen3"), tok, conv) == [
        "4<|im_end|>\n", "<think>\nadd again\n</think>\n\n6<|im_end|>\n"]


def test_system_prompt_goes_inside_the_first_user_turn_for_llama2_mistral_gemma():
    for name, opening in [("llama2", "<s>[INST] <<SYS>>\nYou are terse."),
                          ("mistral", "<s> [INST] You are terse.\nAnswer in one line.\n\nHi there [/INST]"),
                          ("gemma", "<bos><start_of_turn>user\nYou are terse.\nAnswer in one line.\n\nHi there")]:
        tok = tokenizer_for(name)
        text = tok.decode(ours(get_template(name), tok, conv_of(TWO, SYSTEM)))
        assert text.startswith(opening), (name, text)
        assert text.count("You are terse.") == 1


def test_bos_written_once_where_the_format_says():
    tok = tokenizer_for("llama3")
    ids = ours(get_template("llama3"), tok, conv_of(THREE, SYSTEM))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    tok = tokenizer_for("llama2")
    ids = ours(get_template("llama2"), tok, conv_of(THREE, SYSTEM))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == len(THREE)  # one per [INST]


# --- masking -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,spans", [
    ("chatml", ["Hello! How can I help?<|im_end|>\n", "I am Lathe Assistant.<|im_end|>\n"]),
    ("llama3", ["Hello! How can I help?<|eot_id|>", "I am Lathe Assistant.<|eot_id|>"]),
    ("llama2", [" Hello! How can I help? </s>", " I am Lathe Assistant. </s>"]),
    ("mistral", [" Hello! How can I help?</s>", " I am Lathe Assistant.</s>"]),
    ("zephyr", ["Hello! How can I help?</s>\n", "I am Lathe Assistant.</s>\n"]),
    ("gemma", ["Hello! How can I help?<end_of_turn>\n", "I am Lathe Assistant.<end_of_turn>\n"]),
    ("phi", ["Hello! How can I help?<|end|>\n", "I am Lathe Assistant.<|end|>\n<|endoftext|>"]),
    ("deepseek", [f" Hello! How can I help?{DEEPSEEK_EOS}", f" I am Lathe Assistant.{DEEPSEEK_EOS}"]),
    ("qwen3", ["Hello! How can I help?<|im_end|>\n", "<think>\n\n</think>\n\nI am Lathe Assistant.<|im_end|>\n"]),
    # efficient_eos: the next turn's <|user|> ends a reply; one eos ends the last
    ("chatglm3", ["\n Hello! How can I help?<|user|>", "\n I am Lathe Assistant.</s>"]),
])
def test_only_replies_and_their_end_tokens_are_trained(name, spans):
    assert trained_spans(get_template(name), tokenizer_for(name), conv_of(TWO, SYSTEM)) == spans


def test_efficient_eos_without_a_stop_token_trains_one_eos_at_the_end():
    tok = tokenizer_for("chatml")  # baichuan2's <reserved_*> are plain text here; the point is the mask
    spans = trained_spans(get_template("baichuan2"), tok, conv_of(TWO))
    assert spans == ["Hello! How can I help?", "I am Lathe Assistant.<|im_end|>"]


def test_pieces_are_split_from_one_tokenization_even_when_bpe_merges_across_a_boundary():
    tok = tokenizer_for("chatml")
    word = next(w for w in sorted(tok.get_vocab()) if w.isalpha() and len(w) >= 6
                and tok.encode(w, add_special_tokens=False) == [tok.convert_tokens_to_ids(w)])
    pieces = [word[:3], word[3:] + "<|im_end|>"]
    whole = tok.encode("".join(pieces), add_special_tokens=False)
    separately = [t for p in pieces for t in tok.encode(p, add_special_tokens=False)]
    assert separately != whole  # the test is only meaningful if per-piece encoding differs
    split = encode_pieces(tok, pieces)
    assert split[0] + split[1] == whole
    assert split == [[tok.convert_tokens_to_ids(word)], [tok.eos_token_id]]  # goes where it starts
    conv = conv_of(((word[:3], word[3:]),))
    assert ours(get_template("empty"), tok, conv) == whole


def test_trimmed_offsets_split_the_same_as_exact_ones():
    from tokenizers import processors

    plain = tokenizer_for("chatml")
    trimmed = tokenizer_for("chatml")  # offsets that leave out a token's leading space
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    texts = ["Q: ", "the answer  ", "  \n", " the"]
    split = encode_pieces(plain, texts)
    # " the" straddles the first boundary: it starts in the first piece, so it goes there
    assert [[plain.convert_ids_to_tokens(t) for t in piece] for piece in split] == [
        ["Q", ":", "Ġthe"], ["Ġanswer", "Ġ", "Ġ"], ["Ġ", "Ġ", "Ċ"], ["Ġthe"]]
    assert encode_pieces(trimmed, texts) == split


def test_slow_tokenizers_fall_back_to_encoding_each_piece():
    class Slow:  # a tokenizer without offsets
        is_fast = False

        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

    tok = tokenizer_for("chatml")
    conv = conv_of(THREE, SYSTEM)
    assert ours(get_template("chatml"), Slow(tok), conv) == ours(get_template("chatml"), tok, conv)


# --- stop tokens -------------------------------------------------------------------------

def test_stop_token_ids():
    llama3 = tokenizer_for("llama3")
    assert get_template("llama3").stop_token_ids(llama3) == [
        llama3.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")]
    glm = tokenizer_for("chatglm3")
    assert get_template("chatglm3").stop_token_ids(glm) == [
        glm.convert_tokens_to_ids(t) for t in ("</s>", "<|user|>", "<|observation|>")]
    qwen = tokenizer_for("qwen")
    assert get_template("qwen").stop_token_ids(qwen) == [qwen.convert_tokens_to_ids("<|im_end|>")]
    # stop words the tokenizer does not have are skipped
    assert get_template("llama3").stop_token_ids(qwen) == [qwen.eos_token_id]


# --- template: auto ----------------------------------------------------------------------

def _same_as(template_name: str, tok, conv: Conversation):
    auto, template = get_template("auto"), get_template(template_name)
    a = tokenize_conversation(conv, auto, tok, cutoff_len=100_000)
    b = tokenize_conversation(conv, template, tok, cutoff_len=100_000)
    return a, b


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("pairs", [TWO, THREE])
def test_auto_on_a_chatml_tokenizer_gives_the_chatml_ids_and_mask(pairs, system):
    tok = tokenizer_for("chatml")
    a, b = _same_as("chatml", tok, conv_of(pairs, system))
    assert a["input_ids"] == b["input_ids"] == theirs(tok, conv_of(pairs, system))
    assert a["labels"] == b["labels"]
    assert any(label != IGNORE_INDEX for label in a["labels"])


@pytest.mark.parametrize("name", ["qwen3", "phi", "llama3", "gemma", "zephyr"])
def test_auto_matches_the_builtin_template_ids_and_mask(name):
    tok = tokenizer_for(name)
    pairs = THREE if name != "qwen3" else (("2+2?", "<think>\nadd\n</think>\n\n4"), ("And 3+3?", "6"))
    a, b = _same_as(name, tok, conv_of(pairs, SYSTEM))
    assert a["input_ids"] == b["input_ids"]
    assert a["labels"] == b["labels"]


def test_auto_follows_a_template_whose_prefixes_render_differently():
    tok = tokenizer_for("mistral", MISTRAL_V3_JINJA)
    conv = conv_of(TWO, SYSTEM)
    auto = get_template("auto")
    assert ours(auto, tok, conv) == theirs(tok, conv)
    assert trained_spans(auto, tok, conv) == [" Hello! How can I help?</s>", " I am Lathe Assistant.</s>"]


def test_auto_trains_the_stop_token_that_ends_a_reply_without_an_end_token():
    tok = tokenizer_for("chatglm3")
    conv = conv_of(TWO)
    auto = get_template("auto")
    assert ours(auto, tok, conv) == theirs(tok, conv, "chatglm3")
    assert trained_spans(auto, tok, conv) == ["\n Hello! How can I help?<|user|>", "\n I am Lathe Assistant."]


def test_auto_generation_prompt_matches_the_chat_template():
    tok = tokenizer_for("qwen")
    expected = list(tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False))
    assert get_template("auto").encode_prompt([], "Hi there", tok) == expected


def test_auto_without_a_chat_template_raises_config_error_naming_a_template():
    tok = tokenizer_for("chatml")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="chat_template.*template: chatml"):
        get_template("auto").encode_turns(conv_of(TWO), tok)
    with pytest.raises(ConfigError, match="chat_template"):
        get_template("auto").stop_token_ids(tok)


def test_auto_stop_tokens_add_the_reply_end_token_and_the_generation_eos(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = tokenizer_for("llama3")  # eos is <|end_of_text|>; replies end with <|eot_id|>
    eot, eom = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|eom_id|>")
    assert get_template("auto").stop_token_ids(tok) == [tok.eos_token_id, eot]
    tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eom, tok.eos_token_id]}))
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert get_template("auto").stop_token_ids(loaded) == [tok.eos_token_id, eom, eot]


# --- check_against_tokenizer -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(JINJA_CASES))
def test_check_against_tokenizer_accepts_the_matching_template(name):
    assert check_against_tokenizer(get_template(name), tokenizer_for(name)) is None


def test_check_against_tokenizer_reports_the_first_difference_in_one_line():
    msg = check_against_tokenizer(get_template("qwen"), tokenizer_for("llama3"))
    assert isinstance(msg, str) and "\n" not in msg
    assert "'qwen'" in msg and "token 0" in msg and "<|begin_of_text|>" in msg
    # chatml vs Qwen2.5's template: only the default system prompt differs
    msg = check_against_tokenizer(get_template("chatml"), tokenizer_for("qwen"))
    assert isinstance(msg, str) and "without a system prompt" in msg and "token 1" in msg


def test_check_against_tokenizer_is_silent_without_a_chat_template():
    tok = tokenizer_for("llama3")
    tok.chat_template = None
    assert check_against_tokenizer(get_template("qwen"), tok) is None


# --- registry ----------------------------------------------------------------------------

def test_all_templates_are_registered_and_render_a_conversation():
    names = {"default", "empty", "alpaca", "vicuna", "chatml", "qwen", "qwen3", "qwen3_nothink", "llama2",
             "llama3", "mistral", "gemma", "chatglm2", "chatglm3", "baichuan2", "phi", "deepseek", "yi",
             "zephyr", "auto"}
    assert names <= set(TEMPLATES.names())
    tok = tokenizer_for("llama2")  # has bos and eos
    for name in names - {"auto"}:
        template = get_template(name)
        assert isinstance(template, Template)
        pieces = template.turn_pieces(conv_of(TWO), tok)
        assert [len(pieces), TWO[0][0] in pieces[0][0], TWO[1][0] in pieces[1][0]] == [2, True, True], name
        assert TWO[0][1] in pieces[0][1] and TWO[1][1] in pieces[1][1], name
        ids = ours(template, tok, conv_of(TWO))
        assert ids == tok.encode("".join(p + r for p, r in pieces), add_special_tokens=False), name


def test_default_system_prompts_and_round_numbers():
    tok = tokenizer_for("llama2")
    text = "".join(p + r for p, r in get_template("vicuna").turn_pieces(conv_of(TWO), tok))
    assert text.startswith("<s>A chat between a curious user") and "USER: Hi there ASSISTANT: Hello!" in text
    text = "".join(p + r for p, r in get_template("chatglm2").turn_pieces(conv_of(TWO), tok))
    assert "[Round 1]\n\n问：Hi there\n\n答：" in text and "[Round 2]" in text and text.endswith("</s>")
