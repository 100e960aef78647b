"""Quantization-aware training: the model trains on the weights (and activations) it will have
once quantized, so the quantized model keeps its quality.

Every Linear layer the scheme will quantize gets its weight parametrized (torch's
`nn.utils.parametrize`) by the scheme's own rounding, the same functions the quantized
layers are made with (lathe.model.quant.modules), with a straight-through gradient: the
forward pass sees the quantized weight, the update reaches the float one. int8_dynamic also
rounds each layer's input as the int8 GEMM will (per call, 7 bits). With an adapter (LoRA,
IA3, ...) the frozen base layers are rounded and the adapter learns around them, as
torchtune's QAT + LoRA recipe does; the merged weight is quantized at the end. When training
ends the parametrizations are removed (the float weights are what the run saves) and
`lathe train` converts the run into <output_dir>/quantized with lathe quantize.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lathe.model.quant.modules import ACT_QMAX, grouped_int4, per_channel_int8, per_tensor_affine

# Path parts of layers an adapter adds (trained in float and merged at the end) or keeps as a copy.
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                  "original_module")


def round_weight(w: torch.Tensor, scheme: str, group_size: int = 32) -> torch.Tensor:
    """The float weight the scheme's quantized layer will hold ([out, in])."""
    if scheme == "int4_weight_only":
        q, scale, zero = grouped_int4(w, group_size)
        out, cols = q.shape
        g = q.float().view(out, cols // group_size, group_size)
        return (g * scale[..., None] + zero[..., None]).view(out, cols).to(w.dtype)
    q, scale = per_channel_int8(w)
    return (q.float() * scale[:, None]).to(w.dtype)


class FakeQuantWeight(nn.Module):
    """A parametrization: weight -> its rounded value, with the gradient passed straight through."""

    def __init__(self, scheme: str, group_size: int, transposed: bool) -> None:
        super().__init__()
        self.scheme, self.group_size, self.transposed = scheme, group_size, transposed

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        rows = w.t() if self.transposed else w  # GPT-2's Conv1D stores [in, out]
        rounded = round_weight(rows.detach(), self.scheme, self.group_size)
        rounded = rounded.t() if self.transposed else rounded
        return w + (rounded - w).detach()


def _fake_quant_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    if not torch.is_floating_point(x):
        return args
    d = x.detach()
    scale, zero = per_tensor_affine(float(d.min()), float(d.max()), ACT_QMAX)
    rounded = (torch.clamp(torch.round(d / scale) + zero, 0, ACT_QMAX) - zero) * scale
    return (x + (rounded.to(x.dtype) - d), *args[1:])


def qat_layers(model: nn.Module, scheme: str, group_size: int, skip: list[str]) -> list[tuple[str, nn.Module]]:
    """The Linear layers the conversion will quantize: not an adapter's own, not skipped, and (int4)
    splitting into whole groups."""
    from lathe.model.quant.convert import is_linear, matches

    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if not is_linear(module) or any(p in _ADAPTER_PARTS or p.startswith("modules_to_save") for p in parts):
            continue
        if any(matches(name, s) for s in skip):
            continue
        cols = module.weight.shape[0 if type(module).__name__ == "Conv1D" else -1]
        if scheme == "int4_weight_only" and cols % group_size:
            continue
        found.append((name, module))
    return found


class FakeQuantization:
    """Applied to a model for training (`apply`), removed before it is saved (`remove`)."""

    def __init__(self, scheme: str, group_size: int = 32, skip: list[str] | None = None) -> None:
        self.scheme, self.group_size, self.skip = scheme, group_size, list(skip or [])
        self.layers: list[nn.Module] = []
        self.hooks: list[Any] = []

    def apply(self, model: nn.Module) -> int:
        from torch.nn.utils import parametrize

        for _, module in qat_layers(model, self.scheme, self.group_size, self.skip):
            transposed = type(module).__name__ == "Conv1D"
            parametrize.register_parametrization(module, "weight",
                                                 FakeQuantWeight(self.scheme, self.group_size, transposed))
            self.layers.append(module)
            if self.scheme == "int8_dynamic":
                self.hooks.append(module.register_forward_pre_hook(_fake_quant_input))
        return len(self.layers)

    def remove(self) -> None:
        """Back to plain float layers holding the trained (unrounded) weights."""
        from torch.nn.utils import parametrize

        for module in self.layers:
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        for hook in self.hooks:
            hook.remove()
        self.layers, self.hooks = [], []
