"""The ceiling made exact: PPO, DPO and GRPO on a bandit small enough to list every response.

One prompt, M possible responses ("arms"), a reference policy π_ref over them and a gold
reward g for each. Here nothing needs estimating: for any policy π (a softmax over M
logits) the expected reward Σ π·g and KL(π‖π_ref) are exact sums, and so is the optimum
π*_β ∝ π_ref·exp(g/β) (`optimum.optimum_exact`). Since π*_β maximises E[g] − β·KL, no
policy with the same KL has a higher reward: every trained method must land on or below
the curve, and one that optimises the KL-regularised objective well lands on it.

The three trainers use the kit's losses on (B, 1)-shaped "sequences" of one token:

* PPO: per-sample reward g − β·log(π/π_ref) (the k1 penalty of `kl_penalized_rewards`),
  batch-mean baseline, clipped updates (`ppo_policy_loss`). Its fixed point is π*_β.
* DPO: pairs sampled from π_ref, labelled by Bradley-Terry on g/τ (`dpo_loss`). The loss
  is minimised by π_ref·exp(g/(τ·β_DPO)): the ceiling at β = τ·β_DPO, up to finite data.
* GRPO: groups of G samples, std-scaled group advantages (`group_advantages`), k3 KL in
  the loss. Std scaling rescales the reward, so it lands on the curve at another β — or
  below it, where the scale differs between iterations.
"""
import dataclasses

import torch

from minirlhf.losses import dpo_loss, group_advantages, kl_penalty, masked_mean, ppo_policy_loss
from minirlhf.optimum import optimum_exact


@dataclasses.dataclass
class Bandit:
    """A reference policy over M responses and the gold reward of each."""
    ref_logprobs: torch.Tensor      # (M,) log π_ref
    gold: torch.Tensor              # (M,) g in [0, 1]


def make_bandit(m=16, seed=0):
    """A skewed π_ref (most mass on mediocre responses) and uniform gold rewards."""
    g = torch.Generator().manual_seed(seed)
    gold = torch.rand(m, generator=g, dtype=torch.float64)
    ref_logits = 1.5 * torch.randn(m, generator=g, dtype=torch.float64) - 2.0 * gold   # good ones are rare
    return Bandit(torch.log_softmax(ref_logits, -1), gold)


def exact_point(bandit, logits):
    """(KL(π‖π_ref), E_π[g]) of the softmax policy with these logits, exactly."""
    logp = torch.log_softmax(logits.detach(), -1)
    p = logp.exp()
    return (p * (logp - bandit.ref_logprobs)).sum().item(), (p * bandit.gold).sum().item()


def ceiling_at_kl(bandit, kl, lo=1e-4, hi=1e4, iters=100):
    """The exact ceiling's reward at a KL: bisection on log β (KL of π*_β falls as β grows)."""
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        if optimum_exact(bandit.ref_logprobs, bandit.gold, mid)[1] > kl:
            lo = mid
        else:
            hi = mid
    return optimum_exact(bandit.ref_logprobs, bandit.gold, (lo * hi) ** 0.5)[0]


# ---------------------------------------------------------------------------
# Trainers: each returns the final logits; the policy starts at π_ref


def _sample(logits, n, generator):
    return torch.multinomial(torch.softmax(logits.detach(), -1), n, replacement=True, generator=generator)


def train_ppo(bandit, beta, iterations=300, batch=256, epochs=4, lr=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = bandit.ref_logprobs.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    ones = torch.ones(batch, 1, dtype=torch.float64)
    for _ in range(iterations):
        arms = _sample(logits, batch, g)                                           # (B,)
        old = torch.log_softmax(logits.detach(), -1)[arms].unsqueeze(1)            # (B, 1)
        ref = bandit.ref_logprobs[arms].unsqueeze(1)                               # (B, 1)
        reward = bandit.gold[arms].unsqueeze(1) - beta * kl_penalty(old, ref, "k1")  # (B, 1)
        advantages = reward - reward.mean()
        for _ in range(epochs):
            new = torch.log_softmax(logits, -1)[arms].unsqueeze(1)
            loss, _ = ppo_policy_loss(new, old, advantages, ones)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return logits.detach()


def train_dpo(bandit, beta, tau=0.1, n_pairs=8192, steps=600, lr=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref_p = bandit.ref_logprobs.exp()
    a = torch.multinomial(ref_p, n_pairs, replacement=True, generator=g)
    b = torch.multinomial(ref_p, n_pairs, replacement=True, generator=g)
    keep = a != b
    a, b = a[keep], b[keep]
    first_wins = torch.rand(len(a), generator=g, dtype=torch.float64) < torch.sigmoid(
        (bandit.gold[a] - bandit.gold[b]) / tau)                                   # Bradley-Terry labels
    chosen, rejected = torch.where(first_wins, a, b), torch.where(first_wins, b, a)
    logits = bandit.ref_logprobs.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        logp = torch.log_softmax(logits, -1)
        loss, _ = dpo_loss(logp[chosen], logp[rejected], bandit.ref_logprobs[chosen],
                           bandit.ref_logprobs[rejected], beta=beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logits.detach()


def train_grpo(bandit, kl_coef, iterations=300, prompts=32, group=8, epochs=2, lr=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = bandit.ref_logprobs.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    ones = torch.ones(prompts * group, 1, dtype=torch.float64)
    for _ in range(iterations):
        arms = _sample(logits, prompts * group, g)                                 # (B·G,)
        advantages = group_advantages(bandit.gold[arms].view(prompts, group)).reshape(-1, 1)  # (B·G, 1)
        old = torch.log_softmax(logits.detach(), -1)[arms].unsqueeze(1)
        ref = bandit.ref_logprobs[arms].unsqueeze(1)
        for _ in range(epochs):
            new = torch.log_softmax(logits, -1)[arms].unsqueeze(1)
            loss, _ = ppo_policy_loss(new, old, advantages, ones)
            loss = loss + kl_coef * masked_mean(kl_penalty(new, ref, "k3"), ones)   # GRPO eq. 3: k3 in the loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return logits.detach()


def sweep(bandit, betas=(1.0, 0.5, 0.25, 0.1, 0.05), seed=0):
    """{method: [(β, KL, reward, ceiling reward at that KL)]} for PPO, DPO and GRPO over β."""
    trainers = {"ppo": train_ppo, "dpo": lambda b, beta, seed: train_dpo(b, beta / 0.1, seed=seed),
                "grpo": train_grpo}
    out = {}
    for method, train in trainers.items():
        out[method] = []
        for beta in betas:
            kl, reward = exact_point(bandit, train(bandit, beta, seed=seed))
            out[method].append((beta, kl, reward, ceiling_at_kl(bandit, kl)))
    return out
