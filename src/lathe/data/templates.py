"""Chat templates: data (format strings) plus one render function.

A template turns a conversation into text pieces (each turn's prompt and reply);
`encode_turns` tokenizes the whole text at once and splits the ids at the piece
boundaries, so the ids are exactly what tokenizing the rendered conversation gives
(what `tokenizer.apply_chat_template(tokenize=True)` returns), and the reply pieces
are the trained tokens. The same object serves training and generation, so what
the model is trained on is exactly what it is prompted with.

Format strings use `{content}`, `{bos}`, `{eos}` and `{idx}` (the 1-based turn
number); `{bos}`/`{eos}` become the tokenizer's own special tokens. Substitution is
one pass over the format, so braces inside user content are safe.

A prompt should not end with a space: tokenizers glue a space to the word after it,
so the reply's first word would start inside the prompt and never be trained. Put
the space at the start of the reply format instead (see `mistral`, `deepseek`).

`template: auto` (`AutoTemplate`) renders with the tokenizer's own Jinja
`chat_template` instead of a format string. `check_against_tokenizer` tells whether
a built-in template renders the same ids as the tokenizer's chat_template.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from lathe.data.conversation import Conversation, Message
from lathe.errors import ConfigError, DataError
from lathe.registry import Registry

TEMPLATES: Registry[Template] = Registry("template")

_FIELD = re.compile(r"\{(bos|eos|content|idx|tools)\}")


def _sub(fmt: str, values: dict[str, str]) -> str:
    """Replace the {fields} of `fmt` in one pass (braces inside the values are left alone)."""
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), fmt)


@dataclass(frozen=True)
class Template:
    name: str
    prefix: str = ""  # once, at the very beginning (e.g. "{bos}")
    system: str = "{content}"  # how the system prompt is written
    user: str = "{content}"  # a user turn, including the assistant header that follows it
    assistant: str = "{content}{eos}"  # an assistant turn: everything here is trained
    separator: str = ""  # between an assistant turn and the next user turn (not trained)
    observation: str | None = None  # a tool result turn (default: like a user turn)
    function: str | None = None  # the model's tool call (default: like an assistant turn)
    tools: str = "{content}\n\nYou can call these tools:\n{tools}"  # system text + tool schemas
    default_system: str = ""  # used when a conversation has no system prompt
    stop_words: tuple[str, ...] = ()  # extra tokens that end generation besides eos
    # The system text (written with `system`) opens the first user message instead of
    # standing on its own: models without a system role (llama2, mistral, gemma).
    system_in_user: bool = False
    # Strip whitespace around each message, as templates that `trim` their content do
    # (a system prompt folded into the first user message is not stripped).
    strip_content: bool = False
    # The eos does not close each reply (the assistant format has none); one eos closes
    # the last reply, and a stop word that opens the next prompt (chatglm3's <|user|>) is
    # trained as the end of the reply before it. Models: chatglm2, chatglm3, baichuan2.
    efficient_eos: bool = False
    suffix: str = ""  # once, after the last reply, and trained with it (e.g. phi's "{eos}")
    # Reasoning models: (open, close) tags of a thought inside a reply. As the models' own
    # templates do, a thought is dropped from replies before the last user message; a reply
    # after it is written with `thought_format` (the last one even when it has no thought).
    thought_tags: tuple[str, str] | None = None
    thought_format: str = ""

    def fill(self, fmt: str, tokenizer, content: str = "", idx: int = 1) -> str:
        return _sub(fmt, {
            "bos": tokenizer.bos_token or "",
            "eos": tokenizer.eos_token or "",
            "content": content,
            "idx": str(idx),
        })

    def system_text(self, conv: Conversation) -> str:
        """The system prompt this conversation is rendered with (tool schemas included)."""
        system = conv.system if conv.system else self.default_system
        if conv.tools:
            system = _sub(self.tools, {"content": system or "", "tools": conv.tools})
        return system or ""

    def turn_pieces(self, conv: Conversation, tokenizer) -> list[tuple[str, str]]:
        """(prompt text, response text) for each turn, ready to tokenize."""
        system = self.system_text(conv)
        turns = conv.turns()
        queries = [i for i, (asked, _) in enumerate(turns) if asked.role == "user"]
        last_query = queries[-1] if queries else len(turns)
        pieces = []
        for i, (asked, answered) in enumerate(turns):
            ask = self._clean(asked.content)
            prompt = self.fill(self.prefix if i == 0 else self.separator, tokenizer)
            if i == 0 and system:
                if self.system_in_user:
                    ask = self.fill(self.system, tokenizer, system) + ask
                else:
                    prompt += self.fill(self.system, tokenizer, self._clean(system))
            ask_fmt = self.observation if asked.role == "observation" and self.observation else self.user
            answer_fmt = self.function if answered.role == "function" and self.function else self.assistant
            prompt += self.fill(ask_fmt, tokenizer, ask, idx=i + 1)
            answer = self._answer(answered.content, after_last_query=i >= last_query,
                                  last=i == len(turns) - 1)
            pieces.append((prompt, self.fill(answer_fmt, tokenizer, answer, idx=i + 1)))
        end = self.suffix + ("{eos}" if self.efficient_eos else "")
        if pieces and end:
            prompt, response = pieces[-1]
            pieces[-1] = (prompt, response + self.fill(end, tokenizer))
        return pieces

    def _clean(self, text: str) -> str:
        return text.strip() if self.strip_content else text

    def _answer(self, content: str, after_last_query: bool, last: bool) -> str:
        content = self._clean(content)
        if not self.thought_tags:
            return content
        opening, closing = self.thought_tags
        thought, answer = "", content
        if closing in content:
            thought = content.split(closing)[0].rstrip("\n").split(opening)[-1].lstrip("\n")
            answer = content.split(closing)[-1].lstrip("\n")
        if after_last_query and (last or thought):
            return _sub(self.thought_format, {"content": thought.strip("\n")}) + answer.lstrip("\n")
        return answer

    def encode_turns(self, conv: Conversation, tokenizer) -> list[tuple[list[int], list[int]]]:
        """Token ids of each turn's prompt and response.

        Their concatenation is the tokenization of the whole rendered text, token for
        token; a token that straddles a piece boundary goes to the piece where it starts.
        """
        pieces = self.turn_pieces(conv, tokenizer)
        ids = encode_pieces(tokenizer, [text for pair in pieces for text in pair])
        turns = [(ids[2 * i], ids[2 * i + 1]) for i in range(len(pieces))]
        if self.efficient_eos:
            turns = claim_stop_tokens(turns, self.stop_token_ids(tokenizer))
        return turns

    def encode_prompt(self, history: list[tuple[str, str]], query: str, tokenizer,
                      system: str | None = None) -> list[int]:
        """Ids that prompt the model for its next reply (used by generation)."""
        msgs = []
        for u, a in history:
            msgs += [Message("user", u), Message("assistant", a)]
        msgs += [Message("user", query), Message("assistant", "")]
        turns = self.encode_turns(Conversation(tuple(msgs), system=system), tokenizer)
        ids: list[int] = []
        for prompt, response in turns[:-1]:
            ids += prompt + response
        return ids + turns[-1][0]

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for word in self.stop_words:
            _add_token(ids, word, tokenizer)
        return ids


def _add_token(ids: list[int], token: str, tokenizer) -> None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
        ids.append(tid)


# --- tokenizing pieces exactly ----------------------------------------------------------

def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def encode_pieces(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, such that their concatenation is the tokenization of "".join(texts).

    Fast tokenizers tokenize the joined text once (no bos/eos of their own) and split the
    ids by character offsets; slow tokenizers, which have no offsets, encode each text alone.
    """
    text = "".join(texts)
    if not text:
        return [[] for _ in texts]
    if not getattr(tokenizer, "is_fast", False):
        return [_encode(tokenizer, t) for t in texts]
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a "fast" tokenizer without offsets
        return [_encode(tokenizer, t) for t in texts]
    ids = list(enc["input_ids"])
    starts = _token_starts(text, enc["offset_mapping"])
    cuts, pos = [0], 0
    for piece in texts[:-1]:
        pos += len(piece)
        cuts.append(bisect.bisect_left(starts, pos))  # tokens starting before `pos` stay behind
    cuts.append(len(ids))
    return [ids[a:b] for a, b in zip(cuts, cuts[1:])]


def _token_starts(text: str, offsets) -> list[int]:
    """Where each token starts, non-decreasing.

    Some tokenizers trim whitespace from offsets (a lone space reports an empty span after
    itself); whitespace between a token's reported start and the previous token's end is
    counted as the token's own, so it starts where the previous one ended.
    """
    starts: list[int] = []
    prev_end = 0
    for start, end in offsets:
        if start > prev_end and text[prev_end:start].isspace():
            start = prev_end
        start = max(start, starts[-1] if starts else 0)
        starts.append(start)
        prev_end = max(prev_end, end)
    return starts


def claim_stop_tokens(turns: list[tuple[list[int], list[int]]],
                      stop_ids: list[int]) -> list[tuple[list[int], list[int]]]:
    """A reply with no stop token ends where the next prompt's stop token (e.g. <|user|>) is."""
    stop = set(stop_ids)
    out = list(turns)
    for k in range(len(out) - 1):
        prompt, response = out[k]
        next_prompt, next_response = out[k + 1]
        if next_prompt and next_prompt[0] in stop and not stop.intersection(response):
            out[k] = (prompt, response + next_prompt[:1])
            out[k + 1] = (next_prompt[1:], next_response)
    return out


# --- template: auto ---------------------------------------------------------------------

_JINJA_ROLES = {"user": "user", "assistant": "assistant", "observation": "tool", "function": "assistant"}
_SENTINEL = "\u2063lathe-reply-sentinel\u2063"


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


_PER_TOKENIZER: dict[tuple, Any] = {}


def _per_tokenizer(tokenizer, what: str, compute):
    """`compute(tokenizer)`, remembered for this tokenizer and chat template (it runs per row)."""
    chat_template = getattr(tokenizer, "chat_template", None)
    key = (what, id(tokenizer), chat_template if isinstance(chat_template, str) else repr(chat_template),
           tokenizer.eos_token_id, getattr(tokenizer, "name_or_path", None), len(tokenizer))
    if key not in _PER_TOKENIZER:
        if len(_PER_TOKENIZER) > 64:
            _PER_TOKENIZER.clear()
        _PER_TOKENIZER[key] = compute(tokenizer)
    return _PER_TOKENIZER[key]


def _added_tokens(tokenizer) -> list[str]:
    """The strings the tokenizer matches whole (special and added tokens)."""
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
    found |= {getattr(t, "content", str(t)) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    return sorted((t for t in found if len(t) > 1), key=len, reverse=True)


def _diverge(full: str, other: str, tokens: list[str]) -> int:
    """Where `other` stops being a prefix of `full`, moved back to the start of an added token
    the texts diverge inside (<|user|> and <|endoftext|> share "<|")."""
    at = _common_prefix(full, other)
    for token in tokens:
        start = full.rfind(token, max(0, at - len(token) + 1), at + len(token) - 1)
        if 0 <= start < at < start + len(token):
            at = start
    return at


def _overlap(tail: str, full: str, at: int) -> int:
    """The longest L such that `tail` ends with full[at:at + L]."""
    for n in range(min(len(tail), len(full) - at), 0, -1):
        if tail.endswith(full[at:at + n]):
            return n
    return 0


def suggest_template(tokenizer) -> str:
    """A built-in template that probably matches the tokenizer, from its special tokens."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a guess for an error message only
        return "default"
    hints = [("[gMASK]", "chatglm3"), ("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"),
             ("<|im_start|>", "chatml"), ("<|end|>", "phi"), ("[INST]", "mistral")]
    return next((name for token, name in hints if token in vocab), "default")


def _tools_list(tools: str | None) -> list[dict] | None:
    if not tools:
        return None
    try:
        parsed = json.loads(tools)
    except ValueError:
        return None
    if isinstance(parsed, dict):
        parsed = [parsed]
    return parsed if isinstance(parsed, list) and all(isinstance(t, dict) for t in parsed) else None


@dataclass(frozen=True)
class AutoTemplate(Template):
    """Renders with the tokenizer's own Jinja `chat_template` (`template: auto`).

    The ids are exactly `apply_chat_template(messages)`'s. A reply starts where rendering
    the conversation up to its question with `add_generation_prompt` ends, and ends where
    rendering the conversation up to the reply ends (when the template renders the latest
    reply differently, e.g. with a thinking block, the part it shares with the full text).
    """

    name: str = "auto"

    def _check(self, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "template: auto renders with the tokenizer's chat_template, but this tokenizer has "
                f"none; set template: {suggest_template(tokenizer)} (or the built-in template that "
                f"matches the model; known: {', '.join(n for n in TEMPLATES.names() if n != 'auto')})"
            )

    def _renderer(self, conv: Conversation, tokenizer):
        head = [{"role": "system", "content": conv.system}] if conv.system else []
        tools = _tools_list(conv.tools)

        def render(messages: list[dict], generation: bool) -> str:
            try:
                return tokenizer.apply_chat_template(head + messages, tools=tools, tokenize=False,
                                                     add_generation_prompt=generation)
            except Exception as e:  # noqa: BLE001 - Jinja raises its own errors (raise_exception)
                where = conv.origin or "a conversation"
                raise DataError(
                    f"{where}: the tokenizer's chat_template cannot render it ({type(e).__name__}: {e}); "
                    "use a built-in template instead of template: auto"
                ) from e

        return render

    def turn_pieces(self, conv: Conversation, tokenizer) -> list[tuple[str, str]]:
        self._check(tokenizer)
        turns = conv.turns()
        if not turns:
            return []
        render = self._renderer(conv, tokenizer)
        msgs = [{"role": _JINJA_ROLES[m.role], "content": m.content} for m in conv.messages[:2 * len(turns)]]
        full = render(msgs, False)
        tokens = _per_tokenizer(tokenizer, "added", _added_tokens)
        pieces, pos = [], 0
        for k in range(len(turns)):
            start = max(self._reply_start(full, render, msgs, k, tokens), pos)
            if k == len(turns) - 1:
                end = len(full)  # anything the template closes the conversation with is trained
            else:
                upto = render(msgs[:2 * k + 2], False)
                common = _diverge(full, upto, tokens)
                end = max(common + _overlap(upto[common:], full, common), start)
            pieces.append((full[pos:start], full[start:end]))
            pos = end
        return pieces

    @staticmethod
    def _reply_start(full: str, render, msgs: list[dict], k: int, tokens: list[str]) -> int:
        prompt = render(msgs[:2 * k + 1], True)
        if full.startswith(prompt):
            return len(prompt)
        # The template renders the prompt differently from the full conversation (e.g. a
        # system prompt before the last user message): the reply starts where its own text does.
        marked = msgs[:2 * k + 1] + [dict(msgs[2 * k + 1], content=_SENTINEL)] + msgs[2 * k + 2:]
        start = _diverge(full, render(marked, False), tokens)
        while start > 0 and full[start - 1] == " ":  # a space before a reply belongs to its first word
            start -= 1
        return start

    def encode_turns(self, conv: Conversation, tokenizer) -> list[tuple[list[int], list[int]]]:
        pieces = self.turn_pieces(conv, tokenizer)
        ids = encode_pieces(tokenizer, [text for pair in pieces for text in pair])
        turns = [(ids[2 * i], ids[2 * i + 1]) for i in range(len(pieces))]
        return claim_stop_tokens(turns, self.stop_token_ids(tokenizer))

    def stop_token_ids(self, tokenizer) -> list[int]:
        """eos, the model's generation eos (generation_config.json beside the tokenizer) and the
        special token the chat template closes a reply with."""
        self._check(tokenizer)
        return list(_per_tokenizer(tokenizer, "stop", self._stop_token_ids))

    def _stop_token_ids(self, tokenizer) -> list[int]:
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for tid in _generation_eos(tokenizer) + _reply_end_token(self, tokenizer):
            if tid not in ids:
                ids.append(tid)
        return ids


def _generation_eos(tokenizer) -> list[int]:
    path = os.path.join(str(getattr(tokenizer, "name_or_path", "") or ""), "generation_config.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    eos = eos if isinstance(eos, list) else [eos]
    return [int(t) for t in eos if isinstance(t, int)]


def _reply_end_token(template: AutoTemplate, tokenizer) -> list[int]:
    """The first non-blank token after a reply in the chat template, if it is a special token."""
    conv = Conversation((Message("user", "Hi"), Message("assistant", _SENTINEL), Message("user", "Hi")))
    try:
        text = template._renderer(conv, tokenizer)(
            [{"role": m.role, "content": m.content} for m in conv.messages], False)
    except DataError:
        return []
    at = text.find(_SENTINEL)
    if at < 0:
        return []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
                if getattr(t, "special", False)}
    for tid in _encode(tokenizer, text[at + len(_SENTINEL):]):
        if tokenizer.decode([tid]).strip():
            return [tid] if tid in special else []
    return []


# --- checking a template against the tokenizer's own ------------------------------------

_CHECK_TURNS = (("Hello, who are you?", "I am a helpful assistant."),
                ("What is 2 + 2?", "2 + 2 = 4."))
_CHECK_SYSTEM = "You are a careful assistant."


def check_against_tokenizer(template: Template, tokenizer) -> str | None:
    """None when `template` renders like the tokenizer's chat_template (or it has none).

    A fixed two-turn conversation, with a system prompt and without, is rendered by both;
    otherwise the answer is one line naming the first differing token, with text around it.
    """
    if not getattr(tokenizer, "chat_template", None) or isinstance(template, AutoTemplate):
        return None
    msgs = tuple(Message(role, text) for pair in _CHECK_TURNS for role, text in zip(("user", "assistant"), pair))
    for system in (None, _CHECK_SYSTEM):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m.role, "content": m.content} for m in msgs]
        try:
            theirs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        except Exception:  # noqa: BLE001 - e.g. a template that rejects system messages
            continue
        theirs = list(theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs)
        ours = [t for p, r in template.encode_turns(Conversation(msgs, system=system), tokenizer) for t in p + r]
        eos = tokenizer.eos_token_id
        if template.efficient_eos and ours and ours[-1] == eos and (not theirs or theirs[-1] != eos):
            ours = ours[:-1]  # the eos an efficient_eos template closes the last reply with
        if ours == theirs:
            continue
        i = _common_prefix(ours, theirs)  # works on lists too
        with_system = "with a system prompt" if system else "without a system prompt"
        return (
            f"template {template.name!r} renders differently from the tokenizer's chat_template "
            f"({with_system}): first difference at token {i}: Lathe has {_around(tokenizer, ours, i)} "
            f"where the tokenizer has {_around(tokenizer, theirs, i)}; use template: auto to follow "
            "the tokenizer, or a template that matches the model"
        )
    return None


def _around(tokenizer, ids: list[int], i: int) -> str:
    before = tokenizer.decode(ids[max(0, i - 4):i])
    after = tokenizer.decode(ids[i:i + 4]) if i < len(ids) else "(end)"
    return repr(before + "|" + after)


# --- registry ---------------------------------------------------------------------------

def register(template: Template) -> Template:
    TEMPLATES.add(template.name, template)
    return template


def get_template(name: str) -> Template:
    return TEMPLATES.get(name)


_CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
_CHATML_ASSISTANT = "{content}<|im_end|>\n"
_QWEN_OBSERVATION = (
    "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
)

register(AutoTemplate())
register(Template(
    name="default",
    system="System: {content}\n",
    user="Human: {content}\nAssistant:",
    assistant=" {content}{eos}",
    separator="\n",
))
register(Template(name="empty", assistant="{content}{eos}"))
register(Template(
    name="alpaca",
    user="### Instruction:\n{content}\n\n### Response:\n",
    assistant="{content}{eos}",
    separator="\n\n",
    system="{content}\n\n",
    default_system=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    ),
))
register(Template(  # Vicuna v1.1+ (FastChat's "vicuna_v1.1")
    name="vicuna",
    prefix="{bos}",
    system="{content} ",
    user="USER: {content} ASSISTANT:",
    assistant=" {content}{eos}",
    default_system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
))
register(Template(
    name="chatml",
    system=_CHATML_SYSTEM,
    user=_CHATML_USER,
    assistant=_CHATML_ASSISTANT,
    observation="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
    stop_words=("<|im_end|>",),
))
register(Template(  # Qwen2 / Qwen2.5 instruct
    name="qwen",
    system=_CHATML_SYSTEM,
    user=_CHATML_USER,
    assistant=_CHATML_ASSISTANT,
    observation=_QWEN_OBSERVATION,
    default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    stop_words=("<|im_end|>",),
))
register(Template(  # Qwen3 (hybrid thinking models, thinking on)
    name="qwen3",
    system=_CHATML_SYSTEM,
    user=_CHATML_USER,
    assistant=_CHATML_ASSISTANT,
    observation=_QWEN_OBSERVATION,
    stop_words=("<|im_end|>",),
    thought_tags=("<think>", "</think>"),
    thought_format="<think>\n{content}\n</think>\n\n",
))
register(Template(  # Qwen3 Instruct-2507 (non-thinking models)
    name="qwen3_nothink",
    system=_CHATML_SYSTEM,
    user=_CHATML_USER,
    assistant=_CHATML_ASSISTANT,
    observation=_QWEN_OBSERVATION,
    stop_words=("<|im_end|>",),
))
register(Template(  # Yi chat models
    name="yi",
    system=_CHATML_SYSTEM,
    user=_CHATML_USER,
    assistant=_CHATML_ASSISTANT,
    stop_words=("<|im_end|>",),
))
register(Template(  # Llama-2-chat
    name="llama2",
    user="{bos}[INST] {content} [/INST]",
    assistant=" {content} {eos}",
    system="<<SYS>>\n{content}\n<</SYS>>\n\n",
    system_in_user=True,
    strip_content=True,
))
register(Template(  # Llama-3 / 3.1 instruct (3.1's date header is not added)
    name="llama3",
    prefix="{bos}",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user=(
        "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    assistant="{content}<|eot_id|>",
    observation=(
        "<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    strip_content=True,
    stop_words=("<|eot_id|>", "<|eom_id|>"),
))
register(Template(  # Mistral-7B-Instruct v0.1/v0.2, Mixtral-8x7B (tokenizer v1)
    name="mistral",
    prefix="{bos}",
    user=" [INST] {content} [/INST]",
    assistant=" {content}{eos}",
    system="{content}\n\n",
    system_in_user=True,
))
register(Template(  # Gemma / Gemma 2 / Gemma 3 (no system role)
    name="gemma",
    prefix="{bos}",
    user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
    assistant="{content}<end_of_turn>\n",
    system="{content}\n\n",
    system_in_user=True,
    strip_content=True,
    stop_words=("<end_of_turn>",),
))
register(Template(  # ChatGLM2-6B
    name="chatglm2",
    prefix="[gMASK]sop",
    system="{content}\n\n",
    user="[Round {idx}]\n\n问：{content}\n\n答：",
    assistant="{content}",
    separator="\n\n",
    efficient_eos=True,
))
register(Template(  # ChatGLM3-6B
    name="chatglm3",
    prefix="[gMASK]sop",
    system="<|system|>\n {content}",
    user="<|user|>\n {content}<|assistant|>",
    assistant="\n {content}",
    observation="<|observation|>\n {content}<|assistant|>",
    stop_words=("<|user|>", "<|observation|>"),
    efficient_eos=True,
))
register(Template(  # Baichuan2 chat
    name="baichuan2",
    user="<reserved_106>{content}<reserved_107>",
    assistant="{content}",
    efficient_eos=True,
))
register(Template(  # Phi-3 / Phi-3.5 instruct
    name="phi",
    prefix="{bos}",
    system="<|system|>\n{content}<|end|>\n",
    user="<|user|>\n{content}<|end|>\n<|assistant|>\n",
    assistant="{content}<|end|>\n",
    suffix="{eos}",
    stop_words=("<|end|>",),
))
register(Template(  # DeepSeek LLM chat (V1/V2)
    name="deepseek",
    prefix="{bos}",
    system="{content}\n\n",
    user="User: {content}\n\nAssistant:",
    assistant=" {content}{eos}",
))
register(Template(  # Zephyr (HuggingFaceH4)
    name="zephyr",
    system="<|system|>\n{content}{eos}\n",
    user="<|user|>\n{content}{eos}\n<|assistant|>\n",
    assistant="{content}{eos}\n",
))
