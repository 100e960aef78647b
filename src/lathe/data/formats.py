"""Dataset formats -> `Conversation`. Each converter names the row and key it rejects."""

from __future__ import annotations

from lathe.data.conversation import Conversation, Message
from lathe.data.registry import DatasetSpec
from lathe.data.sources import Row
from lathe.errors import DataError


def alpaca_to_conversation(row: Row, spec: DatasetSpec) -> Conversation:
    """instruction (+ input) -> user; output -> assistant; history -> earlier turns."""
    data = row.data
    prompt_col = spec.column("prompt")
    response_col = spec.column("response")
    prompt = _text(row, prompt_col, required=True, role="prompt")
    query = _text(row, spec.column("query"), required=False, role="query")
    response = _text(row, response_col, required=True, role="response")
    user = "\n".join(x for x in (prompt, query) if x)

    messages: list[Message] = []
    history_col = spec.column("history")
    if history_col and data.get(history_col) is not None:
        history = data[history_col]
        if not isinstance(history, list):
            raise DataError(
                f"{row.where}: {history_col!r} must be a list of [user, assistant] pairs, "
                f"got {type(history).__name__}"
            )
        for j, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(x, str) for x in pair)):
                raise DataError(
                    f"{row.where}: {history_col}[{j}] must be a pair of strings "
                    f"[user, assistant], got {pair!r:.80}"
                )
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    messages += [Message("user", user), Message("assistant", response)]
    system = _text(row, spec.column("system"), required=False, role="system") or None
    return Conversation(tuple(messages), system=system, origin=row.where)


def _text(row: Row, column: str | None, *, required: bool, role: str) -> str:
    if column is None:
        if required:
            raise DataError(f"{row.where}: no column is mapped to {role!r} in dataset_info.json")
        return ""
    if column not in row.data or row.data[column] is None:
        if not required:
            return ""
        have = ", ".join(sorted(row.data)) or "none"
        raise DataError(
            f"{row.where}: column {column!r} ({role}) is missing; the row has: {have}. "
            f"Fix the row or map columns.{role} in dataset_info.json"
        )
    value = row.data[column]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: column {column!r} must be a string, got {type(value).__name__}")
    if required and role == "response" and not value.strip():
        raise DataError(f"{row.where}: column {column!r} ({role}) is empty; there is nothing to train on")
    return value
