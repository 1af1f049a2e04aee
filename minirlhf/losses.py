"""Every loss and estimator of the RLHF pipeline, as pure functions of tensors.

Nothing here calls a model: the training loops in sft.py, reward.py, ppo.py and dpo.py
compute log-probabilities, rewards and values, and hand them to these functions. Every
loss returns ``(loss, metrics)``: a scalar tensor and a dict of python floats, named as
in docs/metrics.md. Shapes use B (batch), T (tokens), V (vocabulary), K (responses per
prompt). Masks may be 0/1 float or bool; a response mask marks one contiguous run of
response tokens per row (after the prompt, before the right padding).

Papers:
  InstructGPT reward model and PPO-ptx: Ouyang et al. 2022, "Training language models
    to follow instructions with human feedback".
  KL-penalised reward, adaptive KL coefficient: Ziegler et al. 2019, "Fine-tuning
    language models from human preferences".
  GAE: Schulman et al. 2016, "High-dimensional continuous control using generalized
    advantage estimation". PPO: Schulman et al. 2017, "Proximal policy optimization".
  KL estimators k1, k2, k3: Schulman 2020, "Approximating KL divergence" (blog note).
  DPO: Rafailov et al. 2023. IPO: Azar et al. 2023, "A general theoretical paradigm to
    understand learning from human preferences". Robust DPO: Chowdhury et al. 2024,
    "Provably robust DPO". Conservative DPO (cDPO): Mitchell 2023, "A note on DPO with
    noisy preferences".

Deliberate simplifications:
  - masked_mean of an empty mask is 0 (not NaN); values off the mask never leak in,
    even inf or NaN, because they are selected away rather than multiplied by 0.
  - masked_whiten uses the population variance (divide by N, not N − 1) over all masked
    entries of the batch, and returns 0 off the mask.
  - GAE assumes every episode ends at its last response token (bootstrap value 0): no
    truncated episodes, no value at the end of the sequence.
  - The KL penalty is per token, the score is given once at the last response token
    (Ziegler et al. 2019); no reward clipping or normalisation happens here.
  - policy/approx_kl is the k3 estimate on samples of the old policy, so it estimates
    KL(π_old ‖ π_θ), the direction PPO's trust region is about.
  - DPO takes summed sequence log-probs; averaging over tokens is the caller's choice.
  - Metrics are batch means on one process; nothing is all-reduced.
"""

import itertools
import math

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token", "sequence", "constant")
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


# ---------------------------------------------------------------------------------------
# Masked reductions: padding and prompt tokens must never count.


def masked_mean(x, mask, dim=None):
    """Mean of ``x`` over the entries where ``mask`` is 1: ``sum(x·mask) / sum(mask)``.

    x: any shape, e.g. (B, T); mask: same shape, 0/1 float or bool. With ``dim=None``
    the mean is over all entries (a scalar), with ``dim=1`` it is one mean per row (B,).
    An empty mask (or empty row) gives 0 rather than NaN. Off-mask entries are selected
    away with torch.where, so even inf or NaN in padding cannot turn into 0·inf = NaN.
    """
    mask = mask.to(x.dtype)
    total = torch.where(mask > 0, x * mask, torch.zeros_like(x)).sum(dim)
    # 0 / tiny = 0 for an empty mask; tiny is representable in every float dtype.
    return total / mask.sum(dim).clamp_min(torch.finfo(x.dtype).tiny)


def masked_whiten(x, mask, shift_mean=True):
    """Standardise ``x`` to mean 0 and std 1 over the masked entries of the whole batch.

    x, mask: (B, T). Uses the population variance (divide by N). With
    ``shift_mean=False`` the mean is added back, so only the scale changes (used for
    rewards, whose sign carries meaning). Returns a tensor like x, 0 off the mask.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.to(x.dtype) > 0, whitened, torch.zeros_like(x))


# ---------------------------------------------------------------------------------------
# Token log-probabilities and supervised fine-tuning.


def token_logprobs(logits, targets):
    """Log-probability of each target token: ``log_softmax(logits)[b, t, targets[b, t]]``.

    logits: (B, T, V), already aligned so that logits[:, t] predicts targets[:, t];
    targets: (B, T) token ids (every entry must be a valid id, padding included).
    Returns (B, T).

    Hint: log p(y) = logit_y − logsumexp(logits). Never take log(softmax(...)).
    """
    ### BEGIN SOLUTION
    # Same as log_softmax(logits).gather(...), without a second (B, T, V) tensor.
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T)
    ### END SOLUTION


def sft_loss(logits, targets, mask):
    """Mean negative log-likelihood of ``targets`` over all positions where mask is 1.

    logits: (B, T, V); targets: (B, T); mask: (B, T), 1 on completion tokens. One
    token-level mean for the whole batch, so long completions weigh more than short ones.
    Metrics: loss/sft, sft/tokens (number of tokens in the mean).

    Hint: token_logprobs, then masked_mean of its negation.
    """
    ### BEGIN SOLUTION
    loss = masked_mean(-token_logprobs(logits, targets), mask)
    metrics = {"loss/sft": loss.item(), "sft/tokens": float(mask.to(logits.dtype).sum())}
    return loss, metrics
    ### END SOLUTION


# ---------------------------------------------------------------------------------------
# Reward modelling: Bradley-Terry on pairs, the InstructGPT loss on K-wise rankings.


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """Pairwise reward-model loss: mean over the batch of ``−log σ(r_c − r_r)``.

    chosen_rewards, rejected_rewards: (B,). Under the Bradley-Terry model
    P(chosen ≻ rejected) = σ(r_c − r_r); this is its negative log-likelihood.
    Metrics: loss/rm, accuracy (fraction with r_c > r_r strictly; ties count as wrong),
    rewards/chosen, rewards/rejected, rewards/margins (batch means).

    Hint: F.logsigmoid is finite for any margin; log(sigmoid(x)) is −inf for x ≪ 0.
    """
    ### BEGIN SOLUTION
    margins = chosen_rewards - rejected_rewards  # (B,)
    loss = -F.logsigmoid(margins).mean()
    metrics = {
        "loss/rm": loss.item(),
        "accuracy": (margins > 0).float().mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
    }
    return loss, metrics
    ### END SOLUTION


def ranking_loss(rewards):
    """K-wise ranking loss of InstructGPT (Ouyang et al. 2022, eq. 1).

    rewards: (B, K), each row the rewards of K responses to one prompt, ordered best →
    worst. Loss: mean over rows of ``1/C(K,2) · Σ_{i<j} −log σ(r_i − r_j)``: all C(K,2)
    pairs of a prompt in one batch element, so the prompt's pairs are not over-fitted.
    Metrics: loss/rm, accuracy (fraction of the C(K,2) pairs ordered correctly).

    Hint: torch.triu_indices(K, K, offset=1) lists the pairs i < j.
    """
    K = rewards.shape[1]
    if K < 2:
        raise ValueError(f"ranking_loss needs K >= 2 responses per prompt, got K={K}")
    ### BEGIN SOLUTION
    better, worse = torch.triu_indices(K, K, offset=1, device=rewards.device)  # (P,) each
    margins = rewards[:, better] - rewards[:, worse]  # (B, P), P = C(K, 2)
    loss = -F.logsigmoid(margins).mean()
    metrics = {"loss/rm": loss.item(), "accuracy": (margins > 0).float().mean().item()}
    return loss, metrics
    ### END SOLUTION


# ---------------------------------------------------------------------------------------
# KL to the reference policy, estimated from samples of the policy.


def _k3_stable(d):
    """``exp(−d) − 1 + d`` without cancellation for tiny |d|.

    expm1(−d) + d cancels: in float32 it is about 40 % wrong at d = 1e-7. For |d| < 0.5 use the
    Taylor series Σ_{n=2}^{10} (−d)^n / n! (truncation < 1e-10 relative).
    """
    x = -d.clamp(-0.5, 0.5)  # clamped so the unused branch has finite values and grads
    series = torch.zeros_like(d)
    for n in range(10, 1, -1):  # Horner's rule for Σ_{n=2}^{10} x^(n−2) / n!
        series = series * x + 1.0 / math.factorial(n)
    return torch.where(d.abs() < 0.5, series * x * x, torch.expm1(-d) + d)


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π.

    logprobs, ref_logprobs: (B, T), log π and log π_ref of the sampled tokens. With
    ``d = logprobs − ref_logprobs`` (Schulman 2020, "Approximating KL divergence"):
      k1 = d                  unbiased, high variance, can be negative;
      k2 = d² / 2             biased, low variance, ≥ 0;
      k3 = exp(−d) − 1 + d    unbiased, low variance, ≥ 0.
    Returns (B, T). Raises ValueError for an unknown estimator.

    Hint: k3 = r − 1 − log r with r = π_ref/π; use _k3_stable(d) for it.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {KL_ESTIMATORS}")
    ### BEGIN SOLUTION
    d = logprobs - ref_logprobs  # (B, T)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    return _k3_stable(d)
    ### END SOLUTION


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    """Per-token PPO rewards: a KL penalty on every response token, the score at the end.

    scores: (B,) reward-model scores of whole responses; logprobs, ref_logprobs,
    mask: (B, T). Returns (B, T): ``−kl_coef · kl_penalty`` on masked positions, 0
    elsewhere, plus ``scores`` at the last masked position of each row (Ziegler et al.
    2019: R(x, y) = r(x, y) − β·log(π/π_ref)). A row with an empty mask is all 0.

    Hint: (mask · [1..T]).argmax(1) finds each row's last masked position.
    """
    ### BEGIN SOLUTION
    mask = mask.to(logprobs.dtype)
    T = mask.shape[1]
    kl = kl_penalty(logprobs, ref_logprobs, estimator)  # (B, T)
    rewards = torch.where(mask > 0, -kl_coef * kl, torch.zeros_like(kl))  # (B, T)
    positions = torch.arange(1, T + 1, device=mask.device)  # (T,), from 1 so 0 = unmasked
    last = (mask * positions).argmax(dim=1)  # (B,)
    # Times mask: an empty row has argmax 0 at an unmasked position, so gets no score.
    last_token = F.one_hot(last, T).to(mask.dtype) * mask  # (B, T)
    return rewards + scores[:, None] * last_token  # (B, 1) broadcast over T
    ### END SOLUTION


# ---------------------------------------------------------------------------------------
# Generalised advantage estimation over each row's response run.


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Advantages and returns by GAE (Schulman et al. 2016).

    rewards, values, mask: (B, T); the mask marks one contiguous run of response tokens
    per row. With the TD error δ_t = r_t + γ·V_{t+1} − V_t,
      A_t = Σ_l (γλ)^l δ_{t+l}, computed backwards as A_t = δ_t + γλ·A_{t+1},
    and returns R_t = A_t + V_t (the value targets). The episode ends after the last
    masked position: V there is 0 and nothing after it flows back. Returns
    (advantages, returns), each (B, T) and 0 outside the mask. gae_reference below is
    the same computation, one row and one step at a time (in the instructor's copy only).

    Hint: zero values and rewards off the mask, then loop t = T−1 … 0 over tensors of
    shape (B,), multiplying the running advantage by mask[:, t] to restart it.
    """
    ### BEGIN SOLUTION
    mask = mask.to(values.dtype)
    zeros = torch.zeros_like(values)
    # Off the run V is 0, so the step after the run's end bootstraps from 0.
    values = torch.where(mask > 0, values, zeros)  # (B, T)
    rewards = torch.where(mask > 0, rewards, zeros)  # (B, T)
    T = values.shape[1]
    advantage = zeros[:, 0]  # (B,), A_{t+1}
    advantages = [None] * T
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else zeros[:, 0]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = (delta + gamma * lam * advantage) * mask[:, t]  # (B,)
        advantages[t] = advantage
    advantages = torch.stack(advantages, dim=1)  # (B, T)
    return advantages, advantages + values
    ### END SOLUTION


### BEGIN INSTRUCTOR ONLY
def gae_reference(rewards, values, mask, gamma=1.0, lam=0.95):
    """The same as gae, written naively: python floats, one row and one step at a time."""
    B, T = values.shape
    advantages = torch.zeros(B, T, dtype=values.dtype)
    returns = torch.zeros(B, T, dtype=values.dtype)
    for b in range(B):
        steps = [t for t in range(T) if mask[b, t]]
        advantage = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            value = float(values[b, t])
            next_value = float(values[b, steps[k + 1]]) if k + 1 < len(steps) else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - value
            advantage = delta + gamma * lam * advantage
            advantages[b, t] = advantage
            returns[b, t] = advantage + value
    return advantages, returns
### END INSTRUCTOR ONLY


# ---------------------------------------------------------------------------------------
# PPO: the clipped surrogate for the policy, the clipped squared error for the value.


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, clip_eps_high=None,
                    aggregation="token", max_tokens=None):
    """Clipped surrogate loss of PPO (Schulman et al. 2017, eq. 7, negated).

    logprobs: (B, T) under the current policy; old_logprobs: (B, T) under the policy
    that sampled; advantages, mask: (B, T). With ρ = exp(logprobs − old_logprobs):
      loss = masked_mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))).
    The max is the pessimistic bound: once ρ leaves [1−ε, 1+ε] in the direction the
    advantage pushes it, the gradient is 0.
    The critic-free methods change two things (see masked_aggregate and docs/grpo.md):
    ``clip_eps_high`` is the upper clip 1+ε_high (DAPO's clip-higher; None: ε), and
    ``aggregation`` ("token", "sequence", "constant" with ``max_tokens``) says how the
    per-token terms become one number; "token" is the masked_mean above.
    Metrics: loss/policy; policy/clipfrac (fraction of tokens where the clipped term is
    the max); policy/approx_kl = masked_mean((ρ − 1) − log ρ), the k3 estimate of
    KL(π_old ‖ π_θ) on the sampled tokens; policy/ratio_mean.

    Hint: torch.maximum of the two terms; metrics under torch.no_grad().
    """
    ### BEGIN SOLUTION
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)  # (B, T)
    loss = masked_aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens)
    with torch.no_grad():
        metrics = {
            "loss/policy": loss.item(),
            "policy/clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "policy/approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
            "policy/ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, metrics
    ### END SOLUTION


def ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2):
    """Clipped value loss: ``0.5 · masked_mean(max((v − R)², (v_clip − R)²))``.

    values: (B, T) under the current value head; old_values: (B, T) at sampling time;
    returns: (B, T) targets from gae; mask: (B, T). v_clip = old + clip(v − old, −ε, ε)
    keeps the value head near where it was, like the policy's ratio clip (the PPO
    implementation used by Ziegler et al. 2019 and InstructGPT).
    Metrics: loss/value, val/clipfrac (fraction of tokens where the clipped term is
    the max), val/mean (mean predicted value).

    Hint: the same max-of-two-terms shape as ppo_policy_loss.
    """
    ### BEGIN SOLUTION
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    unclipped = (values - returns) ** 2  # (B, T)
    clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "loss/value": loss.item(),
            "val/clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask).item(),
            "val/mean": masked_mean(values, mask).item(),
        }
    return loss, metrics
    ### END SOLUTION


def ppo_ptx_loss(rl_loss, ptx_logits, ptx_targets, ptx_mask, ptx_coef):
    """PPO-ptx (InstructGPT eq. 2): ``rl_loss + γ · NLL(pretraining tokens)``, and metrics.

    rl_loss: scalar, the loss of the RL step (PPO's clipped policy loss); ptx_logits (B, T, V),
    ptx_targets (B, T), ptx_mask (B, T): a batch of "pretraining" text, scored as in sft_loss
    (one mean over every masked token). InstructGPT *maximises* γ·E[log π(x_pretrain)], so the
    loss *adds* γ times the mean negative log-likelihood; γ = ptx_coef ≥ 0 (0: plain PPO).
    Metrics: loss/ptx (the NLL, before the weight γ).

    Hint: sft_loss already computes the NLL.
    """
    ### BEGIN SOLUTION
    nll, _ = sft_loss(ptx_logits, ptx_targets, ptx_mask)  # scalar: mean NLL per token
    return rl_loss + ptx_coef * nll, {"loss/ptx": nll.item()}
    ### END SOLUTION


# ---------------------------------------------------------------------------------------
# DPO and its variants: the policy is its own reward model.


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
):
    """Direct preference optimisation and its variants; mean over the batch.

    All four log-prob arguments: (B,), summed over each response's tokens. With
    h = (π_c − ref_c) − (π_r − ref_r) and ε = label_smoothing:
      sigmoid  −(1−ε)·log σ(βh) − ε·log σ(−βh)           DPO eq. 7 (Rafailov et al.
               2023); ε > 0 is cDPO (Mitchell 2023): labels flipped with probability ε;
      robust   (−(1−ε)·log σ(βh) + ε·log σ(−βh)) / (1−2ε)  unbiased under flip noise ε
               (Chowdhury et al. 2024);
      hinge    relu(1 − βh)                               (SLiC-style);
      ipo      (h − 1/(2β))²                              (Azar et al. 2023).
    label_smoothing applies to sigmoid and robust only. Metrics: loss/dpo and, with the
    implicit reward β·(π − ref), rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies (fraction with chosen reward > rejected).
    Raises ValueError for beta ≤ 0, ε outside [0, 0.5) or an unknown loss_type.

    Hint: compute h once, then one line per loss type; use F.logsigmoid.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {DPO_LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to sigmoid and robust, not {loss_type!r}")
    ### BEGIN SOLUTION
    eps = label_smoothing
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    agree, disagree = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)  # (B,) each
    if loss_type == "sigmoid":
        losses = -(1 - eps) * agree - eps * disagree
    elif loss_type == "robust":
        losses = (-(1 - eps) * agree + eps * disagree) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo: regress h onto 1/(2β) instead of pushing it to infinity
        losses = (h - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios  # (B,)
        rejected_rewards = beta * rejected_logratios  # (B,)
        metrics = {
            "loss/dpo": loss.item(),
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        }
    return loss, metrics
    ### END SOLUTION


# ---------------------------------------------------------------------------------------
# RPO: DPO plus the NLL of the chosen responses (Pang et al. 2024, "Iterative reasoning
# preference optimization").


def rpo_nll(logps, lengths, chosen):
    """(loss, metrics): mean over pairs of −log π(y_c|x) / |y_c|, the chosen responses' NLL per token.

    logps (U,) summed log-probs of the batch's distinct sequences; lengths (U,) their number of
    response tokens (≥ 1); chosen (P,) long, the row of each pair's chosen response (a ranking's
    best is chosen in K−1 pairs and counts K−1 times). Added to DPO with a weight α (`nll_coef`).
    """
    nll = -(logps / lengths)[chosen].mean()  # (U,) per-token NLL of each row -> (P,) chosen rows -> scalar
    return nll, {"loss/nll_chosen": nll.item()}


# ---------------------------------------------------------------------------------------
# Diagnostics that PPO logs (not losses: nothing is differentiated through them).


def entropy(logits):
    """(B, T) entropy in nats of the next-token distribution softmax(logits), logits (B, T, V)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # (B, T)


def explained_variance(values, returns, mask):
    """1 − Var(R − V)/Var(R) over the masked entries of (B, T) tensors, as a 0-dim tensor:
    1 is a perfect critic, ≤ 0 no better than a constant."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values  # (B, T)
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return 1 - var_residual / var_returns.clamp_min(1e-8)


# ---------------------------------------------------------------------------------------
# Adaptive KL coefficient.


class AdaptiveKLController:
    """Adapts the KL coefficient β towards a target KL (Ziegler et al. 2019).

    init_kl_coef: starting β; target: the KL (nats per response) to aim for; horizon:
    a number of samples; at the ±20 % cap β changes by about e^±0.2 every horizon samples.
    """

    def __init__(self, init_kl_coef, target, horizon):
        if not (target > 0 and horizon > 0):
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl, n_steps):
        """Move β after ``n_steps`` samples whose mean KL was ``current_kl``.

        e = clip(current_kl / target − 1, −0.2, 0.2);  β ← β · (1 + e · n_steps / horizon).
        KL above target raises β (a stronger pull to the reference), below lowers it.
        Returns the new β.

        Hint: min/max on python floats; the clip keeps one noisy batch from swinging β.
        """
        ### BEGIN SOLUTION
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
        ### END SOLUTION


# ---------------------------------------------------------------------------------------
# Critic-free RL (GRPO, Dr. GRPO, RLOO): the baseline comes from the other responses to
# the same prompt instead of a value model; how per-token terms are averaged matters.


def masked_aggregate(x, mask, aggregation="token", max_tokens=None):
    """Reduce per-token loss terms x (B, T) over the mask to one scalar.

      token     masked_mean(x, mask): one mean over every response token of the batch
                (today's PPO; DAPO, Yu et al. 2025, eq. 10);
      sequence  the mean over each row's tokens, then over the B rows (GRPO, Shao et al.
                2024, eq. 3): a token of a short response weighs more than one of a long;
                a row with no masked token adds 0 and still counts among the B;
      constant  masked sum / (B · max_tokens), max_tokens a fixed budget such as the
                generation limit (Dr. GRPO, Liu et al. 2025): every token weighs the same
                whatever its response's length, and the weight does not depend on the batch.
    Raises ValueError for an unknown name, or "constant" without max_tokens > 0.

    Hint: "token" is written for you. masked_mean(x, mask, dim=1) gives one mean per row;
    for the sum, select the masked entries with torch.where so off-mask inf or NaN cannot
    leak in.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if aggregation == "constant" and not (max_tokens is not None and max_tokens > 0):
        raise ValueError(f"aggregation='constant' needs max_tokens > 0, got {max_tokens}")
    if aggregation == "token":  # today's PPO loss: outside the exercise, so ppo_policy_loss never waits on it
        return masked_mean(x, mask)
    ### BEGIN SOLUTION
    if aggregation == "sequence":
        return masked_mean(x, mask, dim=1).mean()  # (B,) row means, then their mean
    total = torch.where(mask.to(x.dtype) > 0, x, torch.zeros_like(x)).sum()
    return total / (x.shape[0] * max_tokens)
    ### END SOLUTION


### BEGIN INSTRUCTOR ONLY
def masked_aggregate_reference(x, mask, aggregation="token", max_tokens=None):
    """The same as masked_aggregate, written naively: python floats, one token at a time."""
    rows = [[float(x[b, t]) for t in range(x.shape[1]) if mask[b, t]] for b in range(x.shape[0])]
    if aggregation == "token":
        tokens = [v for row in rows for v in row]
        return sum(tokens) / len(tokens) if tokens else 0.0
    if aggregation == "sequence":
        return sum(sum(row) / len(row) if row else 0.0 for row in rows) / len(rows)
    return sum(sum(row) for row in rows) / (len(rows) * max_tokens)
### END INSTRUCTOR ONLY


def _equal_groups(rewards):
    """(B, 1) bool: True where all G rewards of a group are equal (std exactly 0)."""
    return (rewards == rewards[:, :1]).all(dim=1, keepdim=True)


def group_advantages(rewards, scale_std=True, eps=1e-6, unbiased=False):
    """Group-relative advantages of GRPO (Shao et al. 2024, section 4.1.2) and Dr. GRPO.

    rewards: (B, G), row b the rewards of the G responses sampled for prompt b. Returns
    (B, G):
      scale_std=True   (r − mean_g) / (std_g + eps)   GRPO
      scale_std=False  r − mean_g                     Dr. GRPO (Liu et al. 2025)
    std_g is the population std (divide by G); ``unbiased=True`` divides by G − 1 (with
    eps=1e-4 that is TRL's convention: its advantages are √((G−1)/G) of these). The
    mean is a baseline: it does not depend on which response is scored, so it leaves
    the policy gradient unbiased (in the limit of many samples) and lowers its variance;
    the division by std rescales each prompt and is not unbiased (docs/grpo.md).
    A group whose rewards are all equal gets advantages exactly 0 (no learning signal).

    Hint: mean and std over dim=1 with keepdim=True, so they broadcast over the G; then
    torch.where(_equal_groups(rewards), 0, …) makes equal groups exactly 0.
    """
    ### BEGIN SOLUTION
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (B, G)
    if scale_std:
        std = rewards.std(dim=1, keepdim=True, correction=1 if unbiased else 0)  # (B, 1)
        centred = centred / (std + eps)
    # Equal rewards: r − mean can be ±1 ulp instead of 0 (the mean rounds); make it 0.
    return torch.where(_equal_groups(rewards), torch.zeros_like(centred), centred)
    ### END SOLUTION


### BEGIN INSTRUCTOR ONLY
def group_advantages_reference(rewards, scale_std=True, eps=1e-6, unbiased=False):
    """The same as group_advantages, written naively: python floats, one group at a time."""
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        group = [float(r) for r in rewards[b]]
        G = len(group)
        if all(r == group[0] for r in group):
            continue
        mean = sum(group) / G
        std = (sum((r - mean) ** 2 for r in group) / (G - 1 if unbiased else G)) ** 0.5
        for i, r in enumerate(group):
            out[b, i] = (r - mean) / (std + eps) if scale_std else r - mean
    return out
### END INSTRUCTOR ONLY


def rloo_advantages(rewards):
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, eq. 5).

    rewards: (B, G) with G ≥ 2, row b the rewards of G responses to prompt b. Returns
    (B, G): ``r_i − mean_{j≠i} r_j``, the reward minus the mean of the OTHER G−1
    responses. That baseline does not depend on response i at all, so the gradient
    estimate stays exactly unbiased; algebraically it is G/(G−1)·(r_i − mean_g).
    Equal rewards give exactly 0. Raises ValueError for G < 2.

    Hint: the sum of the others is rewards.sum(1, keepdim=True) − rewards; equal groups
    as in group_advantages.
    """
    G = rewards.shape[1]
    if G < 2:
        raise ValueError(f"rloo_advantages needs G >= 2 responses per prompt, got G={G}")
    ### BEGIN SOLUTION
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1)  # (B, G) leave-one-out means
    advantages = rewards - others
    return torch.where(_equal_groups(rewards), torch.zeros_like(advantages), advantages)
    ### END SOLUTION


### BEGIN INSTRUCTOR ONLY
def rloo_advantages_reference(rewards):
    """The same as rloo_advantages, written naively: python floats, one response at a time."""
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        group = [float(r) for r in rewards[b]]
        if all(r == group[0] for r in group):
            continue
        for i, r in enumerate(group):
            others = [group[j] for j in range(len(group)) if j != i]
            out[b, i] = r - sum(others) / len(others)
    return out
### END INSTRUCTOR ONLY


# ---------------------------------------------------------------------------
# pass@k: an estimator for verifiable tasks

def pass_at_k(n, c, k):
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, §2.1).

    pass@k is the probability that at least one of k samples is correct. Drawing k of the n
    samples without replacement, all k are wrong with probability C(n−c, k) / C(n, k), so

        pass@k ≈ 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)

    The product form never forms the huge binomials (C(256, 64) overflows a float). It is 1
    when fewer than k samples are wrong (every k-subset holds a correct one). n, c, k are
    ints with 0 ≤ c ≤ n and 1 ≤ k ≤ n; returns a float.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def pass_at_k_bruteforce(n, c, k):
    """The same estimate by counting: the share of all k-subsets of the n samples that hold a correct one.

    Samples 0 .. c−1 are the correct ones. Exponential in n: for tests on small n only."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)
