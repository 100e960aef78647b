"""Variable-length attention over PyTorch's sdpa, for padding-free training where no FlashAttention
kernel is installed (CPU machines, GPUs without flash-attn).

A padding-free batch is one row of every example side by side, each example's position ids
restarting at 0. FlashAttention's varlen kernels read those boundaries and attend within each
example. sdpa has no varlen kernel: transformers gives it a block-diagonal mask over the whole row,
and its cost grows with the square of the row (measured on CPU: one row of the batch trained at
0.91x the padded speed, so the rows had to stay as short as the longest example, padded). Here
the row is cut at the restarts and each example goes through sdpa's causal kernel on its own
(no mask at all): attention costs the sum of the examples' squares, and the linear layers see no
padding.

Registered with transformers' public interfaces (AttentionInterface, AttentionMaskInterface) under
VARLEN_SDPA, never patched in. Everything that is not a padding-free training row (a padding mask,
a cache during generation, a query shorter than its keys) takes the plain sdpa path, with the mask
sdpa itself would get: the model computes exactly what sdpa computes there.
"""

from __future__ import annotations

from typing import Any

# the name it is registered under; lathe.data.packing holds the same string (the data layer does
# not import the model layer), and tests/unit/test_varlen.py checks that they agree
VARLEN_SDPA = "lathe_sdpa_varlen"


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """query (batch, heads, q, dim), key/value (batch, kv heads, kv, dim) -> ((batch, q, heads,
    dim), None), as transformers' sdpa_attention_forward returns them."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    q_len = query.shape[2]
    if attention_mask is not None or position_ids is None or q_len != key.shape[2] or q_len == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows = []
    for b in range(query.shape[0]):
        pos = position_ids[b if position_ids.shape[0] > 1 else 0]
        cuts = [0, *(torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist(), q_len]
        parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                        value[b:b + 1, :, s:e], None, dropout=dropout, scaling=scaling,
                                        is_causal=True, **kwargs)[0]
                 for s, e in zip(cuts, cuts[1:]) if e > s]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows)), None


def varlen_mask(**kwargs: Any) -> Any:
    """No mask for a training row (no padding mask, queries = keys from position 0): the attention
    cuts it at the restarts itself; else the mask sdpa gets."""
    from transformers.masking_utils import sdpa_mask

    attention_mask = kwargs.get("attention_mask")
    training_row = (kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("q_offset")
                    and not kwargs.get("kv_offset") and (attention_mask is None or bool(attention_mask.all())))
    return None if training_row else sdpa_mask(**kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_mask)


def use_varlen_sdpa(model: Any) -> str | None:
    """Switch `model` (a causal LM on sdpa, or a peft model over one) to VARLEN_SDPA for
    padding-free or packed training; the reason it stays on its own attention otherwise (None
    when switched). Sliding-window attention is not cut per example here, so such models stay."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    impl = getattr(config, "_attn_implementation", None)
    if impl == VARLEN_SDPA:
        return None
    if impl != "sdpa":
        return f"its attention is {impl}, not sdpa"
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if sliding or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "sliding-window attention"
    register()
    base.set_attn_implementation(VARLEN_SDPA)
    return None

