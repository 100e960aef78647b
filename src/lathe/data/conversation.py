"""The one conversation model every dataset format converts into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["user", "assistant", "observation", "function"]
PROMPT_ROLES = ("user", "observation")  # what the model reads (never trained)
RESPONSE_ROLES = ("assistant", "function")  # what the model writes (trained)


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """Prompt-side and response-side messages alternating, prompt side first.

    `observation` is a tool result (prompt side); `function` is the model's tool call
    (response side). `system` and `tools` (a JSON string of tool schemas) are optional.
    The converters in formats.py guarantee the alternation.
    """

    messages: tuple[Message, ...]
    system: str | None = None
    tools: str | None = None
    origin: str = ""  # "file row N", for error messages downstream

    def turns(self) -> list[tuple[Message, Message]]:
        """(prompt message, response message) pairs."""
        m = self.messages
        return [(m[i], m[i + 1]) for i in range(0, len(m) - 1, 2)]

    def to_row(self) -> dict:
        return {
            "roles": [x.role for x in self.messages],
            "contents": [x.content for x in self.messages],
            "system": self.system or "",
            "tools": self.tools or "",
            "origin": self.origin,
        }

    @staticmethod
    def from_row(row: dict) -> Conversation:
        msgs = tuple(Message(r, c) for r, c in zip(row["roles"], row["contents"]))
        return Conversation(msgs, system=row.get("system") or None, tools=row.get("tools") or None,
                            origin=row.get("origin", ""))


@dataclass(frozen=True)
class Rendered:
    """Token ids with a per-token trained flag (True = counted in the loss)."""

    input_ids: list[int]
    trained: list[bool]
