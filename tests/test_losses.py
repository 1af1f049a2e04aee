"""Tests for minirlhf.losses, in three layers.

1. Hand-computed numbers: DPO is log 2 (hinge 1, IPO (1/(2β))²) when the policy equals
   the reference; Bradley-Terry is log 2 for equal rewards; a three-step GAE worked by
   hand; PPO's loss is −mean(A) at ratio 1; a tiny SFT example; token log-probs against
   log_softmax + gather.
2. Properties and references: gae against the naive gae_reference on random masks;
   GAE with λ=1 is the discounted return minus the value, with λ=0 the TD error; the
   K-wise ranking loss against Bradley-Terry (K=2) and explicit pair enumeration (K=4);
   k1 and k3 unbiased for an exact categorical KL (Monte Carlo), k3 ≥ 0 and accurate in
   float32 for tiny d; where kl_penalized_rewards puts the score; DPO's gradient signs;
   cDPO/robust reduce to DPO at ε=0; masking ignores padding (even inf/NaN); clipping
   zeroes PPO gradients where it binds; the adaptive KL controller; invalid arguments.
3. Gradients: torch.autograd.gradcheck in float64 for every loss, and finite losses and
   gradients at extreme margins (±1e4).
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from minirlhf.losses import (
    DPO_LOSS_TYPES,
    AdaptiveKLController,
    bradley_terry_loss,
    dpo_loss,
    gae,
    ### BEGIN INSTRUCTOR ONLY
    gae_reference,
    ### END INSTRUCTOR ONLY
    kl_penalized_rewards,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_ptx_loss,
    ppo_value_loss,
    ranking_loss,
    sft_loss,
    token_logprobs,
)

LOG2 = math.log(2.0)


def response_mask(starts, ends, T):
    """(B, T) float mask with ones on [start, end) of each row."""
    positions = torch.arange(T)  # (T,)
    starts, ends = torch.tensor(starts)[:, None], torch.tensor(ends)[:, None]  # (B, 1)
    return ((positions >= starts) & (positions < ends)).double()  # (B, T)


def random_mask(generator, B, T):
    """One contiguous run per row, with random start (prompt) and end (padding)."""
    starts = torch.randint(0, T // 2, (B,), generator=generator)
    lengths = torch.randint(1, T // 2 + 1, (B,), generator=generator)
    return response_mask(starts.tolist(), (starts + lengths).tolist(), T)


def assert_all_float_metrics(metrics):
    assert metrics, "metrics must not be empty"
    for name, value in metrics.items():
        assert type(value) is float, f"{name} is {type(value).__name__}, not float"


# ---------------------------------------------------------------------------------------
# Layer 1: hand-computed numbers.


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_dpo_is_log2_when_policy_equals_reference(loss_type, label_smoothing):
    logps = torch.tensor([-3.0, -7.5, -1.2])
    other = torch.tensor([-4.0, -2.0, -9.0])
    loss, metrics = dpo_loss(logps, other, logps, other, beta=0.1, loss_type=loss_type,
                             label_smoothing=label_smoothing)
    assert loss.item() == pytest.approx(LOG2, rel=1e-6)
    assert metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # ties are not correct
    assert_all_float_metrics(metrics)


def test_dpo_hinge_and_ipo_when_policy_equals_reference():
    logps, other = torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -2.0])
    hinge, _ = dpo_loss(logps, other, logps, other, beta=0.1, loss_type="hinge")
    assert hinge.item() == pytest.approx(1.0)  # relu(1 − β·0)
    ipo, _ = dpo_loss(logps, other, logps, other, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((1 / (2 * 0.1)) ** 2)  # (0 − 5)² = 25


def test_dpo_metrics_hand_computed():
    # chosen log-ratios 2 and −1, rejected log-ratios 0 and 1, β = 0.5.
    loss, metrics = dpo_loss(torch.tensor([-1.0, -4.0]), torch.tensor([-5.0, -2.0]),
                             torch.tensor([-3.0, -3.0]), torch.tensor([-5.0, -3.0]), beta=0.5)
    assert metrics["rewards/chosen"] == pytest.approx((1.0 - 0.5) / 2)  # mean(1, −0.5)
    assert metrics["rewards/rejected"] == pytest.approx((0.0 + 0.5) / 2)  # mean(0, 0.5)
    assert metrics["rewards/margins"] == pytest.approx(0.0)  # mean(1, −1)
    assert metrics["rewards/accuracies"] == 0.5
    # βh = (1, −1): mean(−log σ(1), −log σ(−1)).
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert loss.item() == pytest.approx(expected)
    assert metrics["loss/dpo"] == pytest.approx(expected)


def test_bradley_terry_equal_rewards_is_log2():
    rewards = torch.tensor([0.3, -2.0, 5.0])
    loss, metrics = bradley_terry_loss(rewards, rewards.clone())
    assert loss.item() == pytest.approx(LOG2)
    assert metrics["accuracy"] == 0.0
    assert metrics["rewards/margins"] == 0.0
    assert_all_float_metrics(metrics)


def test_bradley_terry_hand_computed():
    loss, metrics = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    # margins (1, −1): mean(log(1 + e^−1), log(1 + e^1)).
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2)
    assert metrics["accuracy"] == 0.5
    assert metrics["rewards/chosen"] == pytest.approx(1.0)
    assert metrics["rewards/rejected"] == pytest.approx(1.0)


def test_gae_three_steps_by_hand():
    # γ = 0.9, λ = 0.8, so γλ = 0.72; rewards (1, 0, 2), values (0.5, 1.0, 1.5).
    # δ2 = 2 + 0.9·0   − 1.5 = 0.5   (the episode ends: bootstrap 0)
    # δ1 = 0 + 0.9·1.5 − 1.0 = 0.35
    # δ0 = 1 + 0.9·1.0 − 0.5 = 1.4
    # A2 = 0.5;  A1 = 0.35 + 0.72·0.5 = 0.71;  A0 = 1.4 + 0.72·0.71 = 1.9112
    # R  = A + V = (2.4112, 1.71, 2.0)
    expected_adv = torch.tensor([[1.9112, 0.71, 0.5]], dtype=torch.float64)
    expected_ret = torch.tensor([[2.4112, 1.71, 2.0]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 1.5]], dtype=torch.float64)
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)

    # The same episode after two prompt tokens and before two padding tokens, with
    # junk rewards and values off the mask: same numbers on the run, 0 elsewhere.
    junk = 1e6
    rewards = torch.tensor([[junk, junk, 1.0, 0.0, 2.0, junk, junk]], dtype=torch.float64)
    values = torch.tensor([[junk, junk, 0.5, 1.0, 1.5, junk, junk]], dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    torch.testing.assert_close(adv, torch.cat([zeros, expected_adv, zeros], dim=1))
    torch.testing.assert_close(ret, torch.cat([zeros, expected_ret, zeros], dim=1))


def test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    advantages = torch.tensor([[1.0, -3.0, 0.5, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask)
    assert loss.item() == pytest.approx(-(1.0 - 3.0 + 0.5) / 3)
    assert metrics["policy/clipfrac"] == 0.0
    assert metrics["policy/approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["policy/ratio_mean"] == pytest.approx(1.0)
    assert_all_float_metrics(metrics)


def test_ppo_value_loss_hand_computed():
    # v − old = (0.1, 0.5): the first is inside ε = 0.2, the second clips to 0.2.
    values = torch.tensor([[1.1, 0.5]])
    old_values = torch.tensor([[1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, metrics = ppo_value_loss(values, old_values, returns, torch.ones(1, 2))
    # token 0: max((1.1−2)², (1.1−2)²) = 0.81; token 1: max(0.5², 0.2²) = 0.25.
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.25) / 2)
    assert metrics["val/clipfrac"] == 0.0
    assert metrics["val/mean"] == pytest.approx(0.8)
    assert_all_float_metrics(metrics)


def test_sft_loss_tiny_example():
    # V = 2. Position 0: logits (0, 0), p(target) = 1/2. Position 1: logits (0, ln 3),
    # target 1, p = 3/4. Position 2 is masked out and carries a hopeless prediction.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [50.0, -50.0]]])
    targets = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[True, True, False]])
    loss, metrics = sft_loss(logits, targets, mask)
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss/sft"] == pytest.approx(expected, rel=1e-6)
    assert metrics["sft/tokens"] == 2.0
    assert_all_float_metrics(metrics)


def test_token_logprobs_matches_log_softmax_gather():
    generator = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(3, 4, 11, generator=generator)
    targets = torch.randint(0, 11, (3, 4), generator=generator)
    ### BEGIN INSTRUCTOR ONLY
    expected = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, targets), expected)
    # And one entry by hand, in float64.
    logits64 = logits.double()
    hand = logits64[1, 2, targets[1, 2]] - torch.log(torch.exp(logits64[1, 2]).sum())
    assert token_logprobs(logits, targets)[1, 2].item() == pytest.approx(hand.item(), rel=1e-5)
    ### END INSTRUCTOR ONLY
    # Properties (the student copy keeps only these): over every target the probabilities sum
    # to one, and adding a constant to a position's logits changes nothing.
    every = logits.unsqueeze(2).expand(3, 4, 11, 11).reshape(3, 44, 11)  # (B, T·V, V)
    all_targets = torch.arange(11).repeat(3, 4)  # (B, T·V)
    total = token_logprobs(every, all_targets).reshape(3, 4, 11).exp().sum(-1)  # (B, T)
    torch.testing.assert_close(total, torch.ones(3, 4))
    torch.testing.assert_close(token_logprobs(logits + 7.0, targets), token_logprobs(logits, targets))


# ---------------------------------------------------------------------------------------
# Layer 2: properties and references.


### BEGIN INSTRUCTOR ONLY
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (0.8, 0.0)])
def test_gae_matches_reference_on_random_masks(gamma, lam):
    generator = torch.Generator().manual_seed(1)
    B, T = 6, 12
    rewards = torch.randn(B, T, generator=generator, dtype=torch.float64)
    values = torch.randn(B, T, generator=generator, dtype=torch.float64)
    mask = random_mask(generator, B, T)
    assert len({tuple(row.tolist()) for row in mask}) > 2, "want varied runs"
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
### END INSTRUCTOR ONLY


def test_gae_lambda_one_is_discounted_return_minus_value():
    generator = torch.Generator().manual_seed(2)
    B, T, gamma = 4, 9, 0.9
    rewards = torch.randn(B, T, generator=generator, dtype=torch.float64)
    values = torch.randn(B, T, generator=generator, dtype=torch.float64)
    mask = random_mask(generator, B, T)
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for b in range(B):
        run = mask[b].nonzero().flatten().tolist()
        for k, t in enumerate(run):
            discounted = sum(gamma**i * rewards[b, s].item() for i, s in enumerate(run[k:]))
            assert adv[b, t].item() == pytest.approx(discounted - values[b, t].item())


def test_gae_lambda_zero_is_td_error():
    generator = torch.Generator().manual_seed(3)
    B, T, gamma = 4, 9, 0.9
    rewards = torch.randn(B, T, generator=generator, dtype=torch.float64)
    values = torch.randn(B, T, generator=generator, dtype=torch.float64)
    mask = random_mask(generator, B, T)
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(B, 1)], dim=1)  # (B, T)
    td_error = (rewards + gamma * next_values - values) * mask  # (B, T)
    torch.testing.assert_close(adv, td_error)


def test_ranking_loss_with_two_responses_is_bradley_terry():
    rewards = torch.tensor([[1.0, -0.5], [0.2, 0.7], [3.0, 3.0]])
    rank, rank_metrics = ranking_loss(rewards)
    bt, bt_metrics = bradley_terry_loss(rewards[:, 0], rewards[:, 1])
    assert rank.item() == pytest.approx(bt.item())
    assert rank_metrics["accuracy"] == pytest.approx(bt_metrics["accuracy"])
    assert_all_float_metrics(rank_metrics)


def test_ranking_loss_matches_pair_enumeration():
    generator = torch.Generator().manual_seed(4)
    rewards = torch.randn(5, 4, generator=generator)
    loss, metrics = ranking_loss(rewards)
    pairs = list(itertools.combinations(range(4), 2))
    assert len(pairs) == 6
    per_row = [
        sum(math.log1p(math.exp(-(row[i] - row[j]))) for i, j in pairs) / len(pairs)
        for row in rewards.tolist()
    ]
    correct = [row[i] > row[j] for row in rewards.tolist() for i, j in pairs]
    assert loss.item() == pytest.approx(sum(per_row) / len(per_row), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(sum(correct) / len(correct))


def test_kl_estimators_k1_and_k3_are_unbiased():
    generator = torch.Generator().manual_seed(5)
    pi = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    pi_ref = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    exact_kl = (pi * (pi / pi_ref).log()).sum().item()
    n = 200_000
    samples = torch.multinomial(pi, n, replacement=True, generator=generator)  # (n,)
    logprobs, ref_logprobs = pi.log()[samples][None], pi_ref.log()[samples][None]  # (1, n)
    for estimator in ("k1", "k3"):
        estimates = kl_penalty(logprobs, ref_logprobs, estimator)
        standard_error = estimates.std().item() / math.sqrt(n)
        assert abs(estimates.mean().item() - exact_kl) < 4 * standard_error, f"{estimator}"
    # k2 is biased: its mean is far from the KL by many standard errors.
    k2 = kl_penalty(logprobs, ref_logprobs, "k2")
    assert abs(k2.mean().item() - exact_kl) > 10 * k2.std().item() / math.sqrt(n)


def test_kl_estimators_hand_values():
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -1.0]])
    # d = (1, −1)
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k2"), torch.tensor([[0.5, 0.5]]))
    k3 = torch.tensor([[math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1]])
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k3"), k3)


def test_k3_is_nonnegative_including_extremes():
    generator = torch.Generator().manual_seed(6)
    d = torch.cat([
        torch.randn(1000, generator=generator) * 10,
        torch.randn(1000, generator=generator) * 1e-6,
        torch.tensor([0.0, 1e-30, -1e-30, 0.5, -0.5, 0.4999, 80.0, -80.0, 1e4, -1e4]),
    ])[None]  # (1, N)
    k3 = kl_penalty(d, torch.zeros_like(d), "k3")
    assert (k3 >= 0).all()
    assert not k3.isnan().any()


def test_k3_is_accurate_in_float32_for_tiny_d():
    d64 = torch.tensor([1e-7, -1e-7, 3e-7, 1e-6, -1e-6, 1e-5, 1e-4, -1e-4, 1e-2, 0.3, -0.45,
                        0.55, 2.0], dtype=torch.float64)
    d32 = d64.float()
    # Exact for the float32 input, via the series (float64, many terms) and expm1 for large d.
    x = -d32.double()
    exact = torch.where(x.abs() < 0.1, sum(x**n / math.factorial(n) for n in range(2, 16)),
                        torch.expm1(x) - x)
    k3 = kl_penalty(d32[None], torch.zeros_like(d32)[None], "k3")[0]
    assert k3.dtype == torch.float32
    torch.testing.assert_close(k3.double(), exact, rtol=1e-6, atol=0.0)


def test_kl_penalized_rewards_puts_scores_at_last_masked_position():
    generator = torch.Generator().manual_seed(7)
    B, T = 4, 7
    logprobs = torch.randn(B, T, generator=generator, dtype=torch.float64)
    ref_logprobs = torch.randn(B, T, generator=generator, dtype=torch.float64)
    mask = response_mask([2, 0, 3, 0], [5, 7, 4, 0], T)  # the last row is empty
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64)
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    expected = -0.1 * (logprobs - ref_logprobs) * mask  # (B, T)
    expected[0, 4] += 10.0
    expected[1, 6] += 20.0
    expected[2, 3] += 30.0
    torch.testing.assert_close(rewards, expected)
    assert (rewards[mask == 0] == 0).all()


def test_kl_penalized_rewards_ignores_inf_off_mask():
    logprobs = torch.tensor([[float("inf"), -1.0, -2.0, float("-inf")]])
    ref_logprobs = torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    rewards = kl_penalized_rewards(torch.tensor([1.0]), logprobs, ref_logprobs, mask, 0.5, "k3")
    assert torch.isfinite(rewards).all()
    assert rewards[0, 0] == 0 and rewards[0, 3] == 0


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    for loss_type in DPO_LOSS_TYPES:
        chosen = torch.tensor([-5.0, -3.0], requires_grad=True)
        rejected = torch.tensor([-4.0, -6.0], requires_grad=True)
        loss, _ = dpo_loss(chosen, rejected, torch.tensor([-5.0, -4.0]),
                           torch.tensor([-4.0, -5.0]), beta=0.1, loss_type=loss_type)
        loss.backward()
        # Gradient descent moves against the gradient: up for chosen, down for rejected.
        assert (chosen.grad < 0).all(), f"{loss_type}"
        assert (rejected.grad > 0).all(), f"{loss_type}"


def test_dpo_ipo_has_its_minimum_at_margin_one_over_two_beta():
    beta = 0.25
    ref = torch.zeros(1)
    at_target, _ = dpo_loss(torch.tensor([2.0]), ref, ref, ref, beta=beta, loss_type="ipo")
    beyond, _ = dpo_loss(torch.tensor([4.0]), ref, ref, ref, beta=beta, loss_type="ipo")
    assert at_target.item() == 0.0
    assert beyond.item() == pytest.approx(4.0)  # IPO, unlike DPO, punishes overshooting


def test_cdpo_and_robust_reduce_to_sigmoid_at_zero_smoothing():
    generator = torch.Generator().manual_seed(8)
    logps = [torch.randn(6, generator=generator) for _ in range(4)]
    sigmoid, _ = dpo_loss(*logps, beta=0.3)
    robust, _ = dpo_loss(*logps, beta=0.3, loss_type="robust", label_smoothing=0.0)
    torch.testing.assert_close(robust, sigmoid)
    # With ε > 0 both differ from plain DPO, and cDPO is the ε-mixture of both labels.
    eps = 0.2
    cdpo, _ = dpo_loss(*logps, beta=0.3, label_smoothing=eps)
    flipped, _ = dpo_loss(logps[1], logps[0], logps[3], logps[2], beta=0.3)
    torch.testing.assert_close(cdpo, (1 - eps) * sigmoid + eps * flipped)
    robust_eps, _ = dpo_loss(*logps, beta=0.3, loss_type="robust", label_smoothing=eps)
    torch.testing.assert_close(robust_eps, ((1 - eps) * sigmoid - eps * flipped) / (1 - 2 * eps))


def test_masked_whiten_standardises_on_the_mask_and_ignores_padding():
    generator = torch.Generator().manual_seed(9)
    x = 3.0 + 5.0 * torch.randn(4, 10, generator=generator, dtype=torch.float64)
    mask = random_mask(generator, 4, 10)
    whitened = masked_whiten(x, mask)
    on = mask > 0
    assert whitened[on].mean().item() == pytest.approx(0.0, abs=1e-9)
    assert whitened[on].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert (whitened[~on] == 0).all()
    padded = x.clone()
    padded[~on] = 1e30
    torch.testing.assert_close(masked_whiten(padded, mask), whitened)
    # shift_mean=False keeps the mean and only rescales.
    scaled = masked_whiten(x, mask, shift_mean=False)
    assert scaled[on].mean().item() == pytest.approx(x[on].mean().item())
    assert scaled[on].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_masked_mean_ignores_padding_values():
    x = torch.tensor([[1.0, 2.0, 1e30, float("inf")], [float("nan"), 4.0, 6.0, -1e30]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0]))
    torch.testing.assert_close(masked_mean(x, mask.float(), dim=1), torch.tensor([1.5, 5.0]))


def test_masked_mean_of_empty_mask_is_zero():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([0.0, 3.0]))
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0


def test_ppo_policy_loss_has_zero_gradient_where_the_clip_binds():
    eps = 0.2
    old = torch.zeros(1, 4, dtype=torch.float64)
    # ratios 1.5 (A>0), 0.5 (A<0): clipped, no gradient; 0.5 (A>0), 1.5 (A<0): not clipped.
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    logprobs = ratios.log().requires_grad_()
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, torch.ones(1, 4), clip_eps=eps)
    loss.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 1] == 0
    # Unclipped tokens: d(−A·ρ)/dlogρ / 4 tokens = −A·ρ/4.
    torch.testing.assert_close(logprobs.grad[0, 2:], torch.tensor([-0.5 / 4, 1.5 / 4],
                                                                dtype=torch.float64))
    assert metrics["policy/clipfrac"] == 0.5
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 0.5, 1.5)) / 4
    assert metrics["policy/approx_kl"] == pytest.approx(expected_kl)


def test_ppo_value_loss_has_zero_gradient_where_the_clip_binds():
    old = torch.zeros(1, 2, dtype=torch.float64)
    values = torch.tensor([[1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    # Token 0: R = 0.9; v_clip = 0.2 is further from R than v = 1: the clipped term binds.
    # Token 1: R = −1; v = 1 is further than v_clip = 0.2: the unclipped term binds.
    returns = torch.tensor([[0.9, -1.0]], dtype=torch.float64)
    loss, metrics = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * ((0.2 - 0.9) ** 2 + (1.0 + 1.0) ** 2) / 2)
    loss.backward()
    assert values.grad[0, 0] == 0
    assert values.grad[0, 1].item() == pytest.approx(0.5 * 2 * (1.0 + 1.0) / 2)
    assert metrics["val/clipfrac"] == 0.5


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    assert controller.value == 0.1
    # KL a little above target: e = 7/6 − 1, unclipped.
    new = controller.update(current_kl=7.0, n_steps=100)
    assert new == pytest.approx(0.1 * (1 + (7 / 6 - 1) * 100 / 10_000))
    assert controller.value == new
    # Far above target: e is clipped at +0.2.
    before = controller.value
    assert controller.update(60.0, 100) == pytest.approx(before * (1 + 0.2 * 100 / 10_000))
    # Far below target: e is clipped at −0.2, and the coefficient falls.
    before = controller.value
    assert controller.update(0.0, 100) == pytest.approx(before * (1 - 0.2 * 100 / 10_000))
    assert controller.value < before
    # On target: no change.
    before = controller.value
    assert controller.update(6.0, 100) == pytest.approx(before)


def test_invalid_arguments_raise_value_error():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(x[None], x[None], estimator="k4")
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="K"):
        ranking_loss(torch.zeros(3, 1))
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=100)


# ---------------------------------------------------------------------------------------
# Layer 3: gradients.


def _randn(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()


def test_gradcheck_sft_loss():
    logits = _randn(2, 3, 5, seed=10)
    targets = torch.tensor([[0, 4, 2], [1, 1, 3]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: sft_loss(z, targets, mask)[0], (logits,))


def test_gradcheck_reward_losses():
    chosen, rejected = _randn(4, seed=11), _randn(4, seed=12)
    assert torch.autograd.gradcheck(lambda c, r: bradley_terry_loss(c, r)[0], (chosen, rejected))
    assert torch.autograd.gradcheck(lambda r: ranking_loss(r)[0], (_randn(3, 4, seed=13),))


def test_gradcheck_ppo_losses():
    B, T = 2, 5
    mask = response_mask([0, 1], [4, 5], T)
    old, advantages = _randn(B, T, seed=14).detach(), _randn(B, T, seed=15).detach()
    # Log-ratios of ±0.5 put some tokens outside the clip range; none sit on its edge.
    logprobs = (old + 0.5 * _randn(B, T, seed=16).detach()).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda lp: ppo_policy_loss(lp, old, advantages, mask)[0], (logprobs,))
    values, returns = _randn(B, T, seed=17), _randn(B, T, seed=18).detach()
    assert torch.autograd.gradcheck(
        lambda v: ppo_value_loss(v, old, returns, mask)[0], (values,))


@pytest.mark.parametrize("loss_type, label_smoothing",
                         [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0),
                          ("ipo", 0.0)])
def test_gradcheck_dpo(loss_type, label_smoothing):
    # β = 1 and unit-variance log-probs keep βh away from the hinge's kink at 1.
    inputs = tuple(_randn(4, seed=20 + i) for i in range(4))
    assert torch.autograd.gradcheck(
        lambda *x: dpo_loss(*x, beta=1.0, loss_type=loss_type,
                            label_smoothing=label_smoothing)[0], inputs)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_gradcheck_kl_penalized_rewards(estimator):
    B, T = 2, 5
    mask = response_mask([1, 0], [4, 3], T)
    scores, logprobs, ref_logprobs = _randn(B, seed=30), _randn(B, T, seed=31), _randn(B, T, seed=32)
    assert torch.autograd.gradcheck(
        lambda s, lp, rp: kl_penalized_rewards(s, lp, rp, mask, 0.1, estimator),
        (scores, logprobs, ref_logprobs))


def test_gradcheck_k3_near_zero():
    d = (1e-3 * _randn(6, seed=33)).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kl_penalty(x, torch.zeros_like(x), "k3"), (d,))


def _assert_finite(loss, *inputs):
    loss.backward()
    assert torch.isfinite(loss), f"{loss}"
    for tensor in inputs:
        assert torch.isfinite(tensor.grad).all(), f"{tensor.grad}"


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_margins_are_finite(sign):
    big = sign * 1e4
    chosen, rejected = torch.tensor([big, 0.0], requires_grad=True), torch.zeros(2, requires_grad=True)
    _assert_finite(bradley_terry_loss(chosen, rejected)[0], chosen, rejected)

    rewards = torch.tensor([[big, 0.0, -big], [0.0, big, 0.0]], requires_grad=True)
    _assert_finite(ranking_loss(rewards)[0], rewards)

    for loss_type, eps in [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0),
                           ("ipo", 0.0)]:
        # βh = ±1e4 with β = 1.
        policy_chosen = torch.tensor([big, -3.0], requires_grad=True)
        policy_rejected = torch.tensor([0.0, -2.0], requires_grad=True)
        zeros = torch.zeros(2)
        loss, metrics = dpo_loss(policy_chosen, policy_rejected, zeros, zeros, beta=1.0,
                                 loss_type=loss_type, label_smoothing=eps)
        _assert_finite(loss, policy_chosen, policy_rejected)
        assert all(math.isfinite(v) for v in metrics.values())

    logits = torch.tensor([[[big, 0.0, -big], [0.0, big, 0.0]]], requires_grad=True)
    targets = torch.tensor([[2, 0]])
    _assert_finite(sft_loss(logits, targets, torch.ones(1, 2))[0], logits)


### BEGIN HIDDEN TESTS
# ---------------------------------------------------------------------------------------
# Hidden tests: more hand-computed cases, in the instructor's copy only (the student copy
# leaves this region out; `python -m minirlhf grade` runs it). See minirlhf/exercises.py.


def test_hidden_token_logprobs_three_way_softmax():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    # log(e³ / (e + e² + e³)) = −log(1 + e⁻¹ + e⁻²); a uniform row gives −log 3.
    expected = torch.tensor([[-math.log(1 + math.exp(-1) + math.exp(-2)), -math.log(3.0)]])
    torch.testing.assert_close(token_logprobs(logits, torch.tensor([[2, 0]])), expected)


def test_hidden_sft_loss_is_a_token_mean_not_a_row_mean():
    # Row 0: one token with p = 1/2 (then junk under the mask); row 1: two tokens with p = 3/4.
    logits = torch.tensor([[[0.0, 0.0], [50.0, -50.0]],
                           [[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    targets = torch.tensor([[0, 1], [1, 1]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss, metrics = sft_loss(logits, targets, mask)
    assert loss.item() == pytest.approx((math.log(2.0) + 2 * math.log(4.0 / 3.0)) / 3, rel=1e-6)
    assert metrics["sft/tokens"] == 3.0


def test_hidden_ranking_loss_two_rows_by_hand():
    # Row 0 is ordered (margins 1, 2, 1), row 1 reversed (margins −1, −2, −1).
    loss, metrics = ranking_loss(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]))
    row0 = (2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 3
    row1 = (2 * math.log1p(math.exp(1)) + math.log1p(math.exp(2))) / 3
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(0.5)


def test_hidden_kl_penalized_rewards_k2_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    # Row 0: d = (0.5, −1), k2 = (0.125, 0.5), times −0.2, score 1 at position 1.
    # Row 1: position 0 is off the mask; d = 0 on the run; score −2 at position 2.
    rewards = kl_penalized_rewards(torch.tensor([1.0, -2.0]), logprobs, ref_logprobs, mask, 0.2, "k2")
    torch.testing.assert_close(rewards, torch.tensor([[-0.025, 0.9, 0.0], [0.0, 0.0, -2.0]]))


def test_hidden_gae_two_rows_by_hand():
    junk = 1e6
    rewards = torch.tensor([[0.0, 1.0, junk], [junk, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, junk], [junk, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    # γ = 1, λ = 0.5. Row 0: δ1 = 1 − 0.25 = 0.75, δ0 = 0.25 − 0.5 = −0.25, A0 = −0.25 + 0.5·0.75.
    # Row 1: δ2 = 2 − 1 = 1, δ1 = 1 − 1 = 0, A1 = 0 + 0.5·1.
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.125, 0.75, 0.0], [0.0, 0.5, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.625, 1.0, 0.0], [0.0, 1.5, 2.0]], dtype=torch.float64))


def test_hidden_dpo_variants_by_hand():
    # h = (−1 − 0) − (−3 − 0) = 2 and β = 0.5, so βh = 1.
    args = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.zeros(1), torch.zeros(1)
    agree, disagree = math.log1p(math.exp(-1)), math.log1p(math.exp(1))  # −log σ(1), −log σ(−1)
    cdpo, metrics = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert cdpo.item() == pytest.approx(0.9 * agree + 0.1 * disagree, rel=1e-6)
    robust, _ = dpo_loss(*args, beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert robust.item() == pytest.approx((0.9 * agree - 0.1 * disagree) / 0.8, rel=1e-6)
    assert dpo_loss(*args, beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.0)
    assert dpo_loss(*args, beta=0.5, loss_type="ipo")[0].item() == pytest.approx((2 - 1) ** 2)
    assert metrics["rewards/chosen"] == pytest.approx(-0.5)
    assert metrics["rewards/rejected"] == pytest.approx(-1.5)
    assert metrics["rewards/margins"] == pytest.approx(1.0)
    assert metrics["rewards/accuracies"] == 1.0
### END HIDDEN TESTS


def test_ppo_ptx_loss_adds_gamma_times_the_token_mean_nll():
    # NLL of p = 1/2 and p = 3/4 on the two masked tokens; the third is off the mask.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [50.0, -50.0]]])
    targets, mask = torch.tensor([[0, 1, 1]]), torch.tensor([[1.0, 1.0, 0.0]])
    nll = (math.log(2.0) + math.log(4 / 3)) / 2
    loss, metrics = ppo_ptx_loss(torch.tensor(0.3), logits, targets, mask, ptx_coef=0.5)
    assert loss.item() == pytest.approx(0.3 + 0.5 * nll) and metrics["loss/ptx"] == pytest.approx(nll)
    loss, _ = ppo_ptx_loss(torch.tensor(-1.25), logits, targets, mask, ptx_coef=0.0)
    assert loss.item() == pytest.approx(-1.25)


def test_gradcheck_ppo_ptx_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rl = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    targets, mask = torch.randint(0, 5, (2, 4), generator=g), torch.tensor([[0.0, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.autograd.gradcheck(lambda r, z: ppo_ptx_loss(r, z, targets, mask, 0.7)[0], (rl, logits))
