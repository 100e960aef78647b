"""Whole batches of replies (predict), one greedy answer (the demo), and the small helpers
the engine, rollouts and scoring share (left padding, stop tokens)."""

from __future__ import annotations

from typing import Any

from lathe.config.schema import GenerateConfig
from lathe.data.templates import Template


def answer(model: Any, tokenizer: Any, template: Template, query: str,
           history: list[tuple[str, str]] | None = None, system: str | None = None,
           max_new_tokens: int = 64) -> str:
    """Greedy reply to `query`, stopping at the template's stop tokens."""
    from lathe.infer.engine import Sampling, Sequence, decode

    ids = template.encode_prompt(history or [], query, tokenizer, system=system)
    seq = Sequence(ids, Sampling(max_tokens=max_new_tokens))
    decode(model, tokenizer, [seq], template.stop_token_ids(tokenizer))
    return seq.text


def generate_replies(model: Any, tokenizer: Any, prompts: list[list[int]], gen: GenerateConfig,
                     stop_ids: list[int], batch_size: int, progress: bool = True) -> list[list[int]]:
    """The reply ids to each prompt, cut before the first stop token, in the prompts' order
    (predict_with_generate). The engine's batches: rows of similar length, padded on the
    LEFT, so every row ends where its reply starts and `generate` derives each row's
    positions from the attention mask; a padded row gets the same tokens as the row
    generated alone. Sampling draws each row's seed from torch's generator, so
    `torch.manual_seed` makes the replies repeat."""
    from lathe.infer.engine import Sampling, Sequence, generate

    sampling = Sampling.from_generate(gen, strip=False, text=False)
    seqs = [Sequence(list(p), sampling) for p in prompts]
    generate(model, tokenizer, seqs, stop_ids, batch_size, progress=progress)
    return [s.tokens for s in seqs]


def generation_one_at_a_time(model: Any) -> str | None:
    """Why `model` must generate row by row (peft cannot left-pad its virtual tokens), or None."""
    from lathe.model.methods.prompt_learning import padded_generation_fails

    return padded_generation_fails(model)


def generation_kwargs(gen: GenerateConfig, stop_ids: list[int], pad_id: int) -> dict[str, Any]:
    """`generate` keyword arguments from the generate keys; sampling knobs only when sampling
    (transformers warns about them otherwise). They override the checkpoint's own
    generation_config."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=gen.max_new_tokens,
        do_sample=gen.do_sample,
        num_beams=gen.num_beams,
        repetition_penalty=gen.repetition_penalty,
        eos_token_id=list(stop_ids) or None,
        pad_token_id=pad_id,
    )
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)  # top_k 0: off
    return kwargs


def set_stop_tokens(model: Any, stop_ids: list[int]) -> None:
    """Saved generation_config.json stops at the template's stop words, not only at eos
    (what every stage and the export save with the weights)."""
    gen = getattr(model, "generation_config", None)
    if gen is not None and stop_ids:
        gen.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """Everything before the first stop token (what follows it is padding)."""
    stops = set(stop_ids)
    return next((ids[:k] for k, t in enumerate(ids) if t in stops), ids)


def left_pad(rows: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """(input_ids, attention_mask) with every row ending at the right edge: the next token
    of each row is then predicted at the last position (generation, scoring, rollouts)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        if r:
            ids[k, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[k, width - len(r):] = 1
    return ids.to(device), mask.to(device)
