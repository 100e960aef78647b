"""`lathe chat`: talk to a trained model in the terminal, with the template it was trained with.

A `ChatSession` holds the model, the template and the history; `reply()` answers one
message through the inference engine (`lathe.infer.engine`), streaming its text through a
callback when given one, and `chat_loop()` reads messages from a terminal or a pipe.
Prompts are built by the same template object that training used
(`template.encode_prompt`), and a reply ends at the template's stop tokens, so the model
is asked exactly the way it was taught.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from lathe.config.schema import GenerateConfig, LatheConfig
from lathe.data.templates import Template
from lathe.infer.load import (  # noqa: F401 - chat's names for them
    Note,
    _to_stderr,
    chat_generation,
    choose_template,
    describe_generation,
    load_generator,
)

CLEAR, EXIT = "/clear", "/exit"


@dataclass
class ChatSession:
    """A model ready to chat, and the conversation so far."""

    model: Any
    tokenizer: Any
    template: Template
    generate: GenerateConfig
    cutoff_len: int
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    note: Note = _to_stderr  # where remarks go (history cut, template chosen)
    said_truncated: bool = False

    def clear(self) -> None:
        self.history.clear()


# --- loading -----------------------------------------------------------------------------

def load_session(cfg: LatheConfig, system: str | None = None, note: Note = _to_stderr) -> ChatSession:
    """Base model + adapters (or an exported model) with the training template."""
    g = load_generator(cfg, note)
    return ChatSession(model=g.model, tokenizer=g.tokenizer, template=g.template, generate=g.generate,
                       cutoff_len=cfg.data.cutoff_len,
                       system=system if system is not None else g.template.default_system or None,
                       stop_ids=g.stop_ids, note=note)


# --- one reply ---------------------------------------------------------------------------

def build_prompt(session: ChatSession, message: str) -> list[int]:
    """Prompt ids for `message` after the history; the oldest turns go first when the
    prompt would exceed cutoff_len (and they are forgotten)."""
    tok, template = session.tokenizer, session.template
    ids = template.encode_prompt(session.history, message, tok, system=session.system)
    dropped = 0
    while len(ids) > session.cutoff_len and session.history:
        session.history.pop(0)
        dropped += 1
        ids = template.encode_prompt(session.history, message, tok, system=session.system)
    if dropped and not session.said_truncated:
        session.said_truncated = True
        session.note(f"(The conversation is longer than cutoff_len={session.cutoff_len} tokens; "
                     "the oldest turns are forgotten from now on.)")
    if len(ids) > session.cutoff_len:
        session.note(f"(This message is {len(ids)} tokens with the template, more than cutoff_len="
                     f"{session.cutoff_len}; only its last {session.cutoff_len} tokens are used.)")
        ids = ids[-session.cutoff_len:]
    return ids


def reply(session: ChatSession, message: str, on_text: Callable[[str], None] | None = None) -> str:
    """Answer `message` after the history and remember the exchange (lathe.infer's engine).

    With `on_text`, the text is handed over piece by piece as it is generated (beam search
    cannot stream: the whole reply comes at once). The pieces joined are the returned text."""
    from lathe.infer.engine import Sampling, Sequence, decode

    prompt = build_prompt(session, message)
    seq = Sequence(prompt, Sampling.from_generate(session.generate),
                   on_text=(lambda text, _: on_text(text)) if on_text is not None else None)
    decode(session.model, session.tokenizer, [seq], session.stop_ids)
    session.history.append((message, seq.text))
    return seq.text


# --- the loop ------------------------------------------------------------------------------

def _read(stdin: TextIO, interactive: bool) -> str | None:
    """The next line, or None at the end of input."""
    if interactive and stdin is sys.stdin:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        try:
            return input("\nUser: ")
        except EOFError:
            return None
    if interactive:
        print("\nUser: ", end="", flush=True)
    line = stdin.readline()
    return line if line else None


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO, interactive: bool) -> int:
    """Read messages until /exit or the end of input; returns how many were answered.

    Each reply is written as "Assistant: <text>" on its own line(s), streamed."""
    answered = 0

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    try:
        while True:
            try:
                line = _read(stdin, interactive)
            except UnicodeDecodeError:
                session.note("The input could not be decoded (is the terminal UTF-8?); try again.")
                continue
            if line is None:
                break
            message = line.strip()
            if not message:
                continue
            if message == EXIT:
                break
            if message == CLEAR:
                session.clear()
                session.note("History cleared.")
                continue
            write("Assistant: ")
            reply(session, message, on_text=write)
            write("\n")
            answered += 1
    except KeyboardInterrupt:
        write("\n")
    if interactive:
        write("\n")
    return answered


def run_chat(cfg: LatheConfig, system: str | None = None, stdin: TextIO | None = None,
             stdout: TextIO | None = None) -> None:
    """`lathe chat`: multi-turn chat in a terminal, or over messages piped in (one per line).

    A terminal gets a banner and prompts and remarks inline; piped input gets only the
    "Assistant: ..." lines on stdout (remarks go to stderr)."""
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    interactive = bool(getattr(stdin, "isatty", lambda: False)())

    def note(text: str) -> None:
        if interactive:
            print(text, file=stdout, flush=True)
        else:
            _to_stderr(text)

    if interactive:
        note(f"Loading {cfg.model.model_name_or_path} ...")
    session = load_session(cfg, system=system, note=note)
    if interactive:
        adapters = ", ".join(cfg.model.adapter_name_or_path or [])
        note(f"Lathe chat: {cfg.model.model_name_or_path}{f' + {adapters}' if adapters else ''}, "
             f"template {session.template.name}. Type {CLEAR} to forget the history, "
             f"{EXIT} (or Ctrl-D) to leave.")
    chat_loop(session, stdin, stdout, interactive)


def chat_once(cfg: LatheConfig | dict | str, message: str, system: str | None = None) -> str:
    """One greedy-or-configured answer to `message` from a fresh session (for scripts and the
    demo). `cfg` may also be a config dict or a YAML path."""
    if not isinstance(cfg, LatheConfig):
        from lathe.config.load import load_config

        cfg = load_config(cfg, command="chat")
    return reply(load_session(cfg, system=system), message)
