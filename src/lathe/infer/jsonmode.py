"""`response_format: json_object`: the reply is one JSON object, by constrained decoding.

At each step the candidate tokens are tried in the model's order of preference and only
those whose text keeps the reply a valid beginning of a JSON object stay allowed; once the
object is closed the reply ends. When the token budget is about to run out, the tokens
that bring the object closest to closed are preferred, so a reply that reaches max_tokens
is still complete whenever the budget allows it. The model chooses the content; the
constraint only keeps it well-formed.

The checker is a character-level JSON automaton whose state is a small tuple (copied for
free when a candidate is tried): the stack of open containers, a mode, and its detail.
"""

from __future__ import annotations

import re
from typing import Any

_NUMBER_PREFIX = re.compile(r"-?((0|[1-9]\d*)(\.\d*)?([eE][+-]?\d*)?)?")
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_WS = " \t\n\r"
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_HEX = set("0123456789abcdefABCDEF")

State = tuple[str, str, str]  # (open containers "o"/"a", mode, detail)
START: State = ("", "top", "")


def feed(state: State | None, text: str) -> State | None:
    """The state after `text`, or None when `text` makes the reply invalid JSON."""
    for ch in text:
        if state is None:
            return None
        state = _step(state, ch)
    return state


def _after_value(stack: str) -> State:
    return (stack, "done", "") if not stack else (stack, "after", "")


def _start_value(stack: str, ch: str) -> State | None:
    if ch == "{":
        return stack + "o", "key_or_close", ""
    if ch == "[":
        return stack + "a", "value_or_close", ""
    if ch == '"':
        return stack, "str", "v"
    if ch == "-" or ch.isdigit() and ch.isascii():
        return stack, "num", ch
    if ch in _LITERALS:
        return stack, "lit", _LITERALS[ch]
    return None


def _step(state: State, ch: str) -> State | None:  # noqa: PLR0911 - one branch per JSON mode
    stack, mode, detail = state
    if mode == "str":
        kind, esc = detail[:1], detail[1:]
        if esc == "\\":
            if ch in '"\\/bfnrt':
                return stack, mode, kind
            return (stack, mode, kind + "u") if ch == "u" else None
        if esc.startswith("u"):
            if ch not in _HEX:
                return None
            return (stack, mode, kind + esc + "x") if len(esc) < 4 else (stack, mode, kind)
        if ch == "\\":
            return stack, mode, kind + "\\"
        if ch == '"':
            return (stack, "colon", "") if kind == "k" else _after_value(stack)
        return None if ord(ch) < 0x20 else state
    if mode == "num":
        if _NUMBER_PREFIX.fullmatch(detail + ch):
            return stack, mode, detail + ch
        if not _NUMBER.fullmatch(detail):
            return None
        return _step(_after_value(stack), ch)
    if mode == "lit":
        if ch != detail[:1]:
            return None
        return (stack, mode, detail[1:]) if len(detail) > 1 else _after_value(stack)
    if ch in _WS:
        return state
    if mode == "top":
        return _start_value(stack, ch) if ch == "{" else None
    if mode == "value":
        return _start_value(stack, ch)
    if mode == "value_or_close":
        return _after_value(stack[:-1]) if ch == "]" else _start_value(stack, ch)
    if mode in ("key_or_close", "key"):
        if ch == '"':
            return stack, "str", "k"
        return _after_value(stack[:-1]) if ch == "}" and mode == "key_or_close" else None
    if mode == "colon":
        return (stack, "value", "") if ch == ":" else None
    if mode == "after":
        if ch == ",":
            return (stack, "key", "") if stack[-1] == "o" else (stack, "value", "")
        if ch == "}" and stack[-1] == "o" or ch == "]" and stack[-1] == "a":
            return _after_value(stack[:-1])
        return None
    return None  # done: nothing may follow the object


def distance(state: State) -> int:
    """Characters still needed, at least, to close the object."""
    stack, mode, detail = state
    need = len(stack)
    if mode == "str":
        need += 1 + (4 if detail[1:].startswith("u") else 0) + (2 if detail[:1] == "k" else 0)
    elif mode in ("colon", "key"):
        need += 2 if mode == "colon" else 4
    elif mode == "value":
        need += 1
    elif mode == "lit":
        need += len(detail)
    elif mode == "top":
        need += 2
    return need


class JsonConstraint:
    """The JSON-object state of one reply, and the mask it puts on the next token's logits."""

    def __init__(self, texts: list[str], banned: set[int], closers: list[int]) -> None:
        self.texts = texts  # each token's text
        self.banned = banned  # special tokens: never inside the object
        self.closers = closers  # short structural tokens, tried when the budget runs out
        self.state: State | None = START
        self.last_blank = False

    @staticmethod
    def for_tokenizer(tokenizer: Any, stop_ids: list[int]) -> JsonConstraint:
        cached = getattr(tokenizer, "_lathe_json_vocab", None)
        if cached is None:
            size = len(tokenizer)
            texts = [tokenizer.decode([i]) for i in range(size)]
            banned = set(tokenizer.all_special_ids)
            closers = [i for i, t in enumerate(texts) if t.strip() and len(t.strip()) <= 4
                       and set(t.strip()) <= set('"}],:0nul ')]
            cached = (texts, banned, closers)
            tokenizer._lathe_json_vocab = cached  # per tokenizer object, built once
        texts, banned, closers = cached
        return JsonConstraint(texts, banned | set(stop_ids), closers)

    @property
    def complete(self) -> bool:
        return self.state is not None and self.state[1] == "done"

    def allowed(self, token: int) -> State | None:
        if token in self.banned or token >= len(self.texts) or not self.texts[token]:
            return None
        text = self.texts[token]
        if not text.strip() and self.state is not None and (self.state[1] == "top" or self.last_blank):
            return None  # blanks: never before the object, never twice in a row (a model may loop on them)
        return feed(self.state, text)

    def mask(self, logits: Any, tokens: list[int], max_tokens: int) -> None:
        """Leave finite only the logits of tokens that keep the reply a valid JSON prefix."""
        import torch

        if self.state is None:
            return
        order = torch.argsort(logits, descending=True).tolist()
        left = max_tokens - len(tokens)
        keep: list[int] = []
        if left <= distance(self.state) + 1:  # close now: the candidates that get nearest
            scored = [(distance(s), k, t) for k, t in enumerate(order[:64] + self.closers)
                      if (s := self.allowed(t)) is not None]
            if scored:
                best = min(d for d, _, _ in scored)
                keep = [t for d, _, t in sorted(scored) if d == best][:1]
        if not keep:
            for start, end in ((0, 64), (64, len(order))):
                keep = [t for t in order[start:end] if self.allowed(t) is not None]
                if keep:
                    break
        if not keep:
            return  # nothing fits: the reply ends as the model likes (the check below says so)
        kept = logits[keep].clone()
        logits.fill_(float("-inf"))
        logits[keep] = kept

    def advance(self, token: int) -> None:
        text = self.texts[token] if token < len(self.texts) else None
        self.state = feed(self.state, text) if text is not None else None
        self.last_blank = text is not None and not text.strip() and self.state is not None and self.state[1] != "str"
