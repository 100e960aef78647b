"""Chat templates: data (format strings) plus one render function.

A template turns a conversation into text pieces; `render` tokenizes each piece
and marks which tokens are trained (the assistant replies and their end token).
The same object serves training and generation, so what the model is trained on
is exactly what it is prompted with.

Format strings use `{content}`, `{bos}` and `{eos}`; `{bos}`/`{eos}` become the
tokenizer's own special tokens. Substitution is plain text replacement, so braces
inside user content are safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from lathe.data.conversation import Conversation
from lathe.registry import Registry

TEMPLATES: Registry[Template] = Registry("template")


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
    default_system: str = ""
    stop_words: tuple[str, ...] = ()  # extra tokens that end generation besides eos

    def fill(self, fmt: str, tokenizer, content: str = "") -> str:
        return (
            fmt.replace("{bos}", tokenizer.bos_token or "")
            .replace("{eos}", tokenizer.eos_token or "")
            .replace("{content}", content)
        )

    def turn_pieces(self, conv: Conversation, tokenizer) -> list[tuple[str, str]]:
        """(prompt text, response text) for each turn, ready to tokenize."""
        system = conv.system if conv.system else self.default_system
        if conv.tools:
            system = self.tools.replace("{tools}", conv.tools).replace("{content}", system or "")
        pieces = []
        for i, (asked, answered) in enumerate(conv.turns()):
            prompt = ""
            if i == 0:
                prompt += self.fill(self.prefix, tokenizer)
                if system:
                    prompt += self.fill(self.system, tokenizer, system)
            else:
                prompt += self.fill(self.separator, tokenizer)
            ask_fmt = self.observation if asked.role == "observation" and self.observation else self.user
            answer_fmt = self.function if answered.role == "function" and self.function else self.assistant
            prompt += self.fill(ask_fmt, tokenizer, asked.content)
            pieces.append((prompt, self.fill(answer_fmt, tokenizer, answered.content)))
        return pieces

    def encode_turns(self, conv: Conversation, tokenizer) -> list[tuple[list[int], list[int]]]:
        """Token ids of each turn's prompt and response."""
        return [
            (_encode(tokenizer, p), _encode(tokenizer, r)) for p, r in self.turn_pieces(conv, tokenizer)
        ]

    def encode_prompt(self, history: list[tuple[str, str]], query: str, tokenizer,
                      system: str | None = None) -> list[int]:
        """Ids that prompt the model for its next reply (used by generation)."""
        from lathe.data.conversation import Message

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
            tid = tokenizer.convert_tokens_to_ids(word)
            if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        return ids


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def register(template: Template) -> Template:
    TEMPLATES.add(template.name, template)
    return template


def get_template(name: str) -> Template:
    return TEMPLATES.get(name)


register(Template(
    name="default",
    system="System: {content}\n",
    user="Human: {content}\nAssistant: ",
    assistant="{content}{eos}",
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
register(Template(
    name="chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    stop_words=("<|im_end|>",),
))
register(Template(
    name="qwen",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    stop_words=("<|im_end|>",),
))
register(Template(
    name="llama3",
    prefix="{bos}",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user=(
        "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    assistant="{content}<|eot_id|>",
    stop_words=("<|eot_id|>", "<|eom_id|>"),
))
