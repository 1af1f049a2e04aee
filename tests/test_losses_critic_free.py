"""The critic-free losses: group_advantages, rloo_advantages, masked_aggregate and the
clip_eps_high / aggregation extension of ppo_policy_loss.

Three layers (STYLE.md rule 7): hand-computed advantages for one group of four; properties
(GRPO and Dr. GRPO advantages sum to zero per group, RLOO is G/(G−1)·(r − mean), equal
rewards give zero advantages and zero gradient, sequence and token aggregation agree when
every response has the same length, clip_eps_high=None is today's loss bit for bit, an
empty row gives no NaN); and each vectorised function against its naive loop in losses.py
(instructor only: the loops would hand a student the answer).
"""
import math

import pytest
import torch

from minirlhf.losses import (
    group_advantages,
    ### BEGIN INSTRUCTOR ONLY
    group_advantages_reference,
    masked_aggregate_reference,
    rloo_advantages_reference,
    ### END INSTRUCTOR ONLY
    masked_aggregate,
    masked_mean,
    ppo_policy_loss,
    rloo_advantages,
)

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 3.0]], dtype=torch.float64)  # one group of G = 4


def _random_mask(B, T, generator, allow_empty=True):
    """A contiguous response run per row, after a random prompt, maybe empty."""
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        start = int(torch.randint(0, T, (1,), generator=generator))
        length = int(torch.randint(0 if allow_empty else 1, T - start + 1, (1,), generator=generator))
        mask[b, start:start + length] = 1
    return mask


# ---------------------------------------------------------------------------------------
# Hand-computed: rewards (1, 0, 0, 3), mean 1, deviations (0, −1, −1, 2),
# population variance (0 + 1 + 1 + 4)/4 = 1.5, unbiased variance 6/3 = 2.


def test_group_advantages_by_hand():
    dr = group_advantages(REWARDS, scale_std=False)
    assert dr.tolist() == [[0.0, -1.0, -1.0, 2.0]]
    grpo = group_advantages(REWARDS, eps=0.0)
    s = math.sqrt(1.5)
    assert grpo[0].tolist() == pytest.approx([0.0, -1 / s, -1 / s, 2 / s], abs=1e-12)
    trl = group_advantages(REWARDS, eps=0.0, unbiased=True)  # TRL's convention: divide by G − 1
    assert trl[0].tolist() == pytest.approx([0.0, -1 / math.sqrt(2), -1 / math.sqrt(2), math.sqrt(2)], abs=1e-12)
    # the two conventions differ by √((G−1)/G) = √(3/4)
    assert (trl / grpo)[0, 1:].tolist() == pytest.approx([math.sqrt(3 / 4)] * 3, abs=1e-12)


def test_rloo_advantages_by_hand():
    # leave-one-out means: (0+0+3)/3 = 1, (1+0+3)/3 = 4/3, 4/3, (1+0+0)/3 = 1/3
    assert rloo_advantages(REWARDS)[0].tolist() == pytest.approx([0.0, -4 / 3, -4 / 3, 8 / 3], abs=1e-12)


def test_aggregations_by_hand():
    # row 0: tokens (1, 3) -> mean 2; row 1: token (6) -> mean 6; the 100 is off the mask.
    x = torch.tensor([[1.0, 3.0, 100.0], [6.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_aggregate(x, mask, "token").item() == pytest.approx(10 / 3)      # (1+3+6)/3
    assert masked_aggregate(x, mask, "sequence").item() == pytest.approx(4.0)      # (2+6)/2
    assert masked_aggregate(x, mask, "constant", max_tokens=5).item() == pytest.approx(1.0)  # 10/(2·5)


# ---------------------------------------------------------------------------------------
# Properties


def test_group_advantages_sum_to_zero_per_group():
    rewards = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for scale_std in (True, False):
        sums = group_advantages(rewards, scale_std=scale_std).sum(1)
        assert sums.abs().max() < 1e-12
    # GRPO's advantages have (population) std 1 within each group, up to eps
    assert torch.allclose(group_advantages(rewards, eps=0.0).std(1, correction=0),
                          torch.ones(50, dtype=torch.float64))


def test_rloo_is_g_over_g_minus_1_times_dr_grpo():
    for G in (2, 3, 8):
        rewards = torch.randn(20, G, generator=torch.Generator().manual_seed(G), dtype=torch.float64)
        assert torch.allclose(rloo_advantages(rewards), G / (G - 1) * group_advantages(rewards, scale_std=False))


def test_equal_rewards_give_zero_advantages_and_zero_gradient():
    # 0.1 three times: in float64 the mean is 0.1 + 1 ulp, so r − mean would not be exactly 0
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3], [0.0, 1.0, 0.2]], dtype=torch.float64)
    methods = {"grpo": group_advantages, "dr_grpo": lambda r: group_advantages(r, scale_std=False),
               "grpo_unbiased": lambda r: group_advantages(r, unbiased=True), "rloo": rloo_advantages}
    for name, fn in methods.items():
        advantages = fn(rewards)
        assert advantages[:2].eq(0).all() and advantages[2].ne(0).all(), name
        # the loss of those groups' tokens has zero gradient: they teach nothing
        logprobs = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
        loss, _ = ppo_policy_loss(logprobs, logprobs.detach(), advantages[:, :1].expand(3, 4), torch.ones(3, 4))
        loss.backward()
        assert logprobs.grad[:2].eq(0).all() and logprobs.grad[2].ne(0).all(), name


def test_rloo_refuses_a_group_of_one():
    with pytest.raises(ValueError, match="G >= 2"):
        rloo_advantages(torch.ones(3, 1))


def test_sequence_and_token_aggregation_agree_when_lengths_are_equal():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.zeros(6, 9, dtype=torch.float64)
    for b in range(6):                      # every row 5 tokens long, at different offsets
        start = int(torch.randint(0, 5, (1,), generator=g))
        mask[b, start:start + 5] = 1
    token = masked_aggregate(x, mask, "token")
    assert torch.allclose(masked_aggregate(x, mask, "sequence"), token)
    assert torch.allclose(masked_aggregate(x, mask, "constant", max_tokens=5), token)


def test_lengths_weigh_differently_under_each_aggregation():
    # the gradient of the aggregate w.r.t. each token is that token's weight
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])   # lengths 4 and 1
    weights = {}
    for name in ("token", "sequence", "constant"):
        x = torch.zeros(2, 4, requires_grad=True)
        masked_aggregate(x, mask, name, max_tokens=4).backward()
        weights[name] = (x.grad[0, 0].item(), x.grad[1, 0].item())
    assert weights["token"] == pytest.approx((1 / 5, 1 / 5))
    assert weights["sequence"] == pytest.approx((1 / 8, 1 / 2))       # the short response's token: 4×
    assert weights["constant"] == pytest.approx((1 / 8, 1 / 8))


def test_clip_eps_high_none_is_todays_loss_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    logprobs = torch.randn(8, 12, generator=g)
    old = logprobs + 0.3 * torch.randn(8, 12, generator=g)
    advantages = torch.randn(8, 12, generator=g)
    mask = _random_mask(8, 12, g).float()
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    # today's formula, written out
    ratio = torch.exp(logprobs - old)
    today = masked_mean(torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 0.8, 1.2)), mask)
    assert torch.equal(loss, today)
    loss2, metrics2 = ppo_policy_loss(logprobs, old, advantages, mask, 0.2, clip_eps_high=None, aggregation="token")
    assert torch.equal(loss2, loss) and metrics2 == metrics


def test_clip_higher_lets_positive_advantages_grow_further():
    # ratio 1.25, A = 1: symmetric ε = 0.2 clips (gradient 0); ε_high = 0.28 does not
    logprobs = torch.full((1, 1), math.log(1.25), requires_grad=True)
    for high, expect_grad in ((None, False), (0.28, True)):
        logprobs.grad = None
        loss, metrics = ppo_policy_loss(logprobs, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2,
                                        clip_eps_high=high)
        loss.backward()
        assert (logprobs.grad.abs().item() > 0) == expect_grad
        assert metrics["policy/clipfrac"] == (0.0 if expect_grad else 1.0)
    # the lower clip is unchanged: ratio 0.75, A = −1 is clipped at 1 − 0.2 either way
    loss, metrics = ppo_policy_loss(torch.full((1, 1), math.log(0.75)), torch.zeros(1, 1), -torch.ones(1, 1),
                                    torch.ones(1, 1), 0.2, clip_eps_high=0.28)
    assert metrics["policy/clipfrac"] == 1.0 and loss.item() == pytest.approx(0.8)


def test_sequence_aggregation_with_an_empty_row_is_finite():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0], [0.0] * 5, [0.0, 1.0, 1.0, 1.0, 0.0]])
    # the empty row counts among the B rows of the sequence mean: (mean_0 + 0 + mean_2) / 3
    x = torch.arange(15.0).view(3, 5)
    # row means: (0+1)/2, empty, (11+12+13)/3
    assert masked_aggregate(x, mask, "sequence").item() == pytest.approx((0.5 + 0 + 12) / 3)
    # and through the loss: finite, and no gradient for the empty row
    logprobs = torch.randn(3, 5, requires_grad=True)
    advantages = torch.randn(3, 5)
    for aggregation in ("sequence", "constant", "token"):
        logprobs.grad = None
        loss, _ = ppo_policy_loss(logprobs, logprobs.detach(), advantages, mask, aggregation=aggregation,
                                  max_tokens=5)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all(), aggregation
        assert logprobs.grad[1].eq(0).all()


def test_unknown_aggregation_and_constant_without_budget_are_errors():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="valid: token, sequence, constant"):
        masked_aggregate(x, mask, "mean")
    with pytest.raises(ValueError, match="max_tokens"):
        masked_aggregate(x, mask, "constant")


# ---------------------------------------------------------------------------------------
# Each vectorised function against its naive loop


### BEGIN INSTRUCTOR ONLY
@pytest.mark.parametrize("G", [2, 3, 5])
def test_advantages_match_naive_loops(G):
    g = torch.Generator().manual_seed(G)
    rewards = torch.randint(0, 3, (40, G), generator=g).double()     # small integers: many equal groups
    rewards[::3] += 0.01 * torch.randn(rewards[::3].shape, generator=g, dtype=torch.float64)
    for kwargs in (dict(), dict(scale_std=False), dict(unbiased=True, eps=1e-4)):
        assert torch.allclose(group_advantages(rewards, **kwargs), group_advantages_reference(rewards, **kwargs))
    assert torch.allclose(rloo_advantages(rewards), rloo_advantages_reference(rewards))


@pytest.mark.parametrize("aggregation", ["sequence", "constant"])   # token is masked_mean, tested in test_losses.py
def test_aggregation_matches_naive_loop(aggregation):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 10, generator=g, dtype=torch.float64)
    mask = _random_mask(7, 10, g)
    expected = masked_aggregate_reference(x, mask, aggregation, max_tokens=10)
    assert masked_aggregate(x, mask, aggregation, max_tokens=10).item() == pytest.approx(expected, abs=1e-12)
### END INSTRUCTOR ONLY
