"""A policy with a value head, for PPO: the causal LM (peft or plain) plus a linear
layer that reads its final hidden state and gives one value per token.

One backbone pass gives both: the causal LM runs with `output_hidden_states=True`,
so the logits are exactly the model's own (soft-capping, logit scaling and all), and
`hidden_states[-1]` is the final hidden state after the final norm (in transformers 5
the last recorded state is the normed one; a unit test keeps that honest).

The value head is not part of the policy's weights: it is saved beside them as
`value_head.safetensors`, so the run directory still loads with plain peft or
transformers, and a later run (or a PPO continuation) can read the head back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


def hidden_size_of(model: Any) -> int:
    config = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        size = getattr(config, key, None)
        if isinstance(size, int):
            return size
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and isinstance(getattr(text, "hidden_size", None), int):
        return text.hidden_size
    raise ValueError(f"cannot find the hidden size of {type(model).__name__}")


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (as `generate` numbers them), 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyWithValueHead(nn.Module):
    """`policy` (a causal LM) + `value_head` (hidden -> 1). Plain composition."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(hidden_size_of(policy), 1, dtype=torch.float32)
        # Values start at 0: the first advantages are then the (whitened) returns, not noise.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        device = next(policy.parameters()).device
        self.value_head.to(device)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (batch, seq, vocab), values (batch, seq)), positions skip left padding."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_for(attention_mask),
                          output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.policy.generate(**kwargs)

    def save_value_head(self, output_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """The head's weights (or `state`: them gathered from shards) into `output_dir`."""
        from safetensors.torch import save_file

        path = Path(output_dir) / VALUE_HEAD_FILE
        state = {f"v_head.{k}": v.detach().contiguous().cpu()
                 for k, v in (state if state is not None else self.value_head.state_dict()).items()}
        save_file(state, str(path),
                  metadata={"format": "pt", "hidden_size": str(self.value_head.in_features)})
        return path

    def load_value_head(self, path: str | Path) -> None:
        """Read a head saved by `save_value_head` (a file or the run directory holding it)."""
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / VALUE_HEAD_FILE
        state = {k.removeprefix("v_head."): v for k, v in load_file(str(path)).items()}
        self.value_head.load_state_dict(state)


def disable_dropout(model: nn.Module) -> None:
    """PPO compares the policy with itself at rollout time: dropout would make the first
    ratio differ from 1 by noise alone, so every dropout layer is set to p = 0."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
