"""The quantized layers a quantized model is made of, and how each is stored.

Every layer keeps its integers in one documented layout, saved as plain tensors in
safetensors (`tensors()` / `from_tensors()`), whatever kernel runs it:

| kind | tensors | runs on |
| --- | --- | --- |
| `int8_dynamic` | `qweight` int8 [out, in], `wscale` [out], `bias` | torch's x86/fbgemm int8 GEMM |
| `int8_static` | + `act_scale`, `act_zero` (input, output; calibrated) | the same, int8 in and out |
| `int8_weight_only` | `qweight` int8 [out, in], `wscale` [out], `bias` | float matmul, dequantized per call |
| `int4_weight_only` | `qweight` uint8 [out, in/2], `wscale`, `wzero` fp16 [out, in/group] | the same |
| `int8_embedding` | `qweight` int8 [vocab, dim], `wscale` [vocab] | a row lookup, then its scale |

int8_dynamic quantizes activations per call from their own range; int4 packs two 4-bit
values per byte (low nibble first).

Why these kernels (measured on this project's CPU machines, AVX2 without VNNI, torch 2.13,
torchao 0.18; benchmarks/README.md): torchao's int8 layers run through `torch._int_mm`,
which has no fast kernel there (MiniLM at batch 32: 24x slower than float32, also under
torch.compile); its int4 CPU layout is gone in 0.18. torch's own fbgemm/x86 quantized
engine is the one int8 GEMM that is faster than float32 on such CPUs, so the int8 layers
run on it; `torch.ao.nn.quantized` (deprecated in favour of torchao, still in torch 2.13)
provides the modules, and the stored layout does not depend on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Activations of the int8 GEMM use 7 of their 8 bits: without VNNI (AVX2), the engine's
# 8x8-bit multiply-add saturates at 16 bits, and torch's own dynamic and static configs on
# x86 reduce the range the same way.
ACT_QMAX = 127


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The [out, in] float weight of a Linear, or of GPT-2's Conv1D (stored [in, out])."""
    w = layer.weight.detach()
    return w.t() if type(layer).__name__ == "Conv1D" else w


def per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q in [-127, 127], scale) with w ~ q * scale."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def grouped_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit in groups of `group_size` along each row: (q in [0, 15] as uint8 [out, in],
    scale, zero [out, in / group_size], float16 values) with w ~ q * scale + zero."""
    w = w.float()
    out, cols = w.shape
    g = w.view(out, cols // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-6).half().float()  # rounded as stored, so q fits the stored scale
    zero = lo.half().float()
    q = torch.round((g - zero[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(out, cols)
    return q, scale, zero


def per_tensor_affine(lo: float, hi: float, qmax: int = ACT_QMAX) -> tuple[float, int]:
    """(scale, zero point) mapping [lo, hi] (widened to hold 0) onto [0, qmax]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / qmax, 1e-8)
    zero = int(round(-lo / scale))
    return scale, max(0, min(qmax, zero))


class QuantLayer(nn.Module):
    """A quantized layer: `kind`, its stored tensors, and the float weight it stands for."""

    kind = ""

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> QuantLayer:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def _bias(layer: nn.Module) -> torch.Tensor | None:
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach().float().clone()


class _EngineLinear(QuantLayer):
    """int8 weights in the quantized engine's packed form (fbgemm or x86).

    `weight` (the int8 matrix) is unpacked on first use only: models such as T5 read a layer's
    `weight.dtype` to decide the input's dtype (int8 weights: left as they are)."""

    _weight_view: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        if self._weight_view is None:
            self._weight_view = self._unpacked()[0]
        return self._weight_view

    def _pack(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
        zeros = torch.zeros_like(scale, dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, bias)

    def _unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        qw, bias = torch.ops.quantized.linear_unpack(self.packed)
        return qw.int_repr().contiguous(), qw.q_per_channel_scales().float(), bias

    def dequantized(self) -> torch.Tensor:
        q, scale, _ = self._unpacked()
        return q.float() * scale[:, None]

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy: the packed weight is not picklable
        state = self.__dict__.copy()
        q, scale, bias = self._unpacked()
        state["packed"] = None
        state["_repack"] = (q, scale, bias)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        repack = state.pop("_repack", None)
        self.__dict__.update(state)
        if repack is not None:
            self.packed = self._pack(*repack)


class DynamicInt8Linear(_EngineLinear):
    """int8 weights, activations quantized per call from their own range (no calibration)."""

    kind = "int8_dynamic"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.packed = self._pack(q, scale, bias)

    @classmethod
    def from_float(cls, layer: nn.Module, **_: Any) -> DynamicInt8Linear:
        q, scale = per_channel_int8(weight_of(layer))
        return cls(q, scale, _bias(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = torch.ops.quantized.linear_dynamic(x.float(), self.packed, True)
        return y.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        q, scale, bias = self._unpacked()
        return {"qweight": q, "wscale": scale, **({"bias": bias} if bias is not None else {})}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> DynamicInt8Linear:
        return cls(t["qweight"], t["wscale"].float(), t.get("bias"))


class StaticInt8Linear(_EngineLinear):
    """int8 weights and int8 activations at calibrated scales: the input is quantized with the
    range calibration saw, the engine's GEMM writes int8 at the calibrated output range, and
    the result is dequantized for the float layers around it."""

    kind = "int8_static"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 in_qparams: tuple[float, int], out_qparams: tuple[float, int]) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.packed = self._pack(q, scale, bias)
        self.in_scale, self.in_zero = float(in_qparams[0]), int(in_qparams[1])
        self.out_scale, self.out_zero = float(out_qparams[0]), int(out_qparams[1])

    @classmethod
    def from_float(cls, layer: nn.Module, ranges: dict[str, tuple[float, float]] | None = None,
                   **_: Any) -> StaticInt8Linear:
        q, scale = per_channel_int8(weight_of(layer))
        assert ranges is not None, "static int8 needs the calibrated ranges"
        return cls(q, scale, _bias(layer), per_tensor_affine(*ranges["in"]), per_tensor_affine(*ranges["out"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        qx = torch.quantize_per_tensor(x.float().contiguous(), self.in_scale, self.in_zero, torch.quint8)
        y = torch.ops.quantized.linear(qx, self.packed, self.out_scale, self.out_zero)
        return y.dequantize().to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        q, scale, bias = self._unpacked()
        qp = torch.tensor([self.in_scale, self.out_scale], dtype=torch.float64)
        zp = torch.tensor([self.in_zero, self.out_zero], dtype=torch.int64)
        return {"qweight": q, "wscale": scale, "act_scale": qp, "act_zero": zp,
                **({"bias": bias} if bias is not None else {})}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> StaticInt8Linear:
        s, z = t["act_scale"].tolist(), t["act_zero"].tolist()
        return cls(t["qweight"], t["wscale"].float(), t.get("bias"), (s[0], z[0]), (s[1], z[1]))


class WeightOnlyInt8Linear(QuantLayer):
    """int8 weights, dequantized for a float matmul on every call: smaller, not faster."""

    kind = "int8_weight_only"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q)
        self.register_buffer("wscale", scale.float())
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, layer: nn.Module, **_: Any) -> WeightOnlyInt8Linear:
        q, scale = per_channel_int8(weight_of(layer))
        return cls(q, scale, _bias(layer))

    @property
    def weight(self) -> torch.Tensor:  # the stored int8 matrix (see _EngineLinear.weight)
        return self.qweight

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.wscale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        bias = {"bias": self.bias} if self.bias is not None else {}
        return {"qweight": self.qweight, "wscale": self.wscale, **bias}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> WeightOnlyInt8Linear:
        return cls(t["qweight"], t["wscale"], t.get("bias"))


class WeightOnlyInt4Linear(QuantLayer):
    """4-bit weights in groups of `group_size` along the input (asymmetric: a float16 scale and
    zero per group), two per byte; dequantized for a float matmul on every call."""

    kind = "int4_weight_only"

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("qweight", packed)
        self.register_buffer("wscale", scale.half())
        self.register_buffer("wzero", zero.half())
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, layer: nn.Module, group_size: int = 32, **_: Any) -> WeightOnlyInt4Linear:
        q, scale, zero = grouped_int4(weight_of(layer), group_size)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        return cls(packed, scale, zero, _bias(layer), group_size)

    @property
    def weight(self) -> torch.Tensor:  # 4-bit values have no dtype of their own: the float weight they stand for
        return self.dequantized()

    def dequantized(self) -> torch.Tensor:
        lo, hi = self.qweight & 0x0F, self.qweight >> 4
        q = torch.stack([lo, hi], dim=-1).view(self.out_features, -1, self.group_size).float()
        return (q * self.wscale.float()[..., None] + self.wzero.float()[..., None]).view(self.out_features, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "wscale": self.wscale, "wzero": self.wzero,
                **({"bias": self.bias} if self.bias is not None else {})}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> WeightOnlyInt4Linear:
        return cls(t["qweight"], t["wscale"], t["wzero"], t.get("bias"), int(meta["group_size"]))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, group_size={self.group_size}"


class Int8Embedding(QuantLayer):
    """An embedding table with int8 rows (a float32 scale each); a lookup scales its rows back."""

    kind = "int8_embedding"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", q)
        self.register_buffer("wscale", scale.float())

    @classmethod
    def from_float(cls, layer: nn.Embedding, **_: Any) -> Int8Embedding:
        q, scale = per_channel_int8(layer.weight.detach())
        return cls(q, scale, layer.padding_idx)

    @property
    def weight(self) -> torch.Tensor:  # what code that reads `embed_tokens.weight` (its dtype, its rows) sees
        return self.dequantized()

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.wscale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.qweight).float() * self.wscale[ids][..., None]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "wscale": self.wscale}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> Int8Embedding:
        return cls(t["qweight"], t["wscale"], meta.get("padding_idx"))


LAYERS: dict[str, type[QuantLayer]] = {c.kind: c for c in (DynamicInt8Linear, StaticInt8Linear, WeightOnlyInt8Linear,
                                                           WeightOnlyInt4Linear, Int8Embedding)}
