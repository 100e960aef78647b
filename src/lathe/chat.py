"""`lathe chat`: talk to a trained model in the terminal, with the template it was trained with.

A `ChatSession` holds the model, the template and the history; `reply()` answers one
message (streaming its text through a callback when given one) and `chat_loop()` reads
messages from a terminal or a pipe. Prompts are built by the same template object that
training used (`template.encode_prompt`), and a reply ends at the template's stop tokens,
so the model is asked exactly the way it was taught.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from lathe.config.schema import GenerateConfig, LatheConfig
from lathe.data.templates import Template, get_template
from lathe.errors import ConfigError

CLEAR, EXIT = "/clear", "/exit"
Note = Callable[[str], None]


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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

def choose_template(cfg: LatheConfig, tokenizer: Any, model_path: str, note: Note = _to_stderr) -> Template:
    """`template` when the user set it; else the one the run was trained with (the config.yaml
    of the last adapter, or of the model folder for a full fine-tuning run), as export does;
    else the model's own chat_template (`auto`, e.g. an exported model); else the default."""
    from lathe.export import trained_template

    if cfg.is_set("template"):
        return get_template(cfg.data.template)
    run_dir, recorded = trained_template(cfg, model_path)
    if recorded:
        try:
            template = get_template(recorded)
        except ConfigError as e:
            raise ConfigError(f"{run_dir}/config.yaml: {e.args[0]}; set template: in your config") from None
        note(f"Template: {recorded} (from {run_dir}/config.yaml, the config it was trained with)")
        return template
    if getattr(tokenizer, "chat_template", None):
        note("Template: auto (template is not set; using the model's own chat_template)")
        return get_template("auto")
    note(f"Template: {cfg.data.template} (the default: template is not set and the model has no "
         "chat_template; set template to the one the model was trained with)")
    return get_template(cfg.data.template)


def load_session(cfg: LatheConfig, system: str | None = None, note: Note = _to_stderr) -> ChatSession:
    """Base model + adapters (or an exported model) with the training template."""
    from lathe.model.load import load_for_inference
    from lathe.runs import check_inputs

    check_inputs(cfg)  # an adapter run that did not finish is refused before anything loads
    if cfg.is_set("template"):
        get_template(cfg.data.template)  # an unknown name fails before the model loads
    model, tokenizer, path = load_for_inference(cfg)
    template = choose_template(cfg, tokenizer, path, note)
    stop_ids = template.stop_token_ids(tokenizer)  # also checks that template: auto can render
    generate, source = chat_generation(cfg, model, path)
    note(f"Generation: {describe_generation(generate)} ({source})")
    return ChatSession(model=model, tokenizer=tokenizer, template=template, generate=generate,
                       cutoff_len=cfg.data.cutoff_len,
                       system=system if system is not None else template.default_system or None,
                       stop_ids=stop_ids, note=note)


_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "num_beams")


def chat_generation(cfg: LatheConfig, model: Any, model_path: str) -> tuple[GenerateConfig, str]:
    """The settings chat decodes with, and where they came from: the keys the user set win;
    the rest come from the model's own generation_config.json when it ships one (a released
    chat model's tuned sampling); otherwise greedy, which a freshly tuned small model answers
    best with (sampling at temperature 1 corrupts its replies)."""
    import dataclasses

    gen_cfg = getattr(model, "generation_config", None)
    shipped = gen_cfg is not None and _ships_generation_config(model_path)
    values: dict[str, Any] = {"do_sample": False}  # transformers' default, and ours for chat
    if shipped:
        for key in _SAMPLING_KEYS:
            value = getattr(gen_cfg, key, None)
            if value is not None:
                values[key] = value
        source = "the model's generation_config.json"
    else:
        source = "greedy: the model ships no generation_config.json"
    values = {k: v for k, v in values.items() if not cfg.is_set(k)}
    chosen = dataclasses.replace(cfg.generate, **values)
    if any(cfg.is_set(k) for k in (*_SAMPLING_KEYS, "max_new_tokens")):
        source += "; your keys win"
    return chosen, source


def _ships_generation_config(model_path: str) -> bool:
    """Whether the model folder (or the hub repo, as cached by the load) has generation_config.json."""
    from pathlib import Path

    if Path(model_path).is_dir():
        return (Path(model_path) / "generation_config.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_path, "generation_config.json"), str)


def describe_generation(gen: GenerateConfig) -> str:
    if gen.num_beams > 1:
        how = f"beam search, {gen.num_beams} beams"
    elif gen.do_sample:
        how = f"sampling, temperature {gen.temperature}, top_p {gen.top_p}, top_k {gen.top_k or 'off'}"
    else:
        how = "greedy"
    extra = f", repetition_penalty {gen.repetition_penalty}" if gen.repetition_penalty != 1.0 else ""
    return f"{how}{extra}, max_new_tokens {gen.max_new_tokens}"


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


def _streamer(tokenizer: Any, stop_ids: list[int], write: Callable[[str], None]) -> Any:
    """A TextStreamer that hands finished text to `write`, leaving out the prompt, special
    tokens, stop tokens and the reply's leading blanks."""
    import torch
    from transformers import TextStreamer

    class ReplyStreamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.stop = set(stop_ids)
            self.started = False

        def put(self, value: Any) -> None:
            if not self.next_tokens_are_prompt:
                kept = [t for t in value.reshape(-1).tolist() if t not in self.stop]
                if not kept:
                    return
                value = torch.tensor(kept)
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            if text:
                write(text)

    return ReplyStreamer()


def reply(session: ChatSession, message: str, on_text: Callable[[str], None] | None = None) -> str:
    """Answer `message` after the history and remember the exchange.

    With `on_text`, the text is handed over piece by piece as it is generated (beam search
    cannot stream: the whole reply comes at once). The returned text is the decoded reply,
    identical whether streamed or not."""
    import torch

    from lathe.infer import cut_at_stop, generation_kwargs

    prompt = build_prompt(session, message)
    tok = session.tokenizer
    streamer = None
    if on_text is not None and session.generate.num_beams == 1:
        streamer = _streamer(tok, session.stop_ids, on_text)
    input_ids = torch.tensor([prompt], device=session.model.device)
    with torch.no_grad():
        out = session.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
            **generation_kwargs(session.generate, session.stop_ids, tok.pad_token_id))
    ids = cut_at_stop(out[0, len(prompt):].tolist(), session.stop_ids)
    text = tok.decode(ids, skip_special_tokens=True).strip()
    if on_text is not None and streamer is None and text:
        on_text(text)
    session.history.append((message, text))
    return text


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
