"""What the grader asks of each exercise: calls to make, and what the answers must satisfy.

Instructor-only (never in a student copy). An exercise is a list of checks, each of one
kind, and it passes only when every check passes:
  - hand: the hand-computed cases of minirlhf/course/checks.py (the ones students see in
    the notebooks) and a few more that students do not see;
  - property: a relation the answer must satisfy, computed here from the inputs (GAE with
    λ = 1 is the discounted return minus V; a position off the mask changes nothing …);
  - reference: random inputs (a fresh seed per grading run), compared with the instructor's
    solution, values and gradients.
Each check carries a hint: the conceptual error that usually makes it fail. The inputs
travel to the child as JSON; the expected values stay in the parent.
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from minirlhf.course import checks

F64 = torch.float64


@dataclass
class Check:
    kind: str  #: "hand", "property" or "reference"
    title: str  #: what is checked, in the words of the feedback
    calls: list  #: [{"args": {name: value}, "grad": [names], "style": "call" | "controller", …}]
    hint: str  #: what usually makes it fail, and where to look
    expected: list = None  #: hand: one {output name: value} per call
    keys: tuple = ()  #: reference: the output names compared with the solution's
    verify: object = None  #: property: fn(named outputs per call, calls) -> None or a reason
    tol: tuple = (1e-5, 1e-6)  #: (relative, absolute)


@dataclass
class Grading:
    name: str  #: the exercise (EXERCISES)
    module: str  #: where the function lives ("minirlhf.losses"), or "" for a notebook
    attr: str  #: what the child fetches from it ("gae", "AdaptiveKLController")
    style: str  #: how outputs are named: "output", "loss", "pair", "controller"
    checks: list = field(default_factory=list)
    notebook: str = ""  #: a notebook exercise: the notebook whose cell defines attr
    limit_s: float = 10.0  #: seconds the exercise may run in the child
    forbidden: tuple = ()  #: names its source must not use (the library shortcut)


def hand_checks(cases_fn, hint, style="call"):
    """Checks from a checks.py case list: one per case."""
    out = []
    for case in cases_fn():
        title, inputs, expected = case[:3]
        call = ({"style": "controller", "init": inputs["init"], "updates": [list(u) for u in inputs["updates"]]}
                if style == "controller" else {"args": dict(inputs)})
        out.append(Check("hand", title, [call], hint, expected=[expected], tol=case[3] if len(case) > 3 else (1e-5, 1e-6)))
    return out


def reference(title, calls, hint, keys, tol=(1e-4, 1e-5)):
    return Check("reference", title, calls, hint, keys=keys, tol=tol)


def _rng(seed, salt):
    return torch.Generator().manual_seed(seed * 1000 + salt)


def response_mask(g, B, T, dtype=torch.float32, allow_empty=False):
    """(B, T): one contiguous run per row, a prompt before it and padding after."""
    mask = torch.zeros(B, T, dtype=dtype)
    for b in range(B):
        start = int(torch.randint(0, T - 1, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[b, start:end] = 1
    if allow_empty:
        mask[-1] = 0
    return mask


# ---------------------------------------------------------------------------------------
# The checks of each exercise.


def grading(seed=0):
    """{exercise name: Grading}; `seed` draws the reference inputs."""
    r = lambda salt: _rng(seed, salt)  # noqa: E731
    g = {}

    gen = r(1)
    logits = 5 * torch.randn(3, 4, 11, generator=gen, dtype=F64)
    targets = torch.randint(0, 11, (3, 4), generator=gen)
    g["token_logprobs"] = Grading("token_logprobs", "minirlhf.losses", "token_logprobs", "output", [
        *hand_checks(checks.token_logprobs_cases, "log_softmax over the last dimension, then gather at the targets"),
        Check("hand", "a three-way softmax and a uniform row",
              [{"args": {"logits": torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]), "targets": torch.tensor([[2, 0]])}}],
              "log p(target) = logit − logsumexp(logits)",
              expected=[{"output": torch.tensor([[-math.log(1 + math.exp(-1) + math.exp(-2)), -math.log(3.0)]])}]),
        reference("random logits, values and gradient", [{"args": {"logits": logits, "targets": targets},
                                                          "grad": ["logits"]}],
                  "use log_softmax (stable), not log(softmax)", ("output",), tol=(1e-6, 1e-8)),
    ])

    gen = r(2)
    mask = response_mask(gen, 4, 5)
    g["sft_loss"] = Grading("sft_loss", "minirlhf.losses", "sft_loss", "loss", [
        *hand_checks(checks.sft_loss_cases, "one mean over every masked token of the batch (not a mean of row "
                                            "means), and positions off the mask must not count"),
        reference("random batch with padding, loss and gradient",
                  [{"args": {"logits": 3 * torch.randn(4, 5, 7, generator=gen, dtype=F64),
                             "targets": torch.randint(0, 7, (4, 5), generator=gen), "mask": mask}, "grad": ["logits"]}],
                  "NLL = −token_logprobs, averaged with the mask over all tokens", ("loss", "sft/tokens")),
        reference("extreme logits stay finite", [{"args": {"logits": torch.tensor([[[1e4, -1e4, 0.0], [0.0, 1e4, -1e4]]]),
                                                           "targets": torch.tensor([[2, 0]]), "mask": torch.ones(1, 2)}}],
                  "use log_softmax, never log(softmax(…))", ("loss",)),
    ])

    gen = r(3)
    chosen, rejected = torch.randn(6, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    g["bradley_terry_loss"] = Grading("bradley_terry_loss", "minirlhf.losses", "bradley_terry_loss", "loss", [
        *hand_checks(checks.bradley_terry_loss_cases, "−log σ(r_c − r_r) = softplus(r_r − r_c), averaged; a tie "
                                                      "is not an accurate pair; use logsigmoid for large margins"),
        reference("random rewards, loss, accuracy and gradient",
                  [{"args": {"chosen_rewards": chosen, "rejected_rewards": rejected},
                    "grad": ["chosen_rewards", "rejected_rewards"]}],
                  "the chosen reward should go up, the rejected down: check the sign of the margin",
                  ("loss", "accuracy")),
    ])

    gen = r(4)
    g["ranking_loss"] = Grading("ranking_loss", "minirlhf.losses", "ranking_loss", "loss", [
        *hand_checks(checks.ranking_loss_cases, "every pair i < j of a row (best first) counts once: 1/C(K,2) Σ "
                                                "−log σ(r_i − r_j), then the mean over rows"),
        reference("random rankings, K = 3 and K = 5", [
            {"args": {"rewards": torch.randn(4, 3, generator=gen, dtype=F64)}, "grad": ["rewards"]},
            {"args": {"rewards": torch.randn(2, 5, generator=gen, dtype=F64)}, "grad": ["rewards"]}],
                  "all C(K,2) pairs, not only neighbours; the pair (i, j) with i < j prefers i", ("loss", "accuracy")),
    ])

    gen = r(5)
    lp, ref = torch.randn(3, 4, generator=gen, dtype=F64), torch.randn(3, 4, generator=gen, dtype=F64)
    g["kl_penalty"] = Grading("kl_penalty", "minirlhf.losses", "kl_penalty", "output", [
        *hand_checks(checks.kl_penalty_cases, "with d = logprobs − ref: k1 = d, k2 = d²/2, k3 = e⁻ᵈ − 1 + d; for "
                                              "tiny d compute k3 stably (expm1)"),
        reference("random log-probs, each estimator, values and gradient",
                  [{"args": {"logprobs": lp, "ref_logprobs": ref, "estimator": est}, "grad": ["logprobs"]}
                   for est in ("k1", "k2", "k3")],
                  "d is logprobs − ref_logprobs (policy minus reference), not the other way", ("output",)),
    ])

    gen = r(6)
    mask = response_mask(gen, 4, 6, allow_empty=True)
    lp, ref = torch.randn(4, 6, generator=gen, dtype=F64), torch.randn(4, 6, generator=gen, dtype=F64)
    lp_inf = lp.masked_fill(mask == 0, float("-inf"))
    scores = torch.randn(4, generator=gen, dtype=F64)
    g["kl_penalized_rewards"] = Grading("kl_penalized_rewards", "minirlhf.losses", "kl_penalized_rewards", "output", [
        *hand_checks(checks.kl_penalized_rewards_cases, "the score goes at the last masked position of each row (not "
                                                        "the last column); nothing off the mask; an empty row stays 0"),
        Check("hand", "a bool mask and the k2 estimator", [{"args": {
            "scores": torch.tensor([1.0, -2.0]), "logprobs": torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.0]]),
            "ref_logprobs": torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -1.0]]),
            "mask": torch.tensor([[True, True, False], [False, True, True]]), "kl_coef": 0.2, "estimator": "k2"}}],
              "the mask may be bool: convert it before arithmetic; pass the estimator on to kl_penalty",
              expected=[{"output": torch.tensor([[-0.025, 0.9, 0.0], [0.0, 0.0, -2.0]])}]),
        reference("random runs with an empty row, values and gradient",
                  [{"args": {"scores": scores, "logprobs": lp, "ref_logprobs": ref, "mask": mask, "kl_coef": 0.3,
                             "estimator": est}, "grad": ["logprobs"]} for est in ("k1", "k3")],
                  "−kl_coef·KL on the run, plus the score at its last token", ("output",)),
        reference("−inf log-probs off the mask leave no NaN",
                  [{"args": {"scores": scores, "logprobs": lp_inf, "ref_logprobs": ref, "mask": mask, "kl_coef": 0.3}}],
                  "select with torch.where(mask, …, 0) rather than multiplying by the mask (−inf · 0 is NaN)",
                  ("output",)),
    ])

    gen = r(7)
    junk = 1e6
    gae_calls = []
    for lam_gamma in ((1.0, 0.9), (0.0, 0.9), (0.95, 1.0)):
        mask = response_mask(gen, 4, 7)
        rewards = torch.where(mask > 0, torch.randn(4, 7, generator=gen, dtype=F64), torch.full((4, 7), junk, dtype=F64))
        values = torch.where(mask > 0, torch.randn(4, 7, generator=gen, dtype=F64), torch.full((4, 7), junk, dtype=F64))
        gae_calls.append({"args": {"rewards": rewards, "values": values, "mask": mask, "lam": lam_gamma[0],
                                   "gamma": lam_gamma[1]}})
    g["gae"] = Grading("gae", "minirlhf.losses", "gae", "pair", [
        *hand_checks(checks.gae_cases, "δ_t = r_t + γ·V_{t+1} − V_t with V = 0 after the run's last token (never "
                                       "bootstrap from a pad or prompt position), A_t = δ_t + γλ·A_{t+1}, R = A + V"),
        Check("property", "λ = 1: the advantage is the discounted return minus V", [gae_calls[0]],
              "look for an off-by-one in the time index: A_t sums δ from t on, and the run ends at its last token",
              verify=lambda outs, calls: _gae_lambda(outs[0], calls[0]["args"], lam=1.0)),
        Check("property", "λ = 0: the advantage is the one-step TD error", [gae_calls[1]],
              "with λ = 0 nothing flows back: A_t = r_t + γ·V_{t+1} − V_t, V after the run is 0",
              verify=lambda outs, calls: _gae_lambda(outs[0], calls[0]["args"], lam=0.0)),
        reference("random runs with junk off the mask", [gae_calls[2]],
                  "zero rewards and values off the mask before the loop, and restart the running advantage there",
                  ("advantages", "returns"), tol=(1e-6, 1e-8)),
    ])

    gen = r(8)
    mask = response_mask(gen, 4, 6)
    old = torch.randn(4, 6, generator=gen, dtype=F64)
    new = old + 0.4 * torch.randn(4, 6, generator=gen, dtype=F64)
    adv = torch.randn(4, 6, generator=gen, dtype=F64)
    g["ppo_policy_loss"] = Grading("ppo_policy_loss", "minirlhf.losses", "ppo_policy_loss", "loss", [
        *hand_checks(checks.ppo_policy_loss_cases, "loss = masked_mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))): the "
                                                   "sign, the max (not min) of the negated terms, and the mask"),
        reference("random rows of different lengths: one mean over all tokens, and the gradient",
                  [{"args": {"logprobs": new, "old_logprobs": old, "advantages": adv, "mask": mask, "clip_eps": 0.2},
                    "grad": ["logprobs"]}],
                  "average over all masked tokens of the batch (not per row first); where the clip binds the "
                  "gradient is 0", ("loss", "policy/clipfrac", "policy/approx_kl")),
    ])

    gen = r(9)
    mask = response_mask(gen, 4, 6)
    old_v = torch.randn(4, 6, generator=gen, dtype=F64)
    g["ppo_value_loss"] = Grading("ppo_value_loss", "minirlhf.losses", "ppo_value_loss", "loss", [
        *hand_checks(checks.ppo_value_loss_cases, "0.5·masked_mean(max((v − R)², (v_clip − R)²)) with v_clip = old "
                                                  "+ clip(v − old, −ε, ε)"),
        reference("random values, returns and mask, and the gradient",
                  [{"args": {"values": old_v + 0.5 * torch.randn(4, 6, generator=gen, dtype=F64), "old_values": old_v,
                             "returns": torch.randn(4, 6, generator=gen, dtype=F64), "mask": mask, "clip_eps": 0.2},
                    "grad": ["values"]}],
                  "clip the change of the value around the old value, not the value itself; max, not min",
                  ("loss", "val/clipfrac")),
    ])

    gen = r(13)
    mask = response_mask(gen, 3, 5)
    g["ppo_ptx_loss"] = Grading("ppo_ptx_loss", "minirlhf.losses", "ppo_ptx_loss", "loss", [
        *hand_checks(checks.ppo_ptx_loss_cases, "loss = rl_loss + γ·NLL, the NLL one mean over every masked token "
                                                "(sft_loss): added, not subtracted — InstructGPT maximises γ·log π"),
        reference("random RL loss and demonstrations, the loss and its gradients",
                  [{"args": {"rl_loss": torch.randn((), generator=gen, dtype=F64),
                             "ptx_logits": 3 * torch.randn(3, 5, 7, generator=gen, dtype=F64),
                             "ptx_targets": torch.randint(0, 7, (3, 5), generator=gen), "ptx_mask": mask,
                             "ptx_coef": 0.7}, "grad": ["rl_loss", "ptx_logits"]}],
                  "the RL loss passes through unchanged (gradient 1); the NLL is weighted by γ", ("loss", "loss/ptx")),
    ])

    gen = r(10)
    kls = [[float(x), int(n)] for x, n in zip(6 * torch.rand(6, generator=gen, dtype=F64),
                                              torch.randint(1, 400, (6,), generator=gen))]
    g["AdaptiveKLController.update"] = Grading("AdaptiveKLController.update", "minirlhf.losses",
                                               "AdaptiveKLController", "controller", [
        *hand_checks(checks.adaptive_kl_cases, "e = clip(kl/target − 1, −0.2, 0.2); value *= 1 + e·n_steps/horizon; "
                                               "return the new value", style="controller"),
        reference("a random sequence of updates", [{"style": "controller", "init": {"init_kl_coef": 0.2, "target": 2.0,
                                                                                    "horizon": 1000}, "updates": kls}],
                  "update .value in place and return it", ()),
    ])

    gen = r(11)
    pc, pr, rc, rr = (torch.randn(5, generator=gen, dtype=F64) - 3 for _ in range(4))
    dpo_args = {"policy_chosen_logps": pc, "policy_rejected_logps": pr, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    g["dpo_loss"] = Grading("dpo_loss", "minirlhf.losses", "dpo_loss", "loss", [
        *hand_checks(checks.dpo_loss_cases, "h = (π_c − ref_c) − (π_r − ref_r); sigmoid: −log σ(βh) (check the sign "
                                            "of h); every loss_type and label_smoothing as in the docstring"),
        reference("random log-probs, every loss type, values and gradients",
                  [{"args": {**dpo_args, "beta": 0.3, "loss_type": lt, "label_smoothing": ls},
                    "grad": ["policy_chosen_logps", "policy_rejected_logps"]}
                   for lt, ls in (("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0))],
                  "the gradient must raise the chosen and lower the rejected log-probability",
                  ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")),
    ])

    gen = r(12)
    B, nh, T, hs = 2, 2, 5, 4
    q, k, v = (torch.randn(B, nh, T, hs, generator=gen, dtype=F64) for _ in range(3))
    lengths = [5, 3]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    att_mask = torch.stack([causal & ((torch.arange(T) < n)[None, :] | torch.eye(T, dtype=torch.bool))
                            for n in lengths])[:, None]  # (B, 1, T, T)
    g["attention_reference"] = Grading("attention_reference", "minirlhf.model", "attention_reference", "output", [
        *hand_checks(checks.attention_cases, "softmax(QKᵀ/√hs) with masked scores set to −inf before the softmax, "
                                             "then times V"),
        reference("random heads with padding, values and gradient",
                  [{"args": {"q": q, "k": k, "v": v, "mask": att_mask}, "grad": ["q", "k", "v"]}],
                  "scale by 1/√hs (the head size, q.size(-1)); the mask is broadcast over heads", ("output",)),
    ], forbidden=("scaled_dot_product_attention", "multi_head_attention_forward", "MultiheadAttention",
                  "_scaled_dot_product", "flash_attention", "efficient_attention"))

    g.update(critic_free_gradings(r))
    g.update(notebook_gradings(seed))
    return g


def _gae_lambda(named, args, lam):
    """None if the advantages match the λ = 1 or λ = 0 closed form on each row's run."""
    if "advantages" not in named:
        return "no advantages returned"
    rewards, values, mask, gamma = args["rewards"], args["values"], args["mask"], args["gamma"]
    expected = torch.zeros_like(values)
    for b in range(values.shape[0]):
        steps = [t for t in range(values.shape[1]) if mask[b, t]]
        for i, t in enumerate(steps):
            if lam == 1.0:  # Σ_k γᵏ r_{t+k} − V_t
                expected[b, t] = sum(gamma ** j * float(rewards[b, s]) for j, s in enumerate(steps[i:])) - float(values[b, t])
            else:  # r_t + γ·V_{t+1} − V_t
                nxt = float(values[b, steps[i + 1]]) if i + 1 < len(steps) else 0.0
                expected[b, t] = float(rewards[b, t]) + gamma * nxt - float(values[b, t])
    return checks._differs(named["advantages"], expected, (1e-6, 1e-8))


# ---------------------------------------------------------------------------------------
# Critic-free RL: group baselines and the aggregation of per-token terms.


def critic_free_gradings(r):
    """group_advantages, rloo_advantages and masked_aggregate; `r(salt)` draws the reference inputs."""
    gen = r(13)
    rewards = torch.randn(6, 4, generator=gen, dtype=F64)
    rewards[1] = 0.1                                          # an equal group: its mean rounds, r − mean is ±1 ulp
    rewards[4, :2] = rewards[4, 2:]                           # ties inside a group that still varies
    grpo_hint = ("(r − mean_g) / (std_g + eps) over dim=1 of each group (keepdim so it broadcasts), with the "
                 "population std (correction=0; G − 1 only when unbiased=True); a group of equal rewards is exactly 0")
    group = {
        "group_advantages": Grading("group_advantages", "minirlhf.losses", "group_advantages", "output", [
            *hand_checks(checks.group_advantages_cases, grpo_hint),
            Check("hand", "G = 2: the population std of (0, 1) is 1/2", [{"args": {"rewards": _f64([[0.0, 1.0]]),
                                                                                   "eps": 0.0}}],
                  "the population std divides by G (here 2), not G − 1: a sample std gives ±0.707 instead of ±1",
                  expected=[{"output": _f64([[-1.0, 1.0]])}]),
            Check("hand", "equal rewards with eps = 0 give exactly 0, not NaN",
                  [{"args": {"rewards": _f64([[0.1, 0.1, 0.1], [1.0, 2.0, 4.0]]), "eps": 0.0}}],
                  "select equal groups with torch.where(_equal_groups(rewards), 0, …): 0/0 is NaN, and ±1 ulp / a "
                  "std of 1e-17 is a large advantage", expected=[{"output": _f64([[0.0, 0.0, 0.0], [
                      -4 / 3 / math.sqrt(14 / 9), -1 / 3 / math.sqrt(14 / 9), 5 / 3 / math.sqrt(14 / 9)]])}],
                  tol=(1e-9, 1e-12)),
            Check("property", "each group's advantages sum to 0 (GRPO and Dr. GRPO)",
                  [{"args": {"rewards": rewards}}, {"args": {"rewards": rewards, "scale_std": False}}],
                  "subtract each group's own mean (dim=1), not the batch's", verify=_sum_to_zero),
            Check("property", "GRPO with eps = 0: each varying group's advantages have population std 1",
                  [{"args": {"rewards": rewards, "eps": 0.0}}],
                  "divide by the population std (correction=0): with G − 1 the std of the advantages is √((G−1)/G)",
                  verify=_unit_std),
            reference("random groups with ties and an equal group, every convention, values and gradient",
                      [{"args": {"rewards": rewards, **kw}, "grad": ["rewards"]}
                       for kw in ({}, {"scale_std": False}, {"unbiased": True, "eps": 1e-4})],
                      grpo_hint, ("output",), tol=(1e-6, 1e-8)),
        ]),
    }

    gen = r(14)
    rewards = torch.randn(5, 3, generator=gen, dtype=F64)
    rewards[2] = -0.7
    rloo_hint = "r_i minus the mean of the OTHER G − 1 rewards of its group: (sum_g − r_i) / (G − 1)"
    group["rloo_advantages"] = Grading("rloo_advantages", "minirlhf.losses", "rloo_advantages", "output", [
        *hand_checks(checks.rloo_advantages_cases, rloo_hint),
        Check("hand", "G = 2: each response against the other one", [{"args": {"rewards": _f64([[0.0, 1.0],
                                                                                               [3.0, -1.0]])}}],
              "leave response i out of its own baseline: with G = 2 the baseline is the other reward",
              expected=[{"output": _f64([[-1.0, 1.0], [4.0, -4.0]])}]),
        Check("property", "RLOO is G/(G−1)·(r − mean_g), G = 3 and G = 5",
              [{"args": {"rewards": rewards}}, {"args": {"rewards": torch.randn(4, 5, generator=gen, dtype=F64)}}],
              "the leave-one-out mean divides by G − 1 and excludes r_i; r − mean_g (with r_i in the mean) is "
              "Dr. GRPO, smaller by (G−1)/G", verify=_rloo_scaling),
        reference("random groups with an equal group, values and gradient",
                  [{"args": {"rewards": rewards}, "grad": ["rewards"]}], rloo_hint, ("output",), tol=(1e-6, 1e-8)),
    ])

    gen = r(15)
    x = torch.randn(5, 7, generator=gen, dtype=F64)
    mask = response_mask(gen, 5, 7, dtype=F64, allow_empty=True)
    x_nan = x.masked_fill(mask == 0, float("nan"))
    equal = torch.zeros(4, 7, dtype=F64)
    for b in range(4):                                        # every row 3 tokens long, at different offsets
        start = int(torch.randint(0, 5, (1,), generator=gen))
        equal[b, start:start + 3] = 1
    aggregate_hint = ("sequence: the mean over each row's own tokens, then the mean over all B rows (an empty row "
                      "adds 0 and still counts); constant: the masked sum / (B · max_tokens)")
    group["masked_aggregate"] = Grading("masked_aggregate", "minirlhf.losses", "masked_aggregate", "output", [
        *hand_checks(checks.masked_aggregate_cases, aggregate_hint),
        Check("hand", "rows of 3 tokens and 1 token: each aggregation weighs them differently", [
            {"args": {"x": _f64([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]]), "mask": _f64([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
                      "aggregation": name, "max_tokens": 4}} for name in ("sequence", "constant")],
              "sequence is (mean of row 0 + mean of row 1) / 2 = (2 + 10)/2, not the token mean 16/4; constant "
              "is 16 / (2 rows · 4)", expected=[{"output": 6.0}, {"output": 2.0}]),
        Check("property", "all rows the same length: sequence, constant (max_tokens = that length) and token agree",
              [{"args": {"x": x[:4], "mask": equal, "aggregation": name, "max_tokens": 3}}
               for name in ("sequence", "constant", "token")],
              "per row: masked_mean(x, mask, dim=1); the constant divides by B · max_tokens", verify=_all_equal),
        reference("random rows with an empty one, values and gradient (each token's weight)",
                  [{"args": {"x": x, "mask": mask, "aggregation": name, "max_tokens": 7}, "grad": ["x"]}
                   for name in ("sequence", "constant")],
                  "a token's weight is 1/(B·|row|) under sequence and 1/(B·max_tokens) under constant; an empty row "
                  "counts among the B", ("output",), tol=(1e-6, 1e-8)),
        reference("NaN off the mask never leaks in", [{"args": {"x": x_nan, "mask": mask, "aggregation": name,
                                                                "max_tokens": 7}} for name in ("sequence", "constant")],
                  "select the masked entries with torch.where (or masked_mean): NaN · 0 is NaN", ("output",),
                  tol=(1e-6, 1e-8)),
    ])
    return group


def _f64(rows):
    return torch.tensor(rows, dtype=F64)


def _sum_to_zero(outs, calls):
    for named in outs:
        sums = named["output"].sum(1)
        if not torch.allclose(sums, torch.zeros_like(sums), atol=1e-9):
            return f"group sums {checks._show(sums)}, expected 0 in every group"
    return None


def _unit_std(outs, calls):
    rewards, advantages = calls[0]["args"]["rewards"], outs[0]["output"]
    varying = ~(rewards == rewards[:, :1]).all(1)
    std = advantages[varying].std(1, correction=0)
    if not torch.allclose(std, torch.ones_like(std), atol=1e-6):
        return f"the groups' population stds are {checks._show(std)}, expected 1"
    return None


def _rloo_scaling(outs, calls):
    for named, call in zip(outs, calls):
        rewards = call["args"]["rewards"]
        G = rewards.shape[1]
        expected = G / (G - 1) * (rewards - rewards.mean(1, keepdim=True))
        problem = checks._differs(named["output"], expected, (1e-6, 1e-8))
        if problem:
            return f"G = {G}: {problem}"
    return None


def _all_equal(outs, calls):
    values = [float(named["output"]) for named in outs]
    if max(values) - min(values) > 1e-9:
        return f"sequence, constant and token gave {', '.join(f'{v:.6g}' for v in values)}, expected one value"
    return None


# ---------------------------------------------------------------------------------------
# Notebook exercises: the function a code cell defines, graded like the package's.


def notebook_gradings(seed):
    gen = np.random.default_rng(seed)
    rewards = gen.normal(size=(3, 5))
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=float)
    gold = gen.uniform(size=(2, 8))
    theta = torch.tensor(gen.normal(size=6))
    pi_ref = torch.softmax(torch.tensor(gen.normal(size=6)), 0)
    nb = lambda name, file, checks_, hint: Grading(  # noqa: E731
        name, "", name, "output", [Check(k, t, c, hint, expected=e, keys=("output",), tol=(1e-6, 1e-8))
                                   for k, t, c, e in checks_], notebook=file)
    return {
        "returns_to_go": nb("returns_to_go", "notebooks/00_rl_intro.ipynb", [
            ("hand", "γ = 0.5: rewards 1, 0, 2 then padding",
             [{"args": {"rewards": np.array([[1.0, 0.0, 2.0, 7.0]]), "mask": np.array([[1.0, 1.0, 1.0, 0.0]]),
                        "gamma": 0.5}}], [{"output": np.array([[1.5, 1.0, 2.0, 0.0]])}]),
            ("reference", "random rewards with padding", [{"args": {"rewards": rewards, "mask": mask, "gamma": 0.9}}],
             None)], "loop t = T−1 … 0; the running return restarts (× mask) where the mask is 0"),
        "gpt_parameter_count": nb("gpt_parameter_count", "notebooks/01_tiny_gpt_and_sft.ipynb", [
            ("hand", "V=100, T=16, L=3, C=8", [{"args": {"V": 100, "T": 16, "L": 3, "C": 8}}], [{"output": 3560}]),
            ("reference", "other sizes", [{"args": {"V": 517, "T": 64, "L": 4, "C": 96}}], None)],
            "per block: two LayerNorms (2·C each), the QKV and output projections, the 4·C MLP, all with biases"),
        "bayes_ceiling": nb("bayes_ceiling", "notebooks/02_reward_model.ipynb", [
            ("reference", "random gold scores", [{"args": {"gold_chosen": gold[0], "gold_rejected": gold[1],
                                                           "tau": 0.1}}], None)],
            "mean over pairs of σ(|g_c − g_r| / τ)"),
        "per_token_rewards": nb("per_token_rewards", "notebooks/03_ppo_rlhf.ipynb", [
            ("hand", "β = 0.5, three tokens", [{"args": {"score": 2.0, "logp": np.array([-1.0, -2.0, -0.5]),
                                                         "ref_logp": np.array([-2.0, -2.0, -1.0]), "beta": 0.5}}],
             [{"output": np.array([-0.5, 0.0, 1.75])}])],
            "−β·(logp − ref_logp) at every token, plus the score at the last one"),
        "dpo_pair_gradient": nb("dpo_pair_gradient", "notebooks/04_dpo.ipynb", [
            ("reference", "random logits and reference", [{"args": {"theta": theta, "w": 1, "l": 4, "beta": 0.5,
                                                                    "logp_ref": pi_ref.log()}}], None)],
            "−β·σ(r̂_l − r̂_w)·(e_w − e_l), with r̂ = β·(log π_θ − log π_ref)"),
    }
