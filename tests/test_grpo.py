"""The critic-free stage (grpo.py) on a tiny SFT model.

Checks that a short GRPO run raises the gold reward and writes PPO's summary keys; that
before the first update the ratio is exactly 1; that groups with equal rewards get zero
advantages and are counted in frac_reward_zero_std (and dropped with drop_zero_std_groups);
that every advantage, aggregation and KL placement runs; and that bad input (G < 2 for a
group method, G not dividing the batch, an unknown name) is a one-line error listing the
valid choices, raised before any work.
"""
import json
import os
import signal

import pytest
import torch

from helpers import tiny_sft_dir
from minirlhf import checkpoints
from minirlhf import runs as harness
from minirlhf.__main__ import main
from minirlhf.config import apply_overrides
from minirlhf.data import default_path, read_prompts
from minirlhf.evaluate import evaluate_policy
from minirlhf.files import load_torch
from minirlhf.grpo import GRPOConfig, compute_advantages, grpo_iteration, sample_groups, train_grpo
from minirlhf.losses import ppo_policy_loss
from minirlhf.optim import step_generator
from minirlhf.ppo import make_reward_fn, policy_forward
from minirlhf.tasks import get_task
from minirlhf.tokenizer import load_tokenizer

TINY = dict(reward="gold", iterations=10, rollout_batch=32, group_size=4, minibatch_size=16, lr=1e-3,
            eval_every=5, n_periodic_eval=32, n_eval_samples=128, max_new_tokens=30)
PROMPTS = ["the movie was", "i loved", "the plot was not", "i would"]
SEED0 = lambda: torch.Generator().manual_seed(0)


def setup(**overrides):
    tokenizer = load_tokenizer()
    policy = checkpoints.load_gpt(tiny_sft_dir(), tokenizer=tokenizer)
    reference = checkpoints.load_gpt(tiny_sft_dir(), tokenizer=tokenizer).requires_grad_(False)
    config = apply_overrides(GRPOConfig(), {**TINY, **overrides})
    reward_fn = make_reward_fn(config, None, get_task("reviews").gold_reward, "cpu")
    return tokenizer, policy, reference, config, reward_fn


def test_short_run_raises_gold_reward(tmp_path):
    summary = train_grpo(apply_overrides(GRPOConfig(), TINY), tiny_sft_dir(), None, tmp_path / "grpo",
                         progress=False)
    tokenizer = load_tokenizer()
    sft = checkpoints.load_gpt(tiny_sft_dir(), tokenizer=tokenizer)
    prompts = read_prompts(default_path("prompts_test"))[:128]
    before = evaluate_policy(sft, tokenizer, prompts, get_task("reviews").gold_reward, max_new_tokens=30,
                             generator=step_generator(0, -1))
    assert summary["eval/gold_reward"] > before["eval/gold_reward"] + 0.05
    assert summary["eval/kl"] > 0.0
    # the same summary keys as PPO's, so the stage sits in the same report
    assert {"eval/gold_reward", "eval/gold_reward_sem", "eval/kl", "eval/length", "train/seconds"} <= set(summary)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {"frac_reward_zero_std", "objective/length", "objective/entropy", "policy/clipfrac",
                                "objective/kl", "objective/scores", "gold/reward"} <= set(rows[0])
    assert (tmp_path / "grpo" / "grpo.png").exists() and (tmp_path / "grpo" / "model.pt").exists()


def test_ratio_is_exactly_one_before_the_first_update():
    tokenizer, policy, reference, config, reward_fn = setup(temperature=0.7)
    batch, gold = sample_groups(policy, reference, reward_fn, tokenizer, PROMPTS, config, SEED0())
    assert batch["tokens"].shape[0] == len(PROMPTS) * config.group_size == len(gold)
    logprobs, _, _ = policy_forward(policy, None, batch["tokens"], batch["attention"], config.temperature)
    assert torch.equal(logprobs * batch["mask"], batch["logprobs"] * batch["mask"])
    advantages, _ = compute_advantages(batch, config)
    _, metrics = ppo_policy_loss(logprobs, batch["logprobs"], advantages, batch["mask"])
    assert metrics["policy/ratio_mean"] == 1.0 and metrics["policy/clipfrac"] == 0.0


def test_equal_reward_groups_count_in_frac_zero_std_and_can_be_dropped():
    tokenizer, policy, reference, config, _ = setup()
    # a reward that only the first prompt's group can vary in: the other groups are all 0.5

    def reward_fn(tokens, attention, texts):
        scores = torch.tensor([float(len(t)) if t.startswith("the movie") else 0.5 for t in texts])
        return scores, scores.tolist()
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    for drop in (False, True):
        policy.load_state_dict(state)
        config = apply_overrides(config, {"kl_in": "none", "drop_zero_std_groups": drop})
        batch, _ = sample_groups(policy, reference, reward_fn, tokenizer, PROMPTS, config, SEED0())
        advantages, grouped = compute_advantages(batch, config)
        assert advantages[config.group_size:].eq(0).all() and advantages[:config.group_size].ne(0).any()
        stats = grpo_iteration(policy, reference, optimizer, reward_fn, tokenizer, PROMPTS, config,
                               torch.Generator().manual_seed(0))
        assert stats["frac_reward_zero_std"] == 0.75
    # every group equal: nothing to learn; dropping them leaves no gradient step at all
    constant = lambda tokens, attention, texts: (torch.full((len(texts),), 0.5), [0.5] * len(texts))
    stats = grpo_iteration(policy, reference, optimizer, constant, tokenizer, PROMPTS, config,
                           torch.Generator().manual_seed(0))
    assert stats["frac_reward_zero_std"] == 1.0 and "loss/policy" not in stats


@pytest.mark.parametrize("overrides", [
    dict(advantage="grpo", aggregation="token", kl_in="loss"),
    dict(advantage="dr_grpo"),
    dict(advantage="rloo", aggregation="sequence", clip_eps_high=0.28),
    dict(advantage="reinforce_pp", group_size=1),
    dict(advantage="reinforce_pp", kl_in="none", drop_zero_std_groups=True),
], ids=["grpo-token-klloss", "dr_grpo", "rloo-sequence-cliphigh", "reinforce_pp-G1", "reinforce_pp-nokl-drop"])
def test_every_switch_runs_one_iteration(overrides):
    tokenizer, policy, reference, config, reward_fn = setup(**overrides)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    before = [p.clone() for p in policy.parameters()]
    stats = grpo_iteration(policy, reference, optimizer, reward_fn, tokenizer, PROMPTS, config,
                           torch.Generator().manual_seed(1))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert ("loss/kl" in stats) == (config.kl_in == "loss")


def test_reinforce_pp_advantages_are_whitened_over_the_batch():
    tokenizer, policy, reference, config, reward_fn = setup(advantage="reinforce_pp")
    batch, _ = sample_groups(policy, reference, reward_fn, tokenizer, PROMPTS, config, torch.Generator().manual_seed(2))
    advantages, _ = compute_advantages(batch, config)
    mask = batch["mask"]
    values = advantages[mask > 0]
    assert values.mean().abs() < 1e-5 and (values.std(correction=0) - 1).abs() < 1e-3
    assert advantages[mask == 0].eq(0).all()


@pytest.mark.parametrize("sets, message", [
    (["group_size=1"], "group_size must be >= 2 for advantage=grpo"),
    (["advantage=rloo", "group_size=1"], "group_size must be >= 2 for advantage=rloo"),
    (["group_size=3"], "group_size 3 must divide rollout_batch 64"),
    (["advantage=ppo"], "advantage must be one of grpo, dr_grpo, rloo, reinforce_pp, got 'ppo'"),
    (["aggregation=mean"], "aggregation must be one of token, sequence, constant, got 'mean' (or none: "),
    (["kl_in=both"], "kl_in must be one of reward, loss, none, got 'both'"),
    (["clip_eps_high=0"], "clip_eps_high must be positive"),
])
def test_bad_input_is_one_line_listing_the_choices(tmp_path, capsys, sets, message):
    # --sft points nowhere: the error must come from the config, before anything is loaded
    code = main(["grpo", "--sft", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--quiet", "--set", *sets])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_interrupted_run_resumes_to_the_same_summary(tmp_path, monkeypatch):
    config = apply_overrides(GRPOConfig(), dict(TINY, iterations=6, eval_every=2, rollout_batch=16,
                                                       n_periodic_eval=8, n_eval_samples=16, max_new_tokens=16))
    run = lambda out, **kw: train_grpo(config, tiny_sft_dir(), None, tmp_path / out, progress=False, **kw)
    whole = run("whole")
    real, sent = harness.check_finite, []

    def check_finite(loss, step, out_dir=None):   # a real SIGINT at iteration 3, caught by GracefulStop
        if step >= 3 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return real(loss, step, out_dir)
    monkeypatch.setattr(harness, "check_finite", check_finite)
    with pytest.raises(harness.Interrupted, match="--resume"):
        run("cut")
    monkeypatch.undo()
    assert load_torch(tmp_path / "cut" / "checkpoint.pt")["step"] == 3
    resumed = run("cut", resume=True)
    drop = lambda summary: {k: v for k, v in summary.items() if k != "train/seconds"}
    assert drop(resumed) == drop(whole)
