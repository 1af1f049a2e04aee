"""The ceiling (minirlhf/optimum.py): π*_β ∝ π_ref·exp(g/β), exactly and estimated from samples.

Hand-computed values on a three-response distribution, the sample estimate against the
exact optimum, the two limits (β → ∞: π_ref, KL 0; β → 0: the best sample, KL log N), the
shape of the curve, the Gao et al. fits on synthetic curves with known constants, and the
Best-of-N KL bound against an exact Best-of-N distribution.
"""
import math

import pytest
import torch

from minirlhf.optimum import (best_of_n_kl_bound, ceiling_at, ceiling_curve, fit_gao, optimum_estimate,
                              optimum_exact)

REF = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
GOLD = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)


def test_exact_optimum_by_hand():
    # β = 0.5: unnormalised π* = 0.5·e^0, 0.3·e^1, 0.2·e^2; reward = Σπ*g; KL = E[g]/β − log Z
    weights = [0.5, 0.3 * math.e, 0.2 * math.e ** 2]
    z = sum(weights)
    reward = (weights[1] * 0.5 + weights[2] * 1.0) / z
    kl = reward / 0.5 - math.log(z)
    got_reward, got_kl = optimum_exact(REF.log(), GOLD, 0.5)
    assert got_reward == pytest.approx(reward, abs=1e-12)          # 0.6750…
    assert got_kl == pytest.approx(kl, abs=1e-12)                  # 0.3228…
    assert got_reward == pytest.approx(0.67503, abs=1e-5)
    assert got_kl == pytest.approx(0.32284, abs=1e-5)


def test_sample_estimate_converges_to_the_exact_optimum():
    g = torch.Generator().manual_seed(0)
    for beta in (2.0, 0.5, 0.2):
        exact_reward, exact_kl = optimum_exact(REF.log(), GOLD, beta)
        idx = torch.multinomial(REF, 200_000, replacement=True, generator=g)
        reward, kl, ess = optimum_estimate(GOLD[idx].unsqueeze(0), beta)
        assert reward.item() == pytest.approx(exact_reward, abs=5e-3)
        assert kl.item() == pytest.approx(exact_kl, abs=5e-3)
        assert 1 <= ess.item() <= 200_000


def test_limits_large_beta_is_the_reference_small_beta_the_best_sample():
    gold = torch.tensor([[0.1, 0.7, 0.4, 0.9, 0.2, 0.3, 0.8, 0.6]], dtype=torch.float64)
    reward, kl, ess = optimum_estimate(gold, 1e6)
    assert reward.item() == pytest.approx(gold.mean().item(), abs=1e-6)
    assert kl.item() == pytest.approx(0.0, abs=1e-9)
    assert ess.item() == pytest.approx(8.0, rel=1e-6)
    reward, kl, ess = optimum_estimate(gold, 1e-4)
    assert reward.item() == pytest.approx(0.9, abs=1e-9)
    assert kl.item() == pytest.approx(math.log(8), abs=1e-9)      # a finite sample cannot say more
    assert ess.item() == pytest.approx(1.0, abs=1e-9)


def test_estimate_never_exceeds_log_n_and_is_stable_for_tiny_beta():
    gold = torch.rand(5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for beta in (1e-9, 1e-3, 0.1, 10.0):
        reward, kl, _ = optimum_estimate(gold, beta)
        assert torch.isfinite(kl).all() and torch.isfinite(reward).all()
        assert (kl <= math.log(64) + 1e-9).all() and (kl >= 0).all()


def test_curve_rises_with_kl_and_marks_where_it_is_trusted():
    gold = torch.rand(16, 256, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    curve = ceiling_curve(gold, [4.0, 1.0, 0.25, 0.05, 0.001], min_ess=32)
    kls, golds = [r["kl"] for r in curve], [r["gold"] for r in curve]
    assert kls == sorted(kls) and golds == sorted(golds)            # higher KL, higher reward
    assert curve[0]["beta"] == math.inf and curve[0]["kl"] == 0.0
    assert curve[0]["trusted"] and not curve[-1]["trusted"]         # β = 0.001: one sample carries it
    assert ceiling_at(curve, 0.0) == pytest.approx(gold.mean().item())
    trusted = [r for r in curve if r["trusted"]]
    mid = (trusted[0]["kl"] + trusted[1]["kl"]) / 2
    assert ceiling_at(curve, mid) == pytest.approx((trusted[0]["gold"] + trusted[1]["gold"]) / 2)
    assert ceiling_at(curve, curve[-1]["kl"]) is None               # beyond the trusted part


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.2, 0.3), ("rl", 0.8, 0.25)])
def test_gao_fits_recover_known_constants(form, alpha, beta):
    kl = torch.linspace(0, 9, 40, dtype=torch.float64)
    d = kl.sqrt()
    second = d * d if form == "bon" else torch.special.xlogy(d, d)
    gain = d * alpha - beta * second
    fit = fit_gao(kl, gain, form)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9) and fit["beta"] == pytest.approx(beta, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    noisy = gain + 0.01 * torch.randn(40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fit = fit_gao(kl, noisy, form)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.05) and fit["beta"] == pytest.approx(beta, abs=0.05)
    other = fit_gao(kl, gain, "rl" if form == "bon" else "bon")
    assert other["r2"] < 0.999                                      # the wrong form fits worse
    with pytest.raises(ValueError, match="form must be"):
        fit_gao(kl, gain, "linear")


def test_best_of_n_kl_bound_matches_an_exact_best_of_n():
    # π_ref uniform over M responses with distinct rewards; best-of-N picks rank k (1..M, ascending)
    # with probability (k/M)^N − ((k−1)/M)^N. Its KL to uniform tends to log N − (N−1)/N as M grows.
    m = 100_000
    k = torch.arange(1, m + 1, dtype=torch.float64)
    for n in (1, 4, 16, 64):
        p = (k / m) ** n - ((k - 1) / m) ** n
        kl = torch.special.xlogy(p, p * m).sum().item()
        assert kl == pytest.approx(best_of_n_kl_bound(n), abs=2e-3)
    assert best_of_n_kl_bound(1) == 0.0


# ---------------------------------------------------------------------------
# The bandit (minirlhf/bandit.py): trained methods land on or below the exact ceiling

def test_trained_methods_land_on_or_below_the_exact_ceiling():
    from minirlhf import bandit
    b = bandit.make_bandit()
    ref_kl, ref_reward = bandit.exact_point(b, b.ref_logprobs)
    assert ref_kl == 0.0 and bandit.ceiling_at_kl(b, 0.0) == pytest.approx(ref_reward, abs=1e-4)
    beta = 0.1
    star_reward, star_kl = optimum_exact(b.ref_logprobs, b.gold, beta)
    points = {"ppo": bandit.exact_point(b, bandit.train_ppo(b, beta, iterations=120)),
              "dpo": bandit.exact_point(b, bandit.train_dpo(b, beta / 0.1, steps=300)),
              "grpo": bandit.exact_point(b, bandit.train_grpo(b, beta, iterations=60))}
    for method, (kl, reward) in points.items():
        assert kl > 0.1 and reward > ref_reward + 0.1, method                  # each one learned
        assert reward <= bandit.ceiling_at_kl(b, kl) + 1e-6, method            # never above the optimum
    # PPO optimises E[g] − β·KL itself, and DPO's loss has the same minimiser: both reach π*_β
    for method in ("ppo", "dpo"):
        kl, reward = points[method]
        assert kl == pytest.approx(star_kl, abs=0.25) and reward == pytest.approx(star_reward, abs=0.02), method
        assert bandit.ceiling_at_kl(b, kl) - reward < 0.01, method
