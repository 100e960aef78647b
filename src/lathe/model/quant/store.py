"""A quantized model folder: written and read back.

    config.json, generation_config.json     the model's own (label maps, stop tokens)
    tokenizer files                         with the chat template it was trained with
    quantized.safetensors                   every tensor: float ones under their usual names,
                                            each quantized layer's integers and scales under
                                            <layer>.qweight, <layer>.wscale ...
    quantization.json                       scheme, the layout (layer -> kind), where it came from
    LOADING.md                              how to load it

Plain `from_pretrained` cannot load it (transformers has no loader for this layout, and the
weights are deliberately not called model.safetensors, so it fails loudly instead of
filling the layers with random numbers); Lathe's loader (`load_quantized`, used by chat,
eval, predict and everything that loads a model) rebuilds the architecture from config.json
without allocating float weights, puts each quantized layer in place, and loads the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lathe.errors import ModelError

WEIGHTS = "quantized.safetensors"
LAYOUT = "quantization.json"
FORMAT = "lathe-quantized-v1"

LOADING = """# Loading this model

A {scheme} model quantized by Lathe from {source}. Its weights are in `{weights}` in a
layout transformers has no loader for (each quantized layer's int8 / 4-bit integers with
their scales; see `{layout}`), so load it with Lathe:

```
lathe chat {folder}
lathe predict {folder} eval_dataset=NAME
```

```python
from lathe.model.quant.store import load_quantized
model = load_quantized("{folder}")      # the same model class as the float one
```
"""


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / LAYOUT).is_file()


def read_layout(folder: str | Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(folder) / LAYOUT).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}/{LAYOUT} cannot be read ({e}); quantize the model again") from None
    if data.get("format") != FORMAT:
        raise ModelError(f"{folder}/{LAYOUT} is format {data.get('format')!r}, which this Lathe does not read "
                         f"(it reads {FORMAT}); quantize the model again with this version")
    return data


def save_quantized(model: Any, tokenizer: Any, folder: Path, layout: dict[str, dict[str, Any]],
                   info: dict[str, Any]) -> None:
    """Write the folder (see the module docstring); `info` goes into quantization.json."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    prefixes = []
    for name, entry in layout.items():
        for key, t in model.get_submodule(name).tensors().items():
            tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
        prefixes += [name + "."] + [a + "." for a in entry["aliases"]]
    tied: dict[str, str] = {}
    kept: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, t in model.state_dict().items():
        if any(key.startswith(p) for p in prefixes):
            continue
        where = (t.data_ptr(), tuple(t.shape))
        if where in kept:  # a tied weight (lm_head = embed_tokens): stored once
            tied[key] = kept[where]
            continue
        kept[where] = key
        tensors[key] = t.detach().contiguous().cpu()
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT})
    model.config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    data = {"format": FORMAT, **info, "layers": layout, "tied": tied}
    (folder / LAYOUT).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (folder / "LOADING.md").write_text(LOADING.format(scheme=info.get("scheme"), source=info.get("source"),
                                                      weights=WEIGHTS, layout=LAYOUT, folder=folder),
                                       encoding="utf-8")


def load_quantized(folder: str | Path, task: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model a quantized folder holds, in eval mode (`task`: the loader's task name; by
    default the one quantization.json records)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from lathe.model.load import auto_class
    from lathe.model.quant.convert import set_module
    from lathe.model.quant.modules import LAYERS

    folder = Path(folder)
    data = read_layout(folder)
    task = task or data.get("task", "causal_lm")
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    auto, _ = auto_class(task)
    with init_empty_weights():  # the architecture without float weights: they are loaded below
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}/{WEIGHTS} cannot be read ({e}); quantize the model again") from None
    for name, entry in data["layers"].items():
        prefix = name + "."
        own = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)
                                                          and "." not in k[len(prefix):]]}
        layer = LAYERS[entry["kind"]].from_tensors(own, entry)
        for alias in [name, *entry["aliases"]]:
            set_module(model, alias, layer)
    for key, source in data.get("tied", {}).items():
        tensors[key] = tensors[source]
    model.load_state_dict(tensors, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ModelError(f"{folder}/{WEIGHTS} lacks {left[0]} (and {len(left) - 1} more tensors); the folder is "
                         "incomplete: quantize the model again")
    model.eval()
    with torch.no_grad():
        return model
