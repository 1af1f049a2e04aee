"""The ceiling: the best gold reward any policy can reach at each KL from the SFT model.

Every RLHF method in the kit maximises, one way or another, the KL-regularised objective

    E_{y~π}[ g(x, y) ] − β · KL(π(·|x) ‖ π_ref(·|x))

whose exact maximiser is known in closed form (DPO eq. 4; Ziegler et al. 2019):

    π*_β(y|x) = π_ref(y|x) · exp(g(x, y)/β) / Z_β(x),     Z_β(x) = E_{y~π_ref}[ exp(g/β) ].

No policy reaches a higher expected reward at the same KL, so as β runs from large to
small the points (KL(π*_β‖π_ref), E_{π*_β}[g]) trace the best achievable frontier. A paper
cannot draw it, since its gold reward is a learned classifier; the kit's gold judge is
exact code, so the kit can.

We never hold π*_β itself: we *estimate* its reward and KL from N samples y_1..y_N of
π_ref per prompt, by self-normalised importance weighting. With w_i = softmax_i(g_i/β):

    E_{π*}[g]   ≈ Σ_i w_i · g_i
    KL(π*‖π_ref) ≈ Σ_i w_i · log(N · w_i)      (= E_{π*}[g]/β − log mean_i exp(g_i/β))

The second form is the KL of the weights from the uniform 1/N, which is why it can never
exceed log N: a finite sample cannot express a policy further from π_ref than "always the
best of my N samples". The estimate is trustworthy only where the weights are spread over
many samples, i.e. where the effective sample size 1/Σ w_i² is large; `ceiling_curve`
reports it so plots draw only that part.

Also here: the functional forms of Gao et al. 2022 ("Scaling laws for reward model
over-optimization", eq. 1 and 2) fitted to measured gold-vs-KL curves.
"""
import math

import torch

# ---------------------------------------------------------------------------
# The optimum, exactly (enumerable responses) and estimated (samples of π_ref)


def optimum_exact(ref_logprobs, gold, beta):
    """Reward and KL of π*_β when every response can be listed.

    ref_logprobs (M,): log π_ref of each of the M responses (summing to one in probability);
    gold (M,): the gold reward of each. Returns (E_{π*}[g], KL(π*‖π_ref)) as floats.
    """
    log_pi = torch.log_softmax(ref_logprobs + gold / beta, dim=-1)       # log π*_β, (M,)
    pi = log_pi.exp()
    reward = (pi * gold).sum()
    kl = (pi * (log_pi - ref_logprobs)).sum()
    return reward.item(), kl.item()


def optimum_estimate(gold, beta):
    """Self-normalised estimates of π*_β's reward and KL from samples of π_ref.

    gold (P, N): the gold reward of N samples of π_ref for each of P prompts.
    Returns (reward (P,), kl (P,), ess (P,)): per prompt, E_{π*}[g], KL(π*‖π_ref) and the
    effective sample size 1/Σ w² of the importance weights (N when β → ∞, 1 when β → 0).
    """
    n = gold.shape[-1]
    w = torch.softmax(gold / beta, dim=-1)                                # (P, N), rows sum to 1
    reward = (w * gold).sum(-1)                                           # (P,)
    kl = torch.special.xlogy(w, w * n).sum(-1)                            # (P,); 0·log 0 = 0
    ess = 1.0 / (w * w).sum(-1)                                           # (P,)
    return reward, kl.clamp_min(0.0), ess


def ceiling_curve(gold, betas, min_ess=32.0):
    """The estimated frontier over prompts: one row per β, plus β = ∞ (π_ref itself), sorted by KL.

    gold (P, N) as in `optimum_estimate`. Each row is a dict with `beta`, `kl` and `gold`
    (means over prompts), `ess` (median effective sample size over prompts) and `trusted`:
    whether the median ESS is at least `min_ess` (the part a plot should draw).
    """
    n = gold.shape[-1]
    rows = [dict(beta=math.inf, kl=0.0, gold=gold.mean().item(), ess=float(n), trusted=True)]
    for beta in betas:
        reward, kl, ess = optimum_estimate(gold, beta)
        median_ess = ess.median().item()
        rows.append(dict(beta=float(beta), kl=kl.mean().item(), gold=reward.mean().item(),
                         ess=median_ess, trusted=median_ess >= min_ess))
    return sorted(rows, key=lambda r: r["kl"])


def ceiling_at(curve, budget):
    """The ceiling's gold reward at KL `budget`, interpolated linearly between trusted rows.

    None when the budget lies beyond the trusted part: the estimate says nothing there.
    """
    points = [(r["kl"], r["gold"]) for r in curve if r["trusted"]]
    if budget < 0 or budget > points[-1][0]:
        return None
    for (k0, g0), (k1, g1) in zip(points, points[1:]):
        if budget <= k1:
            return g1 if k1 == k0 else g0 + (g1 - g0) * (budget - k0) / (k1 - k0)
    return points[-1][1]


# ---------------------------------------------------------------------------
# Over-optimisation: the functional forms of Gao et al. 2022


def fit_gao(kl, gold_gain, form):
    """Least-squares fit of Gao et al.'s form to measured points; d = √KL.

    form "bon": gain = d·(α − β·d)        (their eq. 1, Best-of-N)
    form "rl":  gain = d·(α − β·log d)    (their eq. 2, RL)
    kl, gold_gain: 1-D sequences (gold_gain = gold reward minus the initial policy's).
    Returns dict(alpha, beta, r2): both forms are linear in (α, β), so this is exact least
    squares; r2 is the coefficient of determination of the fit.
    """
    d = torch.as_tensor(kl, dtype=torch.float64).clamp_min(0).sqrt()
    y = torch.as_tensor(gold_gain, dtype=torch.float64)
    if form == "bon":
        second = d * d
    elif form == "rl":
        second = torch.special.xlogy(d, d)                                # d·log d, 0 at d = 0
    else:
        raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")
    features = torch.stack([d, -second], dim=1)                           # (n, 2)
    alpha, beta = torch.linalg.lstsq(features, y.unsqueeze(1)).solution.squeeze(1).tolist()
    residual = y - features @ torch.tensor([alpha, beta], dtype=torch.float64)
    total = ((y - y.mean()) ** 2).sum().item()
    r2 = 1.0 - (residual ** 2).sum().item() / total if total > 0 else float("nan")
    return dict(alpha=alpha, beta=beta, r2=r2)


def best_of_n_kl_bound(n):
    """Beirami et al. 2024: KL(best-of-N ‖ π_ref) ≤ log N − (N−1)/N (equality for distinct rewards)."""
    return math.log(n) - (n - 1) / n
