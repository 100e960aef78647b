"""Show people what the model is trained on."""

from __future__ import annotations

from typing import Any

from lathe.data.processors import IGNORE_INDEX

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def mark_trained(input_ids: list[int], labels: list[int], tokenizer: Any, color: bool) -> str:
    """Decode an example; trained spans are green (colour) or wrapped in [[ ]] (plain)."""
    parts: list[str] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            trained = labels[start] != IGNORE_INDEX
            if color:
                parts.append(f"{GREEN if trained else DIM}{text}{RESET}")
            else:
                parts.append(f"[[{text}]]" if trained else text)
            start = i
    return "".join(parts)
