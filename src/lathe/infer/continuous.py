"""Continuous batching: replies join and leave a running batch between decoding steps.

`decode` (engine.py) runs a fixed batch through `generate` until its last row ends, so a
request that arrives meanwhile waits for the whole batch. Here the server keeps one running
batch instead: a new request is prefilled on its own (its prompt in one forward pass) and its
key/value cache is merged into the batch's, left-padded to a common length, so from the next
step on it decodes together with the others; a row that ends leaves at once and its slot is
free. Every row keeps its own settings, seed, stop strings, stream and cancellation: the
token is chosen and the row advanced by the same `_RowSampler` and `_RowStopper` as in
`decode`, so a reply is token for token the one `decode` gives.

This needs a plain key/value cache (transformers' DynamicCache of DynamicLayers: Llama,
Qwen2, Mistral, GPT-2, ... and their LoRA / QLoRA adapters). Models with sliding-window,
linear-attention or other cache layers, encoder-decoders and prompt-learning adapters (whose
virtual tokens cannot be left-padded) are decoded in waves by `decode` instead
(`continuous_blocker` says why). The cache is read and rebuilt through DynamicCache's public
constructor and `batch_select_indices`; no transformers code is changed.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from lathe.infer.engine import Sequence, _RowSampler, _RowStopper, start


def continuous_blocker(model: Any, tokenizer: Any) -> str | None:
    """Why `model` cannot decode with rows joining mid-way (None: it can)."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from lathe.infer.batch import generation_one_at_a_time

    if getattr(model.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    why = generation_one_at_a_time(model)
    if why:
        return why
    probe = torch.tensor([[tokenizer.eos_token_id or 0] * 2], device=model.device)
    try:
        with torch.no_grad():
            cache = _forward(model, DynamicCache(), input_ids=probe, attention_mask=torch.ones_like(probe))[1]
    except Exception as e:  # noqa: BLE001 - any failure: decode in waves, which generate handles
        return f"its forward pass does not take a DynamicCache ({type(e).__name__})"
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return "its cache is not a plain key/value cache (sliding window or linear attention layers)"
    return None


class RunningBatch:
    """The rows being decoded, their cache, attention mask, next input token and position."""

    def __init__(self, model: Any, tokenizer: Any, stop_ids: list[int]) -> None:
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, list(stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
        self.seqs: list[Sequence] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, cached tokens], 0 for left padding
        self.next: Any = None  # [rows] the token each row feeds next
        self.pos: Any = None  # [rows] its position
        self.vocab = 0

    def __len__(self) -> int:
        return len(self.seqs)

    def _choose(self, seqs: list[Sequence], logits: Any) -> Any:
        chosen = _RowSampler(seqs, self.tokenizer, self.vocab)(None, logits).argmax(dim=-1)
        _RowStopper(seqs, self.tokenizer, self.stop_ids)(chosen[:, None], None)
        return chosen

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` and merge them into the batch (each has its first token then)."""
        import torch
        from transformers import DynamicCache

        from lathe.infer.batch import left_pad

        seqs = start(seqs, self.tokenizer, self.stop_ids)
        if not seqs:
            return
        ids, mask = left_pad([s.prompt for s in seqs], self.pad_id, self.model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits, new = _forward(self.model, DynamicCache(), input_ids=ids, attention_mask=mask,
                                   position_ids=positions)
        chosen = self._choose(seqs, logits[:, -1].float())
        cache = [(layer.keys, layer.values) for layer in new.layers]
        if not self.seqs:
            self.seqs, self.mask, self.next, self.pos = seqs, mask, chosen, mask.sum(-1)
            self.cache = DynamicCache(ddp_cache_data=cache)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        mine = [(layer.keys, layer.values) for layer in self.cache.layers]
        merged = [(torch.cat([_left(k1, width), _left(k2, width)]), torch.cat([_left(v1, width), _left(v2, width)]))
                  for (k1, v1), (k2, v2) in zip(mine, cache)]
        self.cache = DynamicCache(ddp_cache_data=merged)
        self.mask = torch.cat([_left_mask(self.mask, width), _left_mask(mask, width)])
        self.next = torch.cat([self.next, chosen])
        self.pos = torch.cat([self.pos, mask.sum(-1)])
        self.seqs = self.seqs + seqs

    def step(self) -> None:
        """One token for every row."""
        import torch

        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        with torch.no_grad():
            logits, self.cache = _forward(self.model, self.cache, input_ids=self.next[:, None], attention_mask=mask,
                                          position_ids=self.pos[:, None])
        self.mask = mask
        self.next = self._choose(self.seqs, logits[:, -1].float())
        self.pos = self.pos + 1

    def prune(self) -> list[Sequence]:
        """Take the finished rows out (returned); drop cache columns no row attends to any more."""
        import torch
        from transformers import DynamicCache

        done = [s for s in self.seqs if s.done]
        if not done:
            return []
        keep = [i for i, s in enumerate(self.seqs) if not s.done]
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.next = self.pos = None
            return done
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next, self.pos = self.mask[index], self.next[index], self.pos[index]
        start = int(self.mask.any(dim=0).float().argmax())  # the first column some row still attends to
        if start > 0:
            self.cache = DynamicCache(ddp_cache_data=[(layer.keys[:, :, start:], layer.values[:, :, start:])
                                                     for layer in self.cache.layers])
            self.mask = self.mask[:, start:]
        return done


def _forward(model: Any, cache: Any, **inputs: Any) -> tuple[Any, Any]:
    """(logits, cache) of one forward pass; the cache argument is `cache` in recent transformers
    (`past_key_values` before), for the model itself or under a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = _cache_argument(type(base))
    out = model(**inputs, **{name: cache}, use_cache=True)
    return out.logits, out[name] if name in out else out.past_key_values


@functools.cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _left(t: Any, width: int) -> Any:
    """[rows, heads, length, dim] padded with zeros on the left to `width`."""
    import torch

    missing = width - t.shape[-2]
    if missing <= 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], missing, t.shape[-1]), t], dim=-2)


def _left_mask(m: Any, width: int) -> Any:
    import torch

    missing = width - m.shape[1]
    return m if missing <= 0 else torch.cat([m.new_zeros(m.shape[0], missing), m], dim=1)
