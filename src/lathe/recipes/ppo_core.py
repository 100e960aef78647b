"""The maths of PPO for language models, as pure functions on tensors (tested alone).

Shapes: every per-token tensor is (batch, response_len), aligned with the generated
tokens; `mask` is 1 on the tokens of each reply (up to and including its first stop
token) and 0 after. Conventions follow Ziegler et al. (2019) and the PPO paper:

- per-token reward = -kl_coef * (logp - ref_logp), plus the reward model's score at
  the reply's last token;
- advantages by GAE (gamma, lam) over the reply; returns = advantages + values;
- clipped surrogate policy loss and clipped value loss, both averaged over reply tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# --- log-probabilities -------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[b, t]) under logits[b, t] (logits already aligned with the tokens)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprobs(logits: torch.Tensor, sequences: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the generated tokens `sequences[:, prompt_len:]`.

    The logit at position t predicts token t + 1, so the reply's tokens are scored by
    `logits[:, prompt_len - 1 : -1]`. Sampling at `temperature` draws from
    softmax(logits / temperature): the log-probs are of that distribution.
    """
    return token_logprobs(logits[:, prompt_len - 1:-1] / temperature, sequences[:, prompt_len:])


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_mask(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 on each reply's tokens up to and including its first stop token, 0 after it.

    A reply without a stop token (cut at max_new_tokens) keeps all its tokens.
    """
    stops = torch.zeros_like(responses, dtype=torch.bool)
    for sid in stop_ids:
        stops |= responses == sid
    before = stops.long().cumsum(-1) - stops.long()  # stop tokens strictly before t
    return (before == 0).long()


# --- masked statistics --------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; the mean is added back if not `shift_mean`.
    Entries outside the mask are returned as 0. `reduce` sums a tensor over the processes that
    hold the batch's other rows, so the statistics are the whole batch's (None: these rows are
    the batch)."""
    reduce = reduce or (lambda t: t)
    m = mask.to(x.dtype)
    total, n = reduce(torch.stack([(x * m).sum(), m.sum()]))
    mean = total / n.clamp(min=1)
    var = reduce(((x - mean) ** 2 * m).sum()) / n.clamp(min=1)
    if n > 1:
        var = var * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# --- rewards and advantages -------------------------------------------------------------

def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of `mask` (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).argmax(-1)


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL estimate), both 0 outside the mask.

    The KL estimate is logp - ref_logp of the sampled token (its expectation is
    KL(policy || reference)); each token pays kl_coef times it, and the reward model's
    score is paid at the reply's last token.
    """
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each reply: (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1},
    with V and A taken as 0 past the reply's end (the episode ends at its last token).
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_adv
    returns = (advantages + values) * m
    return advantages, returns


# --- losses --------------------------------------------------------------------------------

def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over reply tokens of max(-A r, -A clip(r, 1 -/+ eps)),
    r = exp(logp - old_logp). Also the clip fraction and an estimate of KL(old || new)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
    }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * mean over reply tokens of max((V - R)^2, (V_clipped - R)^2), where V_clipped
    stays within cliprange_value of the value at rollout time."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    losses_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask)
    # counted where the clip is active: inside the range, old + (V - old) can differ from V in its
    # last bit, and a bare `clipped > unclipped` would count rounding
    clipped = ((values - old_values).abs() > cliprange_value) & (losses_clipped > losses)
    return loss, {"vf_clipfrac": masked_mean(clipped.float(), mask).detach()}


# --- KL coefficient -------------------------------------------------------------------------

class FixedKLController:
    """kl_coef stays where it started (ppo_target: null)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): steer the KL towards `target` within `horizon` rollouts:
    coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(init_kl_coef: float, target: float | None,
                       horizon: int) -> FixedKLController | AdaptiveKLController:
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)


# --- reward normalisation ------------------------------------------------------------------

class RunningMoments:
    """Mean and standard deviation of every score seen so far (ppo_score_norm)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold in a batch (parallel-variance formula); returns the new (mean, std)."""
        xs = xs.detach().double().flatten()
        n = xs.numel()
        batch_mean = xs.mean().item()
        batch_var = xs.var(unbiased=False).item() if n > 1 else 0.0
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        return self.mean, self.std

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else 1.0

    def normalise(self, scores: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        """Update with the batch's scores (`batch`: every process's, else `scores`), then return
        `scores` standardised by the running moments."""
        mean, std = self.update(scores if batch is None else batch)
        return (scores - mean) / max(std, 1e-8)
