"""Which layers a scheme quantizes, and the swap of each for its quantized form.

A scheme (`SCHEMES`) names the layer kind its Linear layers become; embedding tables become
int8 rows under every scheme unless `quantize_embeddings: false`. Layers named in
`quantization_skip_modules`, or kept by the sensitivity scan, stay in float: that is mixed
precision. A layer shared under several names (T5's `shared` and its encoder's and decoder's
`embed_tokens`, one module or three holding one tied weight) is quantized once, and every
name points to the one quantized layer.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from torch import nn

from lathe.model.quant.modules import (
    DynamicInt8Linear,
    Int8Embedding,
    QuantLayer,
    StaticInt8Linear,
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
)


@dataclass(frozen=True)
class Scheme:
    name: str
    linear: type[QuantLayer]
    summary: str
    calibrated: bool = False  # activations need ranges from calibration rows
    engine: bool = False  # runs on torch's quantized engine (fbgemm / x86)


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("int8_dynamic", DynamicInt8Linear, "int8 weights; activations quantized to int8 on every call from their "
           "own range (no data needed)", engine=True),
    Scheme("int8_static", StaticInt8Linear, "int8 weights and activations; activation ranges calibrated on "
           "calibration_samples rows of calibration_dataset", calibrated=True, engine=True),
    Scheme("int8_weight_only", WeightOnlyInt8Linear, "int8 weights dequantized for float matmuls: a quarter of the "
           "size, float-speed maths"),
    Scheme("int4_weight_only", WeightOnlyInt4Linear, "4-bit weights in groups of quantization_group_size (a float16 "
           "scale and zero each), dequantized for float matmuls"),
)}


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed Linear


def matches(name: str, pattern: str) -> bool:
    """`classifier`, `lm_head`, `layer.0.attention` or a glob (`*.mlp.*`) names `name` when it
    is the whole name, a dotted tail of it, a dotted run inside it, or a glob match."""
    return (name == pattern or fnmatch.fnmatchcase(name, pattern) or name.endswith("." + pattern)
            or f".{pattern}." in f".{name}.")


def identity(module: nn.Module) -> int:
    """What makes two names one layer: the module itself, or for embedding tables the weight they
    share (transformers 5 gives T5's shared / encoder / decoder tables one tied weight)."""
    return id(module.weight) if isinstance(module, nn.Embedding) else id(module)


def aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name each layer is reachable under (identity -> names, the first one canonical)."""
    found: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and name not in found.get(identity(module), []):
            found.setdefault(identity(module), []).append(name)
    return found


def candidates(model: nn.Module, scheme: Scheme, embeddings: bool, group_size: int) -> tuple[list[str], list[str]]:
    """(names the scheme can quantize, names it cannot and why, as 'name: why')."""
    names, cannot = [], []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if identity(module) in seen:
            continue
        seen.add(identity(module))
        if is_linear(module):
            w = module.weight
            if scheme.linear is WeightOnlyInt4Linear and w.shape[-1 if type(module).__name__ != "Conv1D" else 0] \
                    % group_size:
                cannot.append(f"{name}: its {w.shape} weight does not split into groups of {group_size}")
                continue
            names.append(name)
        elif embeddings and isinstance(module, nn.Embedding):
            names.append(name)
    return names, cannot


def skipped(names: list[str], patterns: list[str]) -> list[str]:
    return [n for n in names if any(matches(n, p) for p in patterns)]


def quantize_layer(module: nn.Module, scheme: Scheme, *, ranges: dict[str, Any] | None = None,
                   group_size: int = 32) -> QuantLayer:
    if isinstance(module, nn.Embedding):
        return Int8Embedding.from_float(module)
    return scheme.linear.from_float(module, ranges=ranges, group_size=group_size)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def swap(model: nn.Module, names: list[str], scheme: Scheme, *, ranges: dict[str, dict] | None = None,
         group_size: int = 32) -> dict[str, dict[str, Any]]:
    """Replace every layer of `names` (in place) by its quantized form; returns the layout
    quantization.json records: name -> kind, the other names it is reachable under, and what
    rebuilding it needs."""
    names_of = aliases(model)
    layout: dict[str, dict[str, Any]] = {}
    for name in names:
        module = model.get_submodule(name)
        q = quantize_layer(module, scheme, ranges=(ranges or {}).get(name), group_size=group_size)
        every = names_of.get(identity(module), [name])
        for alias in every:
            set_module(model, alias, q)
        entry: dict[str, Any] = {"kind": q.kind, "aliases": [a for a in every if a != name]}
        if isinstance(q, WeightOnlyInt4Linear):
            entry["group_size"] = q.group_size
        if isinstance(q, Int8Embedding) and q.padding_idx is not None:
            entry["padding_idx"] = q.padding_idx
        layout[name] = entry
    return layout
