"""Preference losses against hand-computed values, and the sign of their gradients."""

from __future__ import annotations

import math

import pytest
import torch

from lathe.recipes.losses import (
    dpo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    preference_loss,
    sequence_logps,
    simpo_loss,
)

T = torch.tensor


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- sequence log-probs -------------------------------------------------------------------

def test_sequence_logps_sums_labelled_tokens_after_the_shift():
    logits = torch.randn(2, 5, 7)
    labels = T([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    total, count = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    # position t predicts label t+1
    want0 = logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 1]
    want1 = logp[1, 0, 2] + logp[1, 1, 6]
    assert torch.allclose(total, torch.stack([want0, want1]), atol=1e-5)
    assert count.tolist() == [3, 2]


def test_sequence_logps_ignores_padding_logits():
    logits = torch.randn(1, 4, 5)
    labels = T([[-100, 2, 3, -100]])
    a, _ = sequence_logps(logits, labels)
    logits[0, 2:] += 100.0  # the last position predicts nothing; position 2 predicts a pad
    b, _ = sequence_logps(logits, labels)
    assert torch.allclose(a, b)


# --- dpo family ------------------------------------------------------------------------------

def test_sigmoid_with_policy_equal_to_reference_is_log2_and_rewards_zero():
    x = T([-5.0, -9.0])
    out = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert torch.allclose(out.losses, torch.full((2,), math.log(2)))
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_sigmoid_known_value_and_rewards():
    # chosen ratio +2, rejected ratio -1: d = 3, beta 0.5 -> -log sigmoid(1.5)
    out = dpo_loss(T([-3.0]), T([-6.0]), T([-5.0]), T([-5.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(-math.log(_sig(1.5)), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(1.0)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_label_smoothing_mixes_the_flipped_term():
    ls, beta, d = 0.2, 0.5, 3.0
    out = dpo_loss(T([-3.0]), T([-6.0]), T([-5.0]), T([-5.0]), beta=beta, label_smoothing=ls)
    want = -(1 - ls) * math.log(_sig(beta * d)) - ls * math.log(_sig(-beta * d))
    assert out.losses.item() == pytest.approx(want, rel=1e-6)
    # with smoothing, a huge margin is penalised (the loss grows again)
    far = dpo_loss(T([100.0]), T([-100.0]), T([0.0]), T([0.0]), beta=beta, label_smoothing=ls)
    assert far.losses.item() > out.losses.item()


def test_hinge_known_values():
    out = dpo_loss(T([-3.0, -3.0]), T([-6.0, -3.5]), T([-5.0, -3.0]), T([-5.0, -3.0]),
                   beta=0.5, loss_type="hinge")
    # d = 3 -> relu(1 - 1.5) = 0 ; d = 0.5 -> relu(1 - 0.25) = 0.75
    assert out.losses.tolist() == pytest.approx([0.0, 0.75])


def test_ipo_known_value():
    out = dpo_loss(T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), beta=0.25, loss_type="ipo")
    # d = 0.5 - (-0.5) = 1 ; target 1/(2*0.25) = 2 -> (1 - 2)^2 = 1
    assert out.losses.item() == pytest.approx(1.0)


def test_ipo_dispatch_uses_per_token_averages():
    chosen, rejected = (T([-4.0]), T([4])), (T([-8.0]), T([2]))
    ref = (T([-8.0]), T([4])), (T([-8.0]), T([2]))
    out = preference_loss("ipo", chosen, rejected, *ref, beta=0.25)
    # avg ratios: chosen (-1) - (-2) = 1, rejected (-4) - (-4) = 0 -> d = 1 -> (1 - 2)^2
    assert out.losses.item() == pytest.approx(1.0)


def test_simpo_margin_needs_to_exceed_gamma():
    beta, gamma = 2.0, 1.0
    out = simpo_loss(T([-1.0, -1.0]), T([-1.5, -1.0]), beta=beta, gamma=gamma)
    # 2 * 0.5 - 1 = 0 -> log 2 ; 0 - 1 -> -log sigmoid(-1)
    assert out.losses.tolist() == pytest.approx([math.log(2), -math.log(_sig(-1.0))], rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-2.0, -2.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-3.0, -2.0])


def test_simpo_dispatch_length_normalises():
    out = preference_loss("simpo", (T([-4.0]), T([4])), (T([-4.0]), T([2])), None, None,
                          beta=2.0, simpo_gamma=0.0)
    # averages -1 and -2 -> -log sigmoid(2 * 1)
    assert out.losses.item() == pytest.approx(-math.log(_sig(2.0)), rel=1e-6)


def test_orpo_odds_ratio_by_hand():
    pc, pr, beta = 0.5, 0.2, 0.1  # per-token average probabilities
    out = orpo_loss(T([math.log(pc)]), T([math.log(pr)]), beta=beta)
    log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))  # log(1 / 0.25) = log 4
    want = -math.log(pc) - beta * math.log(_sig(log_odds))
    assert log_odds == pytest.approx(math.log(4))
    assert out.losses.item() == pytest.approx(want, rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(beta * math.log(pc))


def test_log1mexp_is_stable_at_both_ends():
    x = T([-1e-5, -0.5, -5.0, -50.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    assert torch.isfinite(log1mexp(T([0.0]))).all()


def test_reference_free_losses_need_no_reference_but_dpo_does():
    side = (T([-2.0]), T([2]))
    preference_loss("orpo", side, side, None, None, beta=0.1)
    with pytest.raises(ValueError):
        preference_loss("sigmoid", side, side, None, None, beta=0.1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "orpo", "simpo"])
def test_raising_the_chosen_logp_lowers_the_loss(loss_type):
    chosen = T([-6.0], requires_grad=True)
    rejected = T([-5.0], requires_grad=True)
    n = T([3])
    out = preference_loss(loss_type, (chosen, n), (rejected, n), (T([-5.5]), n), (T([-5.5]), n),
                          beta=0.1, simpo_gamma=0.5)
    out.losses.sum().backward()
    assert chosen.grad.item() < 0  # gradient descent raises the chosen log-prob
    assert rejected.grad.item() > 0  # and lowers the rejected one


# --- kto ---------------------------------------------------------------------------------------

def test_kto_known_values_and_weights():
    beta = 0.5
    logps, ref = T([-2.0, -2.0]), T([-3.0, -3.0])  # both ratios +1
    tags = T([True, False])
    kl_logps, ref_kl = T([-4.0, -4.0]), T([-4.6, -4.4])  # mean KL estimate 0.5
    out = kto_loss(logps, ref, tags, kl_logps, ref_kl, beta=beta, chosen_weight=2.0, rejected_weight=0.5)
    assert out.kl.item() == pytest.approx(0.5)
    want = [2.0 * (1 - _sig(beta * (1 - 0.5))), 0.5 * (1 - _sig(beta * (0.5 - 1)))]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-6)
    assert out.rewards.tolist() == pytest.approx([0.5, 0.5])


def test_kto_kl_is_clamped_at_zero_and_detached():
    kl_logps = T([-5.0, -5.0], requires_grad=True)
    out = kto_loss(T([-1.0]), T([-1.0]), T([True]), kl_logps, T([-4.0, -4.0]), beta=0.1)
    assert out.kl.item() == 0.0 and not out.kl.requires_grad
    assert out.losses.item() == pytest.approx(0.5)  # 1 - sigmoid(0)


def test_kto_gradient_signs():
    logps = T([-3.0, -3.0], requires_grad=True)
    out = kto_loss(logps, T([-3.0, -3.0]), T([True, False]), T([-3.0]), T([-3.0]), beta=0.1)
    out.losses.sum().backward()
    assert logps.grad[0] < 0  # desirable: raise its log-prob
    assert logps.grad[1] > 0  # undesirable: lower it
