"""The one conversation model every dataset format converts into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """Alternating user/assistant messages (user first), plus an optional system prompt."""

    messages: tuple[Message, ...]
    system: str | None = None
    origin: str = ""  # "file row N", for error messages downstream

    def turns(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs; the conversion guarantees strict alternation."""
        m = self.messages
        return [(m[i].content, m[i + 1].content) for i in range(0, len(m) - 1, 2)]

    def to_row(self) -> dict:
        return {
            "roles": [x.role for x in self.messages],
            "contents": [x.content for x in self.messages],
            "system": self.system or "",
            "origin": self.origin,
        }


@dataclass(frozen=True)
class Rendered:
    """Token ids with a per-token trained flag (True = counted in the loss)."""

    input_ids: list[int]
    trained: list[bool] = field(default_factory=list)
