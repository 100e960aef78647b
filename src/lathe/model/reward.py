"""Reward models: a causal LM backbone with a scalar head (`AutoModelForSequenceClassification`,
num_labels=1), trained by stage rm and read by stage ppo.

An rm run directory holds either a full model (loads with plain transformers) or a
SEQ_CLS LoRA adapter whose `score` head is saved with it (loads with plain peft), plus
`reward_model.json`, which marks the folder as a reward model and records how to
rebuild it (the base model and any adapters merged into it before training).

The score of a sequence is the head's value at its last real token (by attention
mask), read from the head as the model's own forward computes it. Transformers' own pooling
looks for the last token that is not `pad_token_id`, which is wrong when pad == eos
and replies end with eos (the common case); this never depends on the pad id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lathe.errors import ModelError
from lathe.model.load import fit_embeddings, new_head_report_hidden

MARKER = "reward_model.json"
FORMAT_VERSION = 1


def load_reward_backbone(path: str, dtype: Any, trust_remote_code: bool, tokenizer: Any,
                         **load_kwargs: Any) -> Any:
    """The causal LM at `path` with a scalar head (the loader's "reward" task), in `dtype`
    (`load_kwargs`: e.g. the quantization_config of a QLoRA reward model)."""
    from lathe.model.load import auto_class

    auto, extra = auto_class("reward")
    with new_head_report_hidden():
        model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **extra, **load_kwargs)
    fit_embeddings(model, tokenizer)
    return model


def merge_adapters(model: Any, adapters: list[str]) -> Any:
    """Merge causal-LM adapters (e.g. an SFT run's LoRA or IA3) into a reward backbone.

    The adapter weights are keyed by the backbone's module names, which the
    sequence-classification model shares with the causal LM.
    """
    from peft import PeftConfig, get_peft_model
    from safetensors.torch import load_file

    for path in adapters:
        config = PeftConfig.from_pretrained(path)
        config.task_type = None  # the adapter was made for CAUSAL_LM; only its layers matter here
        config.inference_mode = False
        wrapped = get_peft_model(model, config)
        weights = load_file(str(Path(path) / "adapter_model.safetensors"))
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(wrapped, weights)
        prefix = getattr(wrapped.base_model, "prefix", "lora_")  # the tuner's parameter names
        missing = [k for k in result.missing_keys if prefix in k]
        if missing:
            raise ModelError(f"adapter {path} does not fit this model (e.g. {missing[0]} is missing); "
                             "was it trained on the same base model?")
        model = wrapped.merge_and_unload()
    return model


def score_head(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if head is None:
        raise ModelError(f"{type(base).__name__} has no `score` head; it is not a reward model")
    return head


def reward_scores(model: Any, input_ids: Any, attention_mask: Any = None, position_ids: Any = None,
                  seq_index: Any = None) -> Any:
    """One scalar per sequence: the head's value at the last token with attention_mask 1; or,
    for padding-free rows (`position_ids`, `seq_index`: the sequence of each token, -1 for
    padding), at each sequence's last token, in the order of the sequence numbers.

    The model runs its own forward (through whatever wraps it: DDP, a DeepSpeed engine), and
    the head's value at every position is read by a hook as it is computed; the model's own
    pooling (by pad id) is not used."""
    import torch

    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP, DeepSpeed
        inner = inner.module
    seen: list[Any] = []
    hook = score_head(inner).register_forward_hook(lambda _m, _args, out: seen.append(out))
    where = {"attention_mask": attention_mask} if seq_index is None else {"position_ids": position_ids}
    try:
        model(input_ids=input_ids, **where, use_cache=False)
    finally:
        hook.remove()
    values = seen[-1].squeeze(-1).float()  # (batch, seq)
    if seq_index is not None:
        flat = seq_index.reshape(-1)
        spots = torch.arange(flat.shape[0], device=flat.device)
        n = int(flat.max()) + 1
        last = torch.full((n,), -1, dtype=torch.long, device=flat.device).scatter_reduce(
            0, flat.clamp(min=0), torch.where(flat >= 0, spots, -1), reduce="amax")
        return values.reshape(-1)[last]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(-1)
    return values[torch.arange(input_ids.shape[0], device=input_ids.device), last]


def write_marker(output_dir: str, base_model: str, finetuning_type: str, merged_adapters: list[str],
                 template: str) -> None:
    info = {"format": "lathe-reward-model", "version": FORMAT_VERSION, "base_model": base_model,
            "finetuning_type": finetuning_type, "merged_adapters": merged_adapters, "template": template}
    tmp = Path(output_dir) / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, Path(output_dir) / MARKER)


def read_marker(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"reward_model {path} does not exist; give the output_dir of an rm run")
    marker = p / MARKER
    if not marker.is_file():
        raise ModelError(
            f"reward_model {path} is not a reward model (no {MARKER}); train one with stage: rm "
            "and give its output_dir"
        )
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        raise ModelError(f"{marker} is not valid JSON; the rm run did not finish, rerun it") from None
    if info.get("format") != "lathe-reward-model":
        raise ModelError(f"{marker} is not a Lathe reward model marker")
    return info


def load_reward_model(path: str, dtype: Any, tokenizer: Any, trust_remote_code: bool = False) -> Any:
    """A frozen reward model from an rm run directory (a full model, or an adapter merged into its
    base in `dtype`, also when it was trained on a quantized base)."""
    from lathe.model.methods import get_method

    info = read_marker(path)
    if get_method(info["finetuning_type"]).adapter:
        from peft import PeftModel

        base = info["base_model"]
        if not Path(base).is_dir():
            from lathe.model.load import resolve_model_path

            base = resolve_model_path(base)
        model = load_reward_backbone(base, dtype, trust_remote_code, tokenizer)
        model = merge_adapters(model, info.get("merged_adapters") or [])
        try:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"reward model {path} does not fit its base model {base}: "
                             f"{str(e).splitlines()[0][:160]}") from None
    else:
        model = load_reward_backbone(path, dtype, trust_remote_code, tokenizer)
    model.eval()
    model.requires_grad_(False)
    return model
