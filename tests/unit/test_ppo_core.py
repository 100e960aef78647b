"""PPO maths against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lathe.recipes.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_rewards,
    entropy_from_logits,
    gae,
    last_token_index,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    policy_loss,
    response_logprobs,
    response_mask,
    token_logprobs,
    value_loss,
)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_response_logprobs_use_the_logit_before_each_token():
    # vocab 3; sequence = prompt [0, 1] + reply [2, 0]; logits[t] predicts token t+1
    logits = torch.zeros(1, 4, 3)
    logits[0, 1] = t([0.0, 0.0, math.log(2.0)])  # predicts reply token 2: p = 2/4
    logits[0, 2] = t([math.log(3.0), 0.0, 0.0])  # predicts reply token 0: p = 3/5
    logits[0, 3] = t([100.0, 0.0, 0.0])  # after the last token: never used
    seq = torch.tensor([[0, 1, 2, 0]])
    got = response_logprobs(logits, seq, prompt_len=2)
    assert torch.allclose(got, t([[math.log(0.5), math.log(0.6)]]))
    # temperature 2 halves the logits: p(2) = sqrt(2) / (2 + sqrt(2))
    hot = response_logprobs(logits, seq, prompt_len=2, temperature=2.0)
    assert hot[0, 0].item() == pytest.approx(math.log(math.sqrt(2) / (2 + math.sqrt(2))), abs=1e-6)
    assert torch.allclose(token_logprobs(logits[:, 1:3], seq[:, 2:]), got)


def test_entropy_of_uniform_and_certain_distributions():
    logits = torch.stack([torch.zeros(4), t([1e4, 0, 0, 0])]).unsqueeze(0)
    assert torch.allclose(entropy_from_logits(logits), t([[math.log(4.0), 0.0]]), atol=1e-6)


def test_response_mask_keeps_tokens_up_to_the_first_stop():
    replies = torch.tensor([[1, 5, 2, 5], [7, 3, 3, 3], [1, 2, 3, 4], [5, 7, 1, 1]])
    mask = response_mask(replies, stop_ids=[5, 7])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert last_token_index(mask).tolist() == [1, 0, 3, 0]


def test_masked_mean_and_whiten_ignore_masked_entries():
    x, mask = t([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    # mean 2, unbiased variance 1 -> (x - 2) / 1; the masked entry becomes 0
    assert torch.allclose(masked_whiten(x, mask), t([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False), t([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6)


def test_rewards_pay_kl_per_token_and_the_score_at_the_last_token():
    logp = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = t([[-1.5, -1.0, -9.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rewards, kl = compute_rewards(t([1.0, 2.0]), logp, ref, mask, kl_coef=0.5)
    assert torch.allclose(kl, t([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    # -0.5 * kl per token; score 1 at index 1 of row 0, score 2 at index 0 of row 1
    assert torch.allclose(rewards, t([[-0.25, 0.5 + 1.0, 0.0], [-0.5 + 2.0, 0.0, 0.0]]))


def test_gae_matches_a_hand_computed_case():
    # row 0: gamma 1, lam 0.5; rewards [0, 0, 1], values [0.5, 0.2, 0.1]
    #   t2: delta = 1 - 0.1 = 0.9                 A = 0.9
    #   t1: delta = 0 + 0.1 - 0.2 = -0.1          A = -0.1 + 0.5 * 0.9 = 0.35
    #   t0: delta = 0 + 0.2 - 0.5 = -0.3          A = -0.3 + 0.5 * 0.35 = -0.125
    adv, ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.1]]), torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, t([[-0.125, 0.35, 0.9]]))
    assert torch.allclose(ret, t([[0.375, 0.55, 1.0]]))
    # gamma 0.9, lam 0.5, the reply ends at t1 (the value 9 past the end is ignored):
    #   t1: delta = 2 + 0 - 0.2 = 1.8              A = 1.8
    #   t0: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32    A = -0.32 + 0.45 * 1.8 = 0.49
    adv, ret = gae(t([[0.0, 2.0, 5.0]]), t([[0.5, 0.2, 9.0]]), torch.tensor([[1, 1, 0]]), gamma=0.9, lam=0.5)
    assert torch.allclose(adv, t([[0.49, 1.8, 0.0]]))
    assert torch.allclose(ret, t([[0.99, 2.0, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    m = mask.float()
    to_go = torch.flip(torch.cumsum(torch.flip(rewards * m, [1]), 1), [1])
    assert torch.allclose(adv, (to_go - values) * m, atol=1e-5)
    assert torch.allclose(ret, to_go * m, atol=1e-5)


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 4)
    new = t([[math.log(1.5), math.log(0.5), math.log(1.1), 0.0]])
    adv = t([[1.0, -1.0, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 0: A=1, r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: A=-1, r=0.5 -> max(0.5, 0.8) = 0.8 (clipped)
    # token 2: A=2, r=1.1 -> max(-2.2, -2.2) = -2.2 (inside the range)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    # clipped tokens pass no gradient; the unclipped one passes -A * r
    new.requires_grad_(True)
    policy_loss(new, old, adv, mask, cliprange=0.2)[0].backward()
    assert torch.allclose(new.grad, t([[0.0, 0.0, -2.0 * 1.1 / 3, 0.0]]), atol=1e-6)


def test_value_loss_clips_around_the_old_value():
    values, old, returns = t([[1.0, 0.1]]), t([[0.0, 0.0]]), t([[2.0, -1.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: V=1 -> (1-2)^2 = 1; clipped V=0.2 -> (0.2-2)^2 = 3.24; max 3.24
    # token 1: V=0.1 within the range -> (0.1+1)^2 = 1.21
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=8)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 8 / 10000))
    ctl.update(6.6, n_steps=8)  # error 0.1
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 8 / 10000) * (1 + 0.1 * 8 / 10000))
    low = AdaptiveKLController(0.2, target=6.0, horizon=10)
    low.update(0.0, n_steps=5)  # error clipped to -0.2
    assert low.value == pytest.approx(0.2 * 0.9)


def test_fixed_kl_controller_when_there_is_no_target():
    ctl = make_kl_controller(0.3, target=None, horizon=100)
    assert isinstance(ctl, FixedKLController)
    ctl.update(100.0, n_steps=8)
    assert ctl.value == 0.3
    assert isinstance(make_kl_controller(0.3, target=1.0, horizon=100), AdaptiveKLController)


def test_running_moments_match_the_whole_stream():
    rm = RunningMoments()
    rm.update(t([1.0, 2.0, 3.0]))
    mean, std = rm.update(t([4.0, 5.0]))
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(math.sqrt(2.5))  # unbiased std of 1..5
    out = rm.normalise(t([3.0]))  # now 1..5 and 3: mean 3
    assert out.item() == pytest.approx(0.0, abs=1e-6)


def _two_processes(work):
    """Run work(rank, reduce) for ranks 0 and 1 in two threads, where reduce sums a tensor over
    both (the all-reduce of a process group, in one process); returns both results."""
    import threading

    slots: list = [None, None]
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def reduce(tensor, rank):
        slots[rank] = tensor
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()  # both read the sum before the next call overwrites a slot
        return total

    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, work(r, lambda x: reduce(x, r))))
               for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whitening_split_over_two_processes_equals_the_whole_batch(shift_mean):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:3, 0] = 1  # each half holds tokens, in unequal numbers
    whole = masked_whiten(x, mask, shift_mean=shift_mean)
    halves = _two_processes(lambda r, reduce: masked_whiten(x[3 * r:3 * r + 3], mask[3 * r:3 * r + 3],
                                                            shift_mean=shift_mean, reduce=reduce))
    assert torch.allclose(torch.cat(halves), whole, atol=1e-6)
    alone = masked_whiten(x[:3], mask[:3], shift_mean=shift_mean)  # what a process would do by itself
    assert not torch.allclose(alone, whole[:3], atol=1e-3)


def test_running_moments_fold_in_the_whole_batch_and_normalise_this_share():
    a, b = RunningMoments(), RunningMoments()
    batch = t([1.0, 2.0, 4.0, 9.0])
    whole = a.normalise(batch)
    share = b.normalise(batch[2:], batch)  # the second process's rows, the batch from every process
    assert torch.allclose(share, whole[2:]) and (a.mean, a.count) == (b.mean, b.count) == (4.0, 4)


def test_a_process_takes_an_even_contiguous_share_topped_up_from_the_start():
    from lathe.distributed import Peers

    def share(items, rank, world):
        peers = Peers.__new__(Peers)
        peers.rank, peers.world = rank, world
        return peers.shard(items)

    assert [share(list(range(8)), r, 2) for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [share([5, 6, 7], r, 2) for r in (0, 1)] == [[5, 6], [7, 5]]  # the last batch of an epoch
    assert [share([9], r, 3) for r in (0, 1, 2)] == [[9], [9], [9]]
    assert share([1, 2, 3], 0, 1) == [1, 2, 3]
