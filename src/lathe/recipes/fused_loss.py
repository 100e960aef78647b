"""The language-model loss without the batch's logits: the output projection and the
cross-entropy fused, a chunk of rows at a time.

In small-model fine-tuning the logits are the largest tensor of a step (tokens x vocabulary, in
float32 for the loss, and as much again for their gradient). `linear_cross_entropy` takes the
final hidden states of the trained positions and the output layer's weight, and computes the
summed cross-entropy `rows` at a time; the gradients of the hidden states and of the weight are
computed in the same pass (softmax minus the one-hot target, times the weight / the hidden
states), so at most one chunk of logits exists at any moment and the backward pass only scales
what was kept. The same idea as Liger's fused linear cross-entropy, written here in plain torch
(no GPU kernel needed).

`FusedLossTrainer` uses it for the causal-LM stages: the model runs as usual (through DDP or any
wrapper) but is asked for no logits (`logits_to_keep`, a boolean mask that keeps none) and for
its hidden states, whose last entry is what the output layer reads; only positions whose next
token is trained are projected. A probe at the start compares this loss with the model's own on
a small batch and turns the fusion off (with a note) for a model where they differ (a logit
scale or soft-capping after the projection, a LoRA on the output layer, sharded weights).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.utils.parametrize
from transformers import Trainer

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MB in float32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                rows: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        w = weight.float()
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].float()
            t = targets[start:start + rows]
            logits = h @ w.t()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = torch.exp(logits - lse[:, None], out=logits)  # d loss / d logits = softmax - one-hot
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_hidden[start:start + rows] = (probs @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += probs.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype, ctx.has_weight_grad = weight.dtype, grad_weight is not None
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return grad_hidden * grad_output.to(grad_hidden.dtype), gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows: int | None = None) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight.T, targets[i]) in float32, `rows` rows of logits at a time
    (default: about 8M logits per chunk)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # no trained token: a zero that keeps the graph
    rows = rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, rows)


class _LinearLogProbs(torch.autograd.Function):
    """Per-token log-probabilities of `targets` under softmax(hidden @ weight.T), a chunk of rows
    at a time. Their gradients depend on the coefficient of each token (a preference loss weighs
    each sequence differently), so the backward pass recomputes each chunk's logits instead of
    keeping them: at most one chunk exists at any moment, for one more matrix product."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                rows: int) -> torch.Tensor:
        w = weight.float()
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            logits = hidden[start:start + rows].float() @ w.t()
            t = targets[start:start + rows]
            out[start:start + rows] = logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, targets = ctx.saved_tensors
        w = weight.float()
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.rows):
            h = hidden[start:start + ctx.rows].float()
            t = targets[start:start + ctx.rows]
            g = grad[start:start + ctx.rows].float()
            logits = h @ w.t()
            # d logp / d logits = one-hot(target) - softmax; times each token's coefficient
            coef = torch.softmax(logits, dim=-1, out=logits).mul_(-g[:, None])
            coef[torch.arange(t.shape[0], device=t.device), t] += g
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.rows] = (coef @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += coef.t() @ h
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    rows: int | None = None) -> torch.Tensor:
    """log softmax(hidden[i] @ weight.T)[targets[i]] for every row i, in float32, without the
    logits of all rows at once (default: about 8M logits per chunk)."""
    rows = rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _LinearLogProbs.apply(hidden, weight, targets, rows)


def output_layer(model: Any) -> torch.nn.Linear | None:
    """The plain Linear output layer without bias the fusion can read, or None."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP and the like
        inner = inner.module
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None  # a LoRA-wrapped or quantized head, or one with a bias: the model's own loss
    if head._forward_hooks or head._forward_pre_hooks or torch.nn.utils.parametrize.is_parametrized(head):
        return None  # something runs around the layer (quantization-aware training): reading its weight skips it
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3: the weight is a shard outside the forward
        return None
    return head


def fused_lm_loss(model: Any, inputs: dict[str, Any], head: torch.nn.Linear,
                  num_items_in_batch: Any = None, rows: int | None = None) -> torch.Tensor:
    """The causal-LM loss of `inputs` (with labels) as the model computes it: the summed
    cross-entropy of each trained next token over num_items_in_batch (else the count)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep = labels[..., 1:] != IGNORE_INDEX
    none = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    out = model(**inputs, logits_to_keep=none, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, :-1][keep]
    total = linear_cross_entropy(hidden, head.weight, labels[..., 1:][keep], rows)
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


def probe(model: Any, head: torch.nn.Linear, vocab_size: int) -> float | None:
    """The relative difference between the fused loss and the model's own on a small batch with
    a padded row (None: the model cannot be asked for no logits, or the difference is larger
    than float32 rounding, 1e-4)."""
    gen = torch.Generator().manual_seed(0)
    device = head.weight.device
    ids = torch.randint(0, vocab_size, (2, 12), generator=gen).to(device)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}
    from lathe.data.packing import probing

    try:
        with probing(model), torch.no_grad():
            own = model(**batch).loss.float().item()
            fused = fused_lm_loss(model, batch, head).item()
    except Exception:  # noqa: BLE001 - a model that cannot do it keeps its own loss
        return None
    diff = abs(own - fused) / max(abs(own), 1e-6)
    return diff if diff <= 1e-4 else None


class FusedLossTrainer(Trainer):
    """The stock Trainer for pt and sft, whose training loss is `fused_lm_loss` (evaluation and
    anything with label smoothing or a custom loss: the model's own)."""

    def __init__(self, *args: Any, fused_head: torch.nn.Linear, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fused_head = fused_head

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        head = self.fused_head
        if return_outputs or not model.training or self.label_smoother is not None \
                or self.compute_loss_func is not None or "labels" not in inputs \
                or head._forward_hooks or head._forward_pre_hooks:  # hooks added since (they would be skipped)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = fused_lm_loss(model, inputs, self.fused_head, num_items_in_batch)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs \
                and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as the stock compute_loss does
        return loss
