"""Preference losses (dpo family, orpo, simpo, kto) as pure functions on tensors.

Every function returns per-example losses (the recipe averages them over pairs or
examples, so gradient accumulation normalises like a bigger batch) and the rewards
that are logged. Formulas:

- sigmoid (DPO, Rafailov et al. 2023) with cDPO label smoothing:
  -(1-ls) logsigmoid(beta d) - ls logsigmoid(-beta d),  d = chosen log-ratio - rejected log-ratio
- hinge (SLiC):  relu(1 - beta d)
- ipo (Azar et al. 2023):  (d - 1/(2 beta))^2 on per-token average log-ratios
- orpo (Hong et al. 2024): NLL(chosen) - beta logsigmoid(log odds(chosen) - log odds(rejected)),
  odds from per-token average log-probs; no reference
- simpo (Meng et al. 2024): -logsigmoid(beta (avg_c - avg_r) - gamma); no reference
- kto (Ethayarajh et al. 2024): w_d (1 - sigmoid(beta (r - z0))) for desirable replies,
  w_u (1 - sigmoid(beta (z0 - r))) for undesirable ones, z0 = max(0, mean KL estimate), detached

Implicit rewards: beta (logp - ref_logp) with a reference; beta * avg logp without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lathe.data.processors import IGNORE_INDEX

REFERENCE_FREE = ("orpo", "simpo")
LENGTH_NORMALISED = ("ipo", "orpo", "simpo")


@dataclass
class PrefLoss:
    losses: Any  # (pairs,) per-pair loss
    chosen_rewards: Any  # (pairs,) detached
    rejected_rewards: Any  # (pairs,) detached


@dataclass
class KTOLoss:
    losses: Any  # (examples,) weighted per-example loss
    rewards: Any  # (examples,) detached, beta * log-ratio
    kl: Any  # scalar, detached, clamped at 0


def sequence_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Sum of log-probs of the labelled tokens per row, and how many there are.

    Position t predicts label t+1 (labels are the input ids with -100 where nothing
    is trained); computed in float32 without materialising a full log-softmax copy.
    """
    import torch

    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels.ne(IGNORE_INDEX)
    index = labels.masked_fill(~mask, 0).unsqueeze(-1)
    token_logps = logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_logps = token_logps * mask
    return token_logps.sum(-1), mask.sum(-1)


def average_logps(sum_logps: Any, n_tokens: Any) -> Any:
    """Per-token average log-prob (length normalisation for ipo, orpo and simpo)."""
    return sum_logps / n_tokens.clamp(min=1)


def dpo_loss(chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> PrefLoss:
    """Reference-based losses: sigmoid, hinge, ipo (pass average log-probs for ipo)."""
    import torch.nn.functional as F

    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    d = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * d)
                  - label_smoothing * F.logsigmoid(-beta * d))
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * d)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}")
    return PrefLoss(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def log1mexp(x: Any) -> Any:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    import torch

    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg: Any, rejected_avg: Any, *, beta: float) -> PrefLoss:
    """NLL on the chosen reply plus beta times the odds-ratio term (per-token average log-probs)."""
    import torch.nn.functional as F

    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return PrefLoss(losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())


def simpo_loss(chosen_avg: Any, rejected_avg: Any, *, beta: float, gamma: float) -> PrefLoss:
    """Length-normalised reward margin must exceed gamma (no reference)."""
    import torch.nn.functional as F

    losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)
    return PrefLoss(losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())


def preference_loss(loss_type: str, chosen: tuple[Any, Any], rejected: tuple[Any, Any],
                    ref_chosen: tuple[Any, Any] | None, ref_rejected: tuple[Any, Any] | None,
                    *, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> PrefLoss:
    """Dispatch on `pref_loss`; each side is (sum of log-probs, token count)."""
    avg = loss_type in LENGTH_NORMALISED
    pick = (lambda s: average_logps(*s)) if avg else (lambda s: s[0])
    if loss_type == "orpo":
        return orpo_loss(pick(chosen), pick(rejected), beta=beta)
    if loss_type == "simpo":
        return simpo_loss(pick(chosen), pick(rejected), beta=beta, gamma=simpo_gamma)
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"pref_loss {loss_type} needs reference log-probs")
    return dpo_loss(pick(chosen), pick(rejected), pick(ref_chosen), pick(ref_rejected),
                    beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)


def kto_loss(logps: Any, ref_logps: Any, desirable: Any, kl_logps: Any, ref_kl_logps: Any, *,
             beta: float, chosen_weight: float = 1.0, rejected_weight: float = 1.0) -> KTOLoss:
    """Per-example KTO loss; the reference point z0 comes from mismatched prompt/reply pairs."""
    import torch

    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        chosen_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        rejected_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return KTOLoss(losses, (beta * ratio).detach(), kl)
