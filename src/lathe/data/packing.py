"""Sample packing: several tokenized examples share one row of at most cutoff_len tokens.

Examples are put into rows by first-fit decreasing. Inside a row, `position_ids`
restart at 0 for every example and the label of each example's first token is
-100, so no example learns to predict its first token from the one before it
(the unpacked forward never predicts it either).

Attention never crosses an example boundary; transformers itself enforces it:
when a batch has `position_ids` and *no* `attention_mask` (and no cache), the
masks in `transformers.masking_utils` (sdpa, eager, flex) split each row where the
position ids restart and build a block-diagonal causal mask, and the flash
attention paths turn restarting position ids of a single flattened row into
varlen `cu_seqlens`. The collator below therefore sends `position_ids`, never an
attention mask, `use_cache=False` (a cache switches the detection off), and
flattens the batch into one row for flash attention. Whether a given model
honours this is not assumed: `check_packing_support` runs a tiny packed forward
and compares it with the unpacked one, and refuses the model if they differ.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from lathe.data.collators import PAD_MULTIPLE
from lathe.data.processors import IGNORE_INDEX
from lathe.errors import ConfigError

# --- putting examples into rows ---------------------------------------------------------

def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, longest first, each bin's lengths summing to <= capacity.

    Each example goes into the first bin (in order of opening) that still has room,
    examples taken longest first. A max-tree over the bins' free space finds that
    bin in O(log n), so a million examples pack in seconds.
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    over = [i for i, n in enumerate(lengths) if n > capacity]
    if over:
        raise ValueError(f"{len(over)} example(s) are longer than the capacity {capacity} "
                         f"(index {over[0]}: {lengths[over[0]]} tokens)")
    n = len(lengths)
    size = 1
    while size < n:
        size *= 2
    free = [capacity] * (2 * size)  # leaves: free space of bin slot k; inner nodes: max of children
    bins: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        node = 1
        while node < size:  # leftmost slot with enough room: an open bin, or the next empty one
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        slot = node - size
        if slot == len(bins):
            bins.append([])
        bins[slot].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def padding_fraction(lengths: list[int], batch_size: int, packed: bool = False,
                     capacity: int | None = None, multiple_of: int = 1, shuffles: int = 8) -> float:
    """Share of the tokens in padded batches that are padding.

    Rows are the examples themselves, or (packed) the first-fit-decreasing bins of
    `capacity`. Like the trainer, rows are shuffled before batching; each batch is
    padded to its longest row, rounded up to `multiple_of`. The result is the mean
    over a few seeded shuffles, so it is an estimate that does not change run to run.
    """
    if packed:
        if capacity is None:
            raise ValueError("packed=True needs the row capacity")
        rows = [sum(lengths[i] for i in b) for b in first_fit_decreasing(lengths, capacity)]
    else:
        rows = list(lengths)
    return _mean_padding(rows, batch_size, shuffles,
                         lambda batch: -(-max(batch) // multiple_of) * multiple_of * len(batch))


def _mean_padding(rows: list[int], batch_size: int, shuffles: int, padded_size: Any) -> float:
    """The padding share of `rows` (lengths) shuffled as the trainer does, batched by
    `batch_size`, each batch taking padded_size(its lengths) tokens; the mean over seeded shuffles."""
    if not rows or batch_size <= 0:
        return 0.0
    fractions = []
    for seed in range(shuffles):
        order = rows[:]
        random.Random(seed).shuffle(order)
        padded = sum(padded_size(order[start:start + batch_size]) for start in range(0, len(order), batch_size))
        fractions.append(1 - sum(rows) / padded if padded else 0.0)
    return sum(fractions) / len(fractions)


def pack_row(examples: list[tuple[list[int], list[int]]]) -> dict[str, list[int]]:
    """(input_ids, labels) pairs -> one packed row with restarting position_ids."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels in examples:
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] + list(labels[1:])  # never predicted across a boundary
        row["position_ids"] += range(len(ids))
    return row


def pack_dataset(ds: Any, capacity: int) -> Any:
    """A tokenized datasets.Dataset -> packed rows of at most `capacity` tokens.

    The result has input_ids, labels and position_ids (no attention_mask: the
    boundaries live in the position ids).
    """
    from datasets import Dataset

    cols = ds.select_columns(["input_ids", "labels"]).to_dict()
    bins = first_fit_decreasing([len(x) for x in cols["input_ids"]], capacity)
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for b in bins:
        row = pack_row([(cols["input_ids"][i], cols["labels"][i]) for i in b])
        for key in rows:
            rows[key].append(row[key])
    return Dataset.from_dict(rows)


# --- batching packed rows ----------------------------------------------------------------

@dataclass
class PackedCollator:
    """Packed rows -> a batch with position_ids and deliberately no attention_mask.

    `flatten=False` (sdpa, eager, flex): rows are right-padded to a common width; the
    padding gets its own restarting position ids (a separate, untrained segment) and
    label -100. `flatten=True` (flash attention, which only reads packing from a
    single row): the rows are concatenated into one row with no padding at all.
    """

    pad_token_id: int
    flatten: bool = False
    pad_to_multiple_of: int = PAD_MULTIPLE

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        keys = ("input_ids", "labels", "position_ids")
        rows = [{k: list(f[k]) for k in keys} for f in features]
        if self.flatten:
            rows = [{k: [t for r in rows for t in r[k]] for k in keys}]
        else:
            width = max(len(r["input_ids"]) for r in rows)
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            for r in rows:
                n = width - len(r["input_ids"])
                r["input_ids"] += [self.pad_token_id] * n
                r["labels"] += [IGNORE_INDEX] * n
                r["position_ids"] += range(n)
        batch: dict[str, Any] = {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in keys}
        batch["use_cache"] = False  # with a cache, transformers ignores the packing in position_ids
        return batch


# Lathe's variable-length attention over sdpa, as lathe.model.varlen registers it (the same string:
# the data layer does not import the model layer): like FlashAttention's varlen kernels, it reads
# the examples' boundaries from the restarting position ids of a single row
VARLEN_SDPA = "lathe_sdpa_varlen"


def make_collator(model: Any, tokenizer: Any) -> PackedCollator:
    """The packed collator that fits the model's attention implementation: one row for varlen
    kernels (FlashAttention, VARLEN_SDPA), padded rows for the others."""
    from transformers.utils.generic import is_flash_attention_requested

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    varlen = getattr(model.config, "_attn_implementation", None) == VARLEN_SDPA
    return PackedCollator(pad_token_id=pad, flatten=varlen or is_flash_attention_requested(model.config))


@dataclass
class PaddingFreeCollator:
    """The examples of a batch, unpacked rows as the padded collator gets them, batched without
    padding: the same examples per step, the same trained tokens (each example's first token is
    never predicted, padded or not), and the boundaries in restarting position ids as packing
    has them.

    `flatten=True` (varlen attention: FlashAttention's kernels, or Lathe's VARLEN_SDPA): one row
    of every example, no padding at all. Otherwise (eager, or sdpa where VARLEN_SDPA does not
    apply) the examples are put side by side in rows no longer than the batch's longest example
    (first-fit decreasing), padded to the longest row. Those kernels compute a row's attention
    over all of its tokens under a block-diagonal mask, so a row is never made longer than the
    padded batch's rows: measured on CPU (LoRA, 27M Llama, batch 4, cutoff 512), rows of up to 512
    tokens trained 1.15x as fast as padding, rows of the longest example 1.27x, one row of the
    whole batch 0.91x under the mask and 1.75x under VARLEN_SDPA. `capacity` (tests) sets another
    row length."""

    pad_token_id: int
    flatten: bool = False
    capacity: int | None = None
    pad_to_multiple_of: int = PAD_MULTIPLE

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [(list(f["input_ids"]), list(f["labels"])) for f in features]
        if self.flatten:
            groups = [examples]
        else:
            lengths = [len(ids) for ids, _ in examples]
            bins = first_fit_decreasing(lengths, max(self.capacity or 0, max(lengths)))
            groups = [[examples[i] for i in sorted(b)] for b in bins]
        rows = [pack_row(g) for g in groups]
        return PackedCollator(self.pad_token_id, flatten=self.flatten,
                              pad_to_multiple_of=self.pad_to_multiple_of)(rows)


@dataclass
class PaddingFreePairCollator:
    """dpo's pairs without padding: the chosen replies of a batch side by side in rows no longer
    than the batch's longest sequence, then the rejected ones in rows of their own (so each side
    can go forward and backward alone), every row padded to the longest. `seq_index` says which
    sequence each token belongs to (chosen i: i, rejected i: batch + i, padding: -1), so the
    log-probs are summed per sequence as the padded batch sums them per row; `chosen_rows`: how
    many rows the chosen side fills. `flatten=True` (VARLEN_SDPA, which cuts every row at its
    restarts): each side in one row. Not for FlashAttention, whose varlen kernels read the
    boundaries from a single row only (the recipe keeps padded pairs there)."""

    pad_token_id: int
    labels: bool = True  # rm scores whole sequences: no labels in its batches
    pad_to_multiple_of: int = PAD_MULTIPLE
    flatten: bool = False
    sides: tuple[str, str] = ("chosen_", "rejected_")  # the prefixes of each side's columns

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = len(features)
        sides = [[(list(f[f"{side}input_ids"]), list(f.get(f"{side}labels") or f[f"{side}input_ids"]))
                  for f in features] for side in self.sides]
        capacity = max(sum(len(ids) for ids, _ in side) if self.flatten else max(len(ids) for ids, _ in side)
                       for side in sides)
        rows: list[dict[str, list[int]]] = []
        chosen_rows = 0
        for offset, examples in ((0, sides[0]), (n, sides[1])):
            for b in first_fit_decreasing([len(ids) for ids, _ in examples], capacity):
                order = sorted(b)
                row = pack_row([examples[i] for i in order])
                row["seq_index"] = [offset + i for i in order for _ in examples[i][0]]
                rows.append(row)
            chosen_rows = chosen_rows or len(rows)
        width = max(len(r["input_ids"]) for r in rows)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        for r in rows:
            pad = width - len(r["input_ids"])
            r["input_ids"] += [self.pad_token_id] * pad
            r["labels"] += [IGNORE_INDEX] * pad
            r["position_ids"] += range(pad)
            r["seq_index"] += [-1] * pad
        keys = ("input_ids", "labels", "position_ids", "seq_index") if self.labels else \
            ("input_ids", "position_ids", "seq_index")
        batch: dict[str, Any] = {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in keys}
        batch["chosen_rows"] = chosen_rows
        return batch


@dataclass
class PaddingFreeKTOCollator(PaddingFreePairCollator):
    """kto's rows without padding: the batch's rows (sequences 0..n-1) as the chosen side of
    PaddingFreePairCollator, their mismatched KL rows (n..2n-1) as the other, and `kto_tag`."""

    sides: tuple[str, str] = ("", "kl_")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = super().__call__(features)
        batch["kto_tag"] = torch.tensor([bool(f["kto_tag"]) for f in features])
        return batch


def pair_padding(chosen: list[int], rejected: list[int], batch_size: int, shuffles: int = 8,
                 flatten: bool = False) -> tuple[float, float]:
    """The padding share of dpo's padded pair batches (every row as long as the longest of either
    side) and of PaddingFreePairCollator's (`flatten`: one row a side), over seeded shuffles of
    the pairs."""
    if not chosen or batch_size <= 0:
        return 0.0, 0.0
    tokens = sum(chosen) + sum(rejected)
    before, after = [], []
    for seed in range(shuffles):
        order = list(range(len(chosen)))
        random.Random(seed).shuffle(order)
        padded = free = 0
        for start in range(0, len(order), batch_size):
            c = [chosen[i] for i in order[start:start + batch_size]]
            r = [rejected[i] for i in order[start:start + batch_size]]
            longest = max(c + r)
            width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
            padded += 2 * len(c) * width
            capacity = max(sum(c), sum(r)) if flatten else longest
            cb, rb = first_fit_decreasing(c, capacity), first_fit_decreasing(r, capacity)
            row = max([sum(c[i] for i in b) for b in cb] + [sum(r[i] for i in b) for b in rb])
            free += (len(cb) + len(rb)) * (-(-row // PAD_MULTIPLE) * PAD_MULTIPLE)
        before.append(1 - tokens / padded)
        after.append(1 - tokens / free)
    return sum(before) / shuffles, sum(after) / shuffles


def padding_free_fraction(lengths: list[int], batch_size: int, capacity: int | None = None,
                          multiple_of: int = PAD_MULTIPLE, shuffles: int = 8) -> float:
    """Share of padding in PaddingFreeCollator's batches (not flattened), estimated as
    `padding_fraction` does: seeded shuffles, batches of `batch_size` examples."""
    def padded_size(batch: list[int]) -> int:
        bins = first_fit_decreasing(batch, max(capacity or 0, max(batch)))
        width = max(sum(batch[i] for i in b) for b in bins)
        return -(-width // multiple_of) * multiple_of * len(bins)

    return _mean_padding(list(lengths), batch_size, shuffles, padded_size)


# --- does this model honour the boundaries? ------------------------------------------------

@contextlib.contextmanager
def probing(model: Any) -> Iterator[None]:
    """A probe's forward passes: in eval mode (no dropout), and the model left as it was found.
    A bitsandbytes-quantized model stays in training mode with dropout off instead: on CPU its
    4-bit layers repack their weights for inference at the first eval-mode forward, after which
    training computes other numbers (the saved adapter then no longer matched the model that
    trained it)."""
    import torch

    was_training = model.training
    quantized = getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0] if quantized else []
    rates = [m.p for m in dropouts]
    if quantized:
        for m in dropouts:
            m.p = 0.0
        model.train()  # a model fresh from from_pretrained is in eval mode
    else:
        model.eval()
    try:
        yield
    finally:
        for m, p in zip(dropouts, rates):
            m.p = p
        model.train(was_training)


def check_packing_support(model: Any, collator: PackedCollator, key: str = "packing",
                          per_token: str = "logits") -> float:
    """Refuse (ConfigError) a model whose packed forward differs from the unpacked one.

    A tiny probe: examples a, a2 (same length as a), b, c; rows [a, b], [a2, b], [c].
    Every example's logits in the packed batch must match its own unpacked forward.
    `per_token="hidden"`: the final hidden states are compared instead (a model with a
    sequence-level head, such as a reward model, has no per-token logits).
    Returns the largest logit difference seen. In float32 they must agree to 1e-4 of
    the logit scale. In half precision, where rounding alone moves logits, the packed
    logits must be at least 10x closer to the unpacked ones than b's logits after a
    with no boundary (what attention across examples gives) are.
    """
    import torch

    impl = getattr(model.config, "_attn_implementation", None) or "default"
    name = type(model).__name__
    weight = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    embeddings = model.get_input_embeddings().weight
    vocab = getattr(embeddings, "ds_shape", embeddings.shape)[0]  # the full size under ZeRO-3
    a, a2, b, c = (torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 7, 5, 4))
    rows = [[a, b], [a2, b], [c]]
    batch = collator([pack_row([(s, s) for s in row]) for row in rows])
    batch.pop("labels")
    device = weight.device
    hidden = per_token == "hidden"

    def read(out: Any) -> Any:
        return (out.hidden_states[-1] if hidden else out.logits).float()

    try:
        with probing(model), torch.no_grad():
            packed = read(model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()},
                                **({"output_hidden_states": True} if hidden else {})))

            def alone(ids: list[int]) -> Any:
                out = model(input_ids=torch.tensor([ids], device=device), use_cache=False,
                            **({"output_hidden_states": True} if hidden else {}))
                return read(out)[0]

            ref = {id(s): alone(s) for s in (a, a2, b, c)}
            crossed = alone(a + b)[len(a):]  # b after a with no boundary
    except Exception as e:  # noqa: BLE001 - any failure means packing cannot be trusted
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise ConfigError(f"{key}: true, but a packed forward of {name} ({impl} attention) failed "
                          f"({type(e).__name__}: {why}); set {key}: false") from None

    flat = packed.reshape(-1, packed.shape[-1])
    width = 0 if collator.flatten else packed.shape[1]
    diff, at = 0.0, 0
    for r, row in enumerate(rows):
        at = at if collator.flatten else r * width
        for s in row:
            diff = max(diff, (flat[at:at + len(s)] - ref[id(s)]).abs().max().item())
            at += len(s)
    scale = max(1.0, max(t.abs().max().item() for t in ref.values()))
    cross = (crossed - ref[id(b)]).abs().max().item()
    exact = weight.dtype in (torch.float32, torch.float64)
    if diff <= 1e-4 * scale or (not exact and diff <= 0.1 * cross):
        return diff
    raise ConfigError(
        f"{key}: true, but {name} ({impl} attention) does not keep packed examples apart "
        f"(packed logits differ from unpacked ones by {diff:.3g}); set {key}: false"
    )


# --- the recipe's one call ------------------------------------------------------------------

def pack_for_training(data: Any, model: Any, tokenizer: Any, cutoff_len: int,
                      batch_size: int) -> tuple[Any, PackedCollator, str]:
    """Check the model, pack train (and eval) into rows of cutoff_len; returns the packed
    SplitData, the collator to train with, and a line for the start summary."""
    from datasets import Dataset

    if not isinstance(data.train, Dataset):
        raise ConfigError("packing: true needs the whole dataset to pack it; "
                          "set streaming: false or packing: false")
    collator = make_collator(model, tokenizer)
    check_packing_support(model, collator)
    lengths = [len(x) for x in data.train["input_ids"]]
    train = pack_dataset(data.train, cutoff_len)
    ev = pack_dataset(data.eval, cutoff_len) if data.eval is not None else None
    before = padding_fraction(lengths, batch_size, multiple_of=PAD_MULTIPLE)
    after = 0.0 if collator.flatten else padding_fraction(
        lengths, batch_size, packed=True, capacity=cutoff_len, multiple_of=PAD_MULTIPLE)
    note = (f"packing {len(lengths)} examples into {len(train)} rows of <= {cutoff_len} tokens; "
            f"padding {before:.1%} without packing, {after:.1%} with packing "
            f"(batch size {batch_size})")
    return replace(data, train=train, eval=ev), collator, note


def padding_free_pairs_for_training(data: Any, model: Any, tokenizer: Any, setting: bool | None,
                                    batch_size: int, labels: bool = True,
                                    kind: type[PaddingFreePairCollator] = PaddingFreePairCollator,
                                    ) -> tuple[PaddingFreePairCollator | None, str | None]:
    """dpo's, rm's and (`kind` PaddingFreeKTOCollator) kto's padding_free_for_training: the
    collator and a line for the summary, or (None, why not): a model whose attention would cross
    examples (the packing probe), or flash attention (its kernels read the boundaries of one row
    only)."""
    from datasets import Dataset

    packed = make_collator(model, tokenizer)
    varlen = getattr(model.config, "_attn_implementation", None) == VARLEN_SDPA
    why = "flash attention reads example boundaries from one row only, and a pair batch has two sides" \
        if packed.flatten and not varlen else None
    if why is None:
        try:
            check_packing_support(model, packed, key="padding_free", per_token="logits" if labels else "hidden")
        except ConfigError as e:
            why = str(e).split(", but ", 1)[-1].split("; set ")[0]
    if why is not None:
        if setting:
            raise ConfigError(f"padding_free: true, but {why}; set padding_free: false")
        return None, f"padding-free batches off: {why}"
    collator = kind(packed.pad_token_id, labels=labels, flatten=varlen)
    first, second = collator.sides
    what = "each side's replies" if first else "the rows, and apart their KL rows,"
    how = f"{what} in one row (varlen attention)" if varlen else f"{what} in rows no longer than the longest"
    if not isinstance(data.train, Dataset):
        return collator, f"padding-free batches: {how}"
    before, after = pair_padding([len(x) for x in data.train[f"{first}input_ids"]],
                                 [len(x) for x in data.train[f"{second}input_ids"]], batch_size, flatten=varlen)
    return collator, (f"padding-free batches: {how}; padding "
                      f"{before:.1%} of the tokens of padded {'pair' if first else 'row + KL row'} batches, "
                      f"{after:.1%} now (batch size {batch_size}, the same {'pairs' if first else 'rows'} per step)")


def padding_free_for_training(data: Any, model: Any, tokenizer: Any, setting: bool | None,
                              batch_size: int) -> tuple[PaddingFreeCollator | None, str | None]:
    """The collator for padding-free batches and a line for the start summary, or (None, why not)
    when `padding_free` is unset and the model's attention would cross examples (the packing
    probe); `padding_free: true` then stops the run with that line instead."""
    from datasets import Dataset

    packed = make_collator(model, tokenizer)
    try:
        check_packing_support(model, packed, key="padding_free")
    except ConfigError as e:
        if setting:
            raise
        return None, f"padding-free batches off: {str(e).split(', but ', 1)[-1].split('; set ')[0]}"
    collator = PaddingFreeCollator(packed.pad_token_id, flatten=packed.flatten)
    kind = "one row per batch (varlen attention)" if packed.flatten else "rows no longer than the longest example"
    if not isinstance(data.train, Dataset):
        return collator, f"padding-free batches: {kind}"
    lengths = [len(x) for x in data.train["input_ids"]]
    before = padding_fraction(lengths, batch_size, multiple_of=PAD_MULTIPLE)
    after = 0.0 if packed.flatten else padding_free_fraction(lengths, batch_size)
    return collator, (f"padding-free batches: {kind}; padding {before:.1%} of the tokens of padded batches, "
                      f"{after:.1%} now (batch size {batch_size}, the same examples per step)")
