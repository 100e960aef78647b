"""Generation with a chat template: the same template object that training used."""

from __future__ import annotations

from typing import Any

from lathe.data.templates import Template


def answer(model: Any, tokenizer: Any, template: Template, query: str,
           history: list[tuple[str, str]] | None = None, system: str | None = None,
           max_new_tokens: int = 64) -> str:
    """Greedy reply to `query`, stopping at the template's stop tokens."""
    import torch

    ids = template.encode_prompt(history or [], query, tokenizer, system=system)
    input_ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=template.stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
