"""Inline checks for the exercises, to call from a notebook: `check_sft_loss(sft_loss)`.

Each `check_<name>(fn)` runs `fn` on a few small cases whose answers are written here,
worked by hand (the comments show the arithmetic) or from the defining formula with
python's math module, never by calling minirlhf's own solution (in a student copy that is
the stub being written). It prints one line, ✓ when every case matches, or the first case
that differs with its inputs, the expected values and what `fn` returned; and returns
True or False. The full tests (`python -m pytest --exercise NAME`) check much more.

`<name>_cases()` returns the cases as data, `(title, inputs, expected[, tolerance])`: the
instructor's grader checks the same hand-computed values, and more.
"""
import math

import torch

FLOAT_TOL = (1e-5, 1e-6)  # (relative, absolute) tolerance of every comparison unless a case says


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _softplus(x):
    """−log σ(−x) = log(1 + eˣ), the Bradley-Terry / DPO loss of a margin −x."""
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------
# Running the cases and explaining a difference.


def _show(value):
    if isinstance(value, torch.Tensor):
        value = value.detach()
        rounded = _round(value.double().tolist()) if value.is_floating_point() else value.tolist()
        return f"tensor({rounded})"
    return repr(_round(value))


def _round(value):
    if isinstance(value, list):
        return [_round(v) for v in value]
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _differs(got, expected, tol):
    """None if got matches expected, else a short reason."""
    rtol, atol = tol
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor, got {type(got).__name__}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        ok = torch.allclose(got.detach().double(), expected.double(), rtol=rtol, atol=atol, equal_nan=False)
        return None if ok else "values differ"
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            return f"expected a number, got a tensor of shape {tuple(got.shape)}"
        got = got.item()
    if not isinstance(got, (int, float)) or not math.isclose(got, expected, rel_tol=rtol, abs_tol=atol):
        return "values differ"
    return None


def _run(name, fn, run, cases):
    """cases: (title, inputs, expected[, tol]); run(fn, inputs) -> dict of named results."""
    for case in cases:
        title, inputs, expected = case[:3]
        tol = case[3] if len(case) > 3 else FLOAT_TOL
        shown = ", ".join(f"{k}={_show(v)}" for k, v in inputs.items())
        try:
            got = run(fn, inputs)
        except NotImplementedError as e:
            print(f"✗ {name}: not implemented yet ({e})")
            return False
        except Exception as e:  # a student's bug: report it rather than raise
            print(f"✗ {name}: case '{title}' raised {type(e).__name__}: {e}\n    inputs:   {shown}")
            return False
        problems = {k: ("missing" if k not in got else _differs(got[k], v, tol)) for k, v in expected.items()}
        problems = {k: p for k, p in problems.items() if p}
        if problems:
            print(f"✗ {name}: case '{title}' differs ({'; '.join(f'{k}: {p}' for k, p in problems.items())})\n"
                  f"    inputs:   {shown}\n"
                  f"    expected: {', '.join(f'{k} = {_show(v)}' for k, v in expected.items())}\n"
                  f"    got:      {', '.join(f'{k} = {_show(got.get(k))}' for k in expected)}")
            return False
    print(f"✓ {name}: all {len(cases)} hand-computed cases match")
    return True


def _loss(fn, inputs):
    """Results of a function returning (loss, metrics): {"loss": …, **metrics}."""
    out = fn(**inputs)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise TypeError(f"expected a (loss, metrics) pair, got {type(out).__name__}")
    return {"loss": out[0], **out[1]}


def _output(fn, inputs):
    return {"output": fn(**inputs)}


def _t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------------------------------
# Supervised fine-tuning.


def token_logprobs_cases():
    return [
        ("uniform and tilted rows", dict(logits=_t([[[0.0, 0.0], [0.0, math.log(3.0)]]]), targets=_t([[0, 1]], torch.long)),
         # (0, 0): p = 1/2; (0, ln 3): p(1) = 3 / (1 + 3) = 3/4.
         {"output": _t([[math.log(0.5), math.log(0.75)]])}),
        ("three tokens, two rows", dict(logits=_t([[[1.0, 2.0, 3.0]], [[5.0, 5.0, 5.0]]]), targets=_t([[2], [1]], torch.long)),
         # e³ / (e + e² + e³) = 1 / (1 + e⁻¹ + e⁻²); equal logits: 1/3.
         {"output": _t([[-math.log(1 + math.exp(-1) + math.exp(-2))], [-math.log(3.0)]])}),
        ("large logits stay finite", dict(logits=_t([[[1000.0, 0.0]]]), targets=_t([[1]], torch.long)),
         {"output": _t([[-1000.0]])}),  # log(e⁰ / (e¹⁰⁰⁰ + 1)) ≈ −1000
    ]


def check_token_logprobs(fn):
    return _run("token_logprobs", fn, _output, token_logprobs_cases())


def sft_loss_cases():
    half, three_quarters = -math.log(0.5), -math.log(0.75)  # NLL of p = 1/2 and p = 3/4
    return [
        ("masked position ignored", dict(logits=_t([[[0.0, 0.0], [0.0, math.log(3.0)], [50.0, -50.0]]]),
                                         targets=_t([[0, 1, 1]], torch.long), mask=_t([[1.0, 1.0, 0.0]])),
         {"loss": (half + three_quarters) / 2, "sft/tokens": 2.0}),
        ("one mean over all tokens, not a mean of row means",
         dict(logits=_t([[[0.0, 0.0], [0.0, 0.0]], [[0.0, math.log(3.0)], [0.0, math.log(3.0)]]]),
              targets=_t([[0, 0], [1, 1]], torch.long), mask=_t([[1.0, 0.0], [1.0, 1.0]])),
         {"loss": (half + 2 * three_quarters) / 3, "sft/tokens": 3.0}),
    ]


def check_sft_loss(fn):
    return _run("sft_loss", fn, _loss, sft_loss_cases())


# ---------------------------------------------------------------------------------------
# Reward models.


def bradley_terry_loss_cases():
    return [
        ("equal rewards", dict(chosen_rewards=_t([0.3, -2.0]), rejected_rewards=_t([0.3, -2.0])),
         {"loss": math.log(2.0), "accuracy": 0.0, "rewards/margins": 0.0}),  # σ(0) = 1/2; ties are wrong
        ("margins +1 and −1", dict(chosen_rewards=_t([2.0, 0.0]), rejected_rewards=_t([1.0, 1.0])),
         {"loss": (_softplus(-1) + _softplus(1)) / 2, "accuracy": 0.5, "rewards/chosen": 1.0,
          "rewards/rejected": 1.0, "rewards/margins": 0.0}),
        ("a hopeless margin is finite", dict(chosen_rewards=_t([-1e4]), rejected_rewards=_t([0.0])),
         {"loss": 1e4, "accuracy": 0.0}),  # −log σ(−10⁴) ≈ 10⁴, not inf
    ]


def check_bradley_terry_loss(fn):
    return _run("bradley_terry_loss", fn, _loss, bradley_terry_loss_cases())


def ranking_loss_cases():
    ordered = (2 * _softplus(-1) + _softplus(-2)) / 3  # pairs (0,1), (0,2), (1,2): margins 1, 2, 1
    reversed_ = (2 * _softplus(1) + _softplus(2)) / 3  # margins −1, −2, −1
    return [
        ("K = 2 is Bradley-Terry", dict(rewards=_t([[2.0, 1.0]])), {"loss": _softplus(-1), "accuracy": 1.0}),
        ("K = 3, ordered", dict(rewards=_t([[2.0, 1.0, 0.0]])), {"loss": ordered, "accuracy": 1.0}),
        ("K = 3, ordered and reversed rows", dict(rewards=_t([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])),
         {"loss": (ordered + reversed_) / 2, "accuracy": 0.5}),
    ]


def check_ranking_loss(fn):
    return _run("ranking_loss", fn, _loss, ranking_loss_cases())


# ---------------------------------------------------------------------------------------
# PPO: KL penalty, rewards, advantages, losses, the adaptive coefficient.


def kl_penalty_cases():
    lp, ref = _t([[-1.0, -2.0]]), _t([[-2.0, -1.0]])  # d = (1, −1)
    tiny = _t([[1e-7, -1e-7]])
    return [
        ("k1 = d", dict(logprobs=lp, ref_logprobs=ref, estimator="k1"), {"output": _t([[1.0, -1.0]])}),
        ("k2 = d²/2", dict(logprobs=lp, ref_logprobs=ref, estimator="k2"), {"output": _t([[0.5, 0.5]])}),
        ("k3 = e⁻ᵈ − 1 + d", dict(logprobs=lp, ref_logprobs=ref, estimator="k3"),
         {"output": _t([[math.exp(-1), math.exp(1) - 2]])}),
        # For tiny d, k3 ≈ d²/2 = 5e-15; exp(−d) − 1 + d in float32 gives about −2e-8.
        ("k3 for tiny d in float32", dict(logprobs=tiny, ref_logprobs=torch.zeros(1, 2), estimator="k3"),
         {"output": _t([[5e-15, 5e-15]])}, (1e-3, 0.0)),
    ]


def check_kl_penalty(fn):
    return _run("kl_penalty", fn, _output, kl_penalty_cases())


def kl_penalized_rewards_cases():
    lp = _t([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = _t([[-1.5, -1.0, -3.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    mask = _t([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # the last row is empty
    return [
        # Row 0: d = (0.5, −1) on the run: −0.2·d = (−0.1, 0.2), score 1 at the last token.
        # Row 1: d = 0 on the run, score −2 at position 2. Row 2: nothing on the mask.
        ("k1", dict(scores=_t([1.0, -2.0, 5.0]), logprobs=lp, ref_logprobs=ref, mask=mask, kl_coef=0.2),
         {"output": _t([[-0.1, 1.2, 0.0], [0.0, 0.0, -2.0], [0.0, 0.0, 0.0]])}),
        # k2 = d²/2 = (0.125, 0.5): −0.2·k2 = (−0.025, −0.1).
        ("k2", dict(scores=_t([1.0, -2.0, 5.0]), logprobs=lp, ref_logprobs=ref, mask=mask, kl_coef=0.2,
                    estimator="k2"),
         {"output": _t([[-0.025, 0.9, 0.0], [0.0, 0.0, -2.0], [0.0, 0.0, 0.0]])}),
    ]


def check_kl_penalized_rewards(fn):
    return _run("kl_penalized_rewards", fn, _output, kl_penalized_rewards_cases())


def _pair(fn, inputs):
    advantages, returns = fn(**inputs)
    return {"advantages": advantages, "returns": returns}


def gae_cases():
    f64 = torch.float64
    junk = 1e6
    return [
        # γ = 0.9, λ = 0.8 (γλ = 0.72). δ2 = 2 − 1.5 = 0.5 (the episode ends: no V after it),
        # δ1 = 0 + 0.9·1.5 − 1 = 0.35, δ0 = 1 + 0.9·1 − 0.5 = 1.4.
        # A2 = 0.5, A1 = 0.35 + 0.72·0.5 = 0.71, A0 = 1.4 + 0.72·0.71 = 1.9112; R = A + V.
        ("three steps", dict(rewards=_t([[1.0, 0.0, 2.0]], f64), values=_t([[0.5, 1.0, 1.5]], f64),
                             mask=_t([[1.0, 1.0, 1.0]]), gamma=0.9, lam=0.8),
         {"advantages": _t([[1.9112, 0.71, 0.5]], f64), "returns": _t([[2.4112, 1.71, 2.0]], f64)}),
        ("the same after a prompt and before padding",
         dict(rewards=_t([[junk, 1.0, 0.0, 2.0, junk]], f64), values=_t([[junk, 0.5, 1.0, 1.5, junk]], f64),
              mask=_t([[0.0, 1.0, 1.0, 1.0, 0.0]]), gamma=0.9, lam=0.8),
         {"advantages": _t([[0.0, 1.9112, 0.71, 0.5, 0.0]], f64), "returns": _t([[0.0, 2.4112, 1.71, 2.0, 0.0]], f64)}),
        # γ = 1, λ = 0.5. Row 0: δ1 = 1 − 0.25 = 0.75, δ0 = 0.25 − 0.5 = −0.25, A0 = −0.25 + 0.5·0.75.
        # Row 1: δ2 = 2 − 1 = 1, δ1 = 1 − 1 = 0, A1 = 0 + 0.5·1.
        ("two rows, different runs", dict(rewards=_t([[0.0, 1.0, junk], [junk, 0.0, 2.0]], f64),
                                          values=_t([[0.5, 0.25, junk], [junk, 1.0, 1.0]], f64),
                                          mask=_t([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]), gamma=1.0, lam=0.5),
         {"advantages": _t([[0.125, 0.75, 0.0], [0.0, 0.5, 1.0]], f64),
          "returns": _t([[0.625, 1.0, 0.0], [0.0, 1.5, 2.0]], f64)}),
    ]


def check_gae(fn):
    return _run("gae", fn, _pair, gae_cases())


def ppo_policy_loss_cases():
    ratios = [1.5, 0.5, 0.5, 1.5]
    return [
        ("ratio 1: the loss is −mean(A) on the mask",
         dict(logprobs=_t([[-1.0, -2.0, -0.5, -3.0]]), old_logprobs=_t([[-1.0, -2.0, -0.5, -3.0]]),
              advantages=_t([[1.0, -3.0, 0.5, 100.0]]), mask=_t([[1.0, 1.0, 1.0, 0.0]])),
         {"loss": 0.5, "policy/clipfrac": 0.0, "policy/approx_kl": 0.0}),  # −(1 − 3 + 0.5)/3
        # ε = 0.2. (ρ, A) = (1.5, 1): max(−1.5, −1.2) = −1.2, clipped; (0.5, −1): max(0.5, 0.8) = 0.8,
        # clipped; (0.5, 1): max(−0.5, −0.8) = −0.5; (1.5, −1): max(1.5, 1.2) = 1.5. Mean 0.15.
        ("the clip binds on half the tokens",
         dict(logprobs=_t([[math.log(r) for r in ratios]]), old_logprobs=torch.zeros(1, 4),
              advantages=_t([[1.0, -1.0, 1.0, -1.0]]), mask=torch.ones(1, 4), clip_eps=0.2),
         {"loss": 0.15, "policy/clipfrac": 0.5,
          "policy/approx_kl": sum(r - 1 - math.log(r) for r in ratios) / 4}),
    ]


def check_ppo_policy_loss(fn):
    return _run("ppo_policy_loss", fn, _loss, ppo_policy_loss_cases())


def ppo_value_loss_cases():
    return [
        # v − old = (0.1, 0.5); ε = 0.2 clips the second to 0.2. Token 0: (1.1 − 2)² = 0.81 both ways;
        # token 1: max(0.5², 0.2²) = 0.25, the unclipped term. Loss 0.5·(0.81 + 0.25)/2.
        ("the unclipped term is larger", dict(values=_t([[1.1, 0.5]]), old_values=_t([[1.0, 0.0]]),
                                              returns=_t([[2.0, 0.0]]), mask=torch.ones(1, 2)),
         {"loss": 0.265, "val/clipfrac": 0.0, "val/mean": 0.8}),
        # v = 1, old = 0, so v_clip = 0.2. Token 0 (R = 0.9): max(0.01, 0.49) = 0.49, clipped;
        # token 1 (R = −1): max(4, 1.44) = 4. Token 2 is off the mask. Loss 0.5·(0.49 + 4)/2.
        ("the clipped term is larger", dict(values=_t([[1.0, 1.0, 9.0]]), old_values=torch.zeros(1, 3),
                                            returns=_t([[0.9, -1.0, 0.0]]), mask=_t([[1.0, 1.0, 0.0]]), clip_eps=0.2),
         {"loss": 1.1225, "val/clipfrac": 0.5, "val/mean": 1.0}),
    ]


def check_ppo_value_loss(fn):
    return _run("ppo_value_loss", fn, _loss, ppo_value_loss_cases())


def ppo_ptx_loss_cases():
    half, three_quarters = -math.log(0.5), -math.log(0.75)  # NLL of p = 1/2 and p = 3/4
    logits = _t([[[0.0, 0.0], [0.0, math.log(3.0)], [50.0, -50.0]]])  # p(0) = 1/2; p(1) = 3/4; p(1) ≈ e⁻¹⁰⁰
    targets, mask = _t([[0, 1, 1]], torch.long), _t([[1.0, 1.0, 0.0]])  # the third token is off the mask
    nll = (half + three_quarters) / 2
    return [
        # 0.3 + 0.5 · (ln 2 + ln 4/3)/2: the NLL is added (γ·E[log π] is maximised), weighted by γ.
        ("γ = 0.5, a masked token ignored", dict(rl_loss=_t(0.3), ptx_logits=logits, ptx_targets=targets,
                                                 ptx_mask=mask, ptx_coef=0.5),
         {"loss": 0.3 + 0.5 * nll, "loss/ptx": nll}),
        ("γ = 0 is plain PPO", dict(rl_loss=_t(-1.25), ptx_logits=logits, ptx_targets=targets, ptx_mask=mask,
                                    ptx_coef=0.0), {"loss": -1.25, "loss/ptx": nll}),
    ]


def check_ppo_ptx_loss(fn):
    return _run("ppo_ptx_loss", fn, _loss, ppo_ptx_loss_cases())


def _controller(cls, inputs):
    """Results of a controller class: construct with inputs["init"], then .update per inputs["updates"]."""
    controller = cls(**inputs["init"])
    results = {}
    for i, (kl, n_steps) in enumerate(inputs["updates"]):
        results[f"update {i + 1} returns"] = controller.update(kl, n_steps)
        results[f"value after {i + 1}"] = controller.value
    return results


def adaptive_kl_cases():
    # β = 0.1, target 6, horizon 10⁴, 100 steps each: e = 7/6 − 1 (unclipped), then +0.2, −0.2, 0.
    b1 = 0.1 * (1 + (7 / 6 - 1) * 0.01)
    b2 = b1 * (1 + 0.2 * 0.01)
    b3 = b2 * (1 - 0.2 * 0.01)
    return [
        ("above, far above, far below, on target",
         dict(init=dict(init_kl_coef=0.1, target=6.0, horizon=10_000), updates=[(7.0, 100), (60.0, 100), (0.0, 100),
                                                                                 (6.0, 100)]),
         {"update 1 returns": b1, "value after 1": b1, "update 2 returns": b2, "update 3 returns": b3,
          "update 4 returns": b3, "value after 4": b3}),
        ("half a horizon at 10 % over", dict(init=dict(init_kl_coef=1.0, target=1.0, horizon=100),
                                             updates=[(1.1, 50)]),
         {"update 1 returns": 1.05, "value after 1": 1.05}),  # 1·(1 + 0.1·50/100)
    ]


def check_adaptive_kl(cls):
    """`cls` is the controller class: cls(init_kl_coef, target, horizon) with .update and .value."""
    return _run("AdaptiveKLController.update", cls, _controller, adaptive_kl_cases())


# ---------------------------------------------------------------------------------------
# DPO.


def dpo_loss_cases():
    # β = 0.5 and h = (−1 − 0) − (−3 − 0) = 2, so βh = 1: −log σ(1) = softplus(−1).
    one = dict(policy_chosen_logps=_t([-1.0]), policy_rejected_logps=_t([-3.0]),
               ref_chosen_logps=_t([0.0]), ref_rejected_logps=_t([0.0]), beta=0.5)
    equal = dict(policy_chosen_logps=_t([-3.0, -7.5]), policy_rejected_logps=_t([-4.0, -2.0]),
                 ref_chosen_logps=_t([-3.0, -7.5]), ref_rejected_logps=_t([-4.0, -2.0]), beta=0.1)
    agree, disagree = _softplus(-1), _softplus(1)
    return [
        ("policy = reference", equal, {"loss": math.log(2.0), "rewards/margins": 0.0, "rewards/accuracies": 0.0}),
        ("sigmoid, βh = 1", one, {"loss": agree, "rewards/chosen": -0.5, "rewards/rejected": -1.5,
                                  "rewards/margins": 1.0, "rewards/accuracies": 1.0}),
        ("cDPO, ε = 0.1", {**one, "label_smoothing": 0.1}, {"loss": 0.9 * agree + 0.1 * disagree}),
        ("robust, ε = 0.1", {**one, "loss_type": "robust", "label_smoothing": 0.1},
         {"loss": (0.9 * agree - 0.1 * disagree) / 0.8}),
        ("hinge, βh = 1", {**one, "loss_type": "hinge"}, {"loss": 0.0}),  # relu(1 − 1)
        ("hinge, policy = reference", {**equal, "loss_type": "hinge"}, {"loss": 1.0}),
        ("ipo, h = 2, β = 0.5", {**one, "loss_type": "ipo"}, {"loss": 1.0}),  # (2 − 1/(2·0.5))²
        ("ipo, policy = reference", {**equal, "loss_type": "ipo"}, {"loss": 25.0}),  # (0 − 5)²
    ]


def check_dpo_loss(fn):
    return _run("dpo_loss", fn, _loss, dpo_loss_cases())


# ---------------------------------------------------------------------------------------
# Attention.


def attention_cases():
    """`fn(q, k, v, mask)` as attention_reference: q, k, v (B, nh, T, hs), mask (B, 1, Tq, Tk)."""
    # B = 1, nh = 2, T = 3, hs = 4 (scale 1/√4 = 1/2). Key 1 is padding: hidden from query 2,
    # visible only to itself. Head 0: query 1 scores keys (0, 1) as (0, 2)/2 → weights σ(−1), σ(1);
    # query 2 scores keys (0, 2) as (4, 0)/2 → σ(2), σ(−2). Head 1 has zero queries: a plain mean
    # of the visible values.
    q = _t([[[[1, 0, 0, 0], [0, 1, 0, 0], [2, 0, 0, 0]], [[0, 0, 0, 0]] * 3]])
    k = _t([[[[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0]], [[1, 1, 1, 1]] * 3]])
    v = _t([[[[1, 0, 0, 2], [0, 1, 0, 2], [0, 0, 1, 2]], [[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0]]]])
    mask = torch.tensor([[[[True, False, False], [True, True, False], [True, False, True]]]])
    expected = _t([[[[1, 0, 0, 2], [_sigmoid(-1), _sigmoid(1), 0, 2], [_sigmoid(2), 0, _sigmoid(-2), 2]],
                   [[4, 0, 0, 0], [2, 2, 0, 0], [2, 0, 2, 0]]]])
    return [
        ("two heads, causal mask with a padded key", dict(q=q, k=k, v=v, mask=mask), {"output": expected}),
        ("one query (a cached generation step) against all keys", dict(q=q[:, :, 2:], k=k, v=v, mask=mask[:, :, 2:]),
         {"output": expected[:, :, 2:]}),
    ]


def check_attention(fn):
    return _run("attention_reference", fn, _output, attention_cases())


# ---------------------------------------------------------------------------------------
# Critic-free RL: group baselines and the aggregation of per-token terms.


def group_advantages_cases():
    s = math.sqrt(1.5)  # rewards (1, 0, 0, 3): mean 1, deviations (0, −1, −1, 2), population variance 6/4
    return [
        ("GRPO: divide by the population std", dict(rewards=_t([[1.0, 0.0, 0.0, 3.0]]), eps=0.0),
         {"output": _t([[0.0, -1 / s, -1 / s, 2 / s]])}),
        ("Dr. GRPO: no std scaling", dict(rewards=_t([[1.0, 0.0, 0.0, 3.0]]), scale_std=False),
         {"output": _t([[0.0, -1.0, -1.0, 2.0]])}),
        # unbiased variance 6/3 = 2
        ("unbiased std (TRL's convention)", dict(rewards=_t([[1.0, 0.0, 0.0, 3.0]]), eps=0.0, unbiased=True),
         {"output": _t([[0.0, -1 / math.sqrt(2), -1 / math.sqrt(2), math.sqrt(2)]])}),
        ("equal rewards give 0; each group on its own", dict(rewards=_t([[0.3, 0.3, 0.3], [2.0, 4.0, 6.0]]),
                                                             scale_std=False),
         {"output": _t([[0.0, 0.0, 0.0], [-2.0, 0.0, 2.0]])}),
    ]


def check_group_advantages(fn):
    return _run("group_advantages", fn, _output, group_advantages_cases())


def rloo_advantages_cases():
    return [
        # leave-one-out means: (0+0+3)/3 = 1, (1+0+3)/3 = 4/3 twice, (1+0+0)/3 = 1/3
        ("a group of four", dict(rewards=_t([[1.0, 0.0, 0.0, 3.0]])), {"output": _t([[0.0, -4 / 3, -4 / 3, 8 / 3]])}),
        ("two groups of two", dict(rewards=_t([[2.0, 4.0], [1.0, 1.0]])), {"output": _t([[-2.0, 2.0], [0.0, 0.0]])}),
    ]


def check_rloo_advantages(fn):
    return _run("rloo_advantages", fn, _output, rloo_advantages_cases())


def masked_aggregate_cases():
    x, mask = _t([[1.0, 3.0, 100.0], [6.0, 100.0, 100.0]]), _t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return [
        # rows: (1 + 3)/2 = 2 and 6/1 = 6; the 100s are off the mask
        ("sequence: mean of row means", dict(x=x, mask=mask, aggregation="sequence"), {"output": 4.0}),
        # (1 + 3 + 6) / (2 rows · 5)
        ("constant: sum / (B · max_tokens)", dict(x=x, mask=mask, aggregation="constant", max_tokens=5),
         {"output": 1.0}),
        # row 0: (2 + 4)/2 = 3; row 1 is empty: 0, and still one of the B = 2 rows
        ("an empty row adds 0 and counts", dict(x=_t([[2.0, 4.0], [7.0, 7.0]]), mask=_t([[1.0, 1.0], [0.0, 0.0]]),
                                                aggregation="sequence"), {"output": 1.5}),
        ("inf off the mask never leaks in", dict(x=_t([[1.0, math.inf]]), mask=_t([[1.0, 0.0]]),
                                                 aggregation="constant", max_tokens=2), {"output": 0.5}),
    ]


def check_masked_aggregate(fn):
    return _run("masked_aggregate", fn, _output, masked_aggregate_cases())
