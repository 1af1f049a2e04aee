"""Step 3 without a critic: GRPO, Dr. GRPO, RLOO and REINFORCE++ against the reward model.

PPO (ppo.py) learns a value model to tell a good token from a lucky one. The critic-free
family drops it and takes the baseline from the samples themselves: draw a *group* of G
completions for each prompt, score them all, and use how much better each one is than its
siblings as the advantage of every one of its tokens. Each iteration:

    1. rollout: G completions for each of rollout_batch / G prompts; score them   sample_groups()
    2. log-probs of the sampled tokens under π (old) and π_ref
    3. advantages from the group (or the whole batch for REINFORCE++)             compute_advantages()
         grpo          (r − mean_g) / std_g       Shao et al. 2024 (DeepSeekMath), eq. 3
         dr_grpo       r − mean_g                 Liu et al. 2025, "Understanding R1-Zero-like training"
         rloo          r − mean of the other G−1  Ahmadian et al. 2024, "Back to basics"
         reinforce_pp  per-token KL-shaped returns-to-go, whitened over the batch   Hu 2025
    4. a few epochs of the clipped update (ppo_policy_loss with the chosen aggregation and
       clip-higher), plus kl_coef·k3 in the loss if kl_in="loss"                  policy_update()

The KL to the reference goes in the reward (k1, summed per response: the kit's PPO; per token
for reinforce_pp), in the loss (k3 per token, GRPO eq. 3), or nowhere. docs/grpo.md explains
every switch and shows what it does.

Deliberate simplifications: the policy stays in eval mode (dropout off); one rollout batch per
iteration; drop_zero_std_groups removes equal-reward groups from the update without sampling
more to refill the batch (DAPO re-samples); REINFORCE++ is the paper's plain variant (no
group baseline); the KL-in-loss term is not multiplied by the ratio (docs/grpo.md).
"""
import dataclasses
import statistics
import time
import types
import typing

import torch

from minirlhf.checkpoints import load_gpt, load_scalar_model
from minirlhf.config import (NON_NEGATIVE, POSITIVE, check_generation_fits, checked, one_of, require,
                             validate)
from minirlhf.data import default_path, read_prompts
from minirlhf.evaluate import evaluate_policy
from minirlhf.losses import (AGGREGATIONS, entropy, gae, group_advantages, kl_penalized_rewards, kl_penalty,
                             masked_aggregate, masked_mean, masked_whiten, ppo_policy_loss, rloo_advantages)
from minirlhf.optim import fused_adam, seed_everything, step_generator
from minirlhf.ppo import PERIODIC_EVAL, make_reward_fn, policy_forward
from minirlhf.runs import Run, check_same_task
from minirlhf.sampling import generate, response_logprobs, trim_padding
from minirlhf.sft import load_examples, validation_loss
from minirlhf.tasks import format_fn, get_task, is_verifiable, task_path
from minirlhf.tokenizer import load_tokenizer

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
KL_PLACES = ("reward", "loss", "none")
# Each method's own aggregation, used when `aggregation` is None: GRPO averages each response's
# tokens; Dr. GRPO divides by a constant; RLOO's estimator sums each response's tokens (a constant
# normaliser keeps that); REINFORCE++ (OpenRLHF) averages over all tokens of the batch.
METHOD_AGGREGATION = {"grpo": "sequence", "dr_grpo": "constant", "rloo": "constant", "reinforce_pp": "token"}


@dataclasses.dataclass
class GRPOConfig:
    """Critic-free RL. Defaults: the same 64 samples per iteration and 60 iterations as PPO's."""
    prompts: str = str(default_path("prompts_train"))       # rollout prompts JSONL: {"prompt"}
    test_prompts: str = str(default_path("prompts_test"))   # evaluation prompts
    val_data: typing.Optional[str] = None   # demonstrations for eval/ptx_loss (None: the task's sft_val.jsonl)
    task: str = "reviews"           # whose gold judge is logged (and optimised with reward=gold)
    reward: str = checked("rm", one_of("rm", "gold"))  # "rm": the learned reward model; "gold": the gold judge
    advantage: str = checked("grpo", one_of(*ADVANTAGES))  # grpo | dr_grpo | rloo | reinforce_pp (module docstring)
    group_size: int = checked(4, POSITIVE)     # G: completions sampled per prompt
    rollout_batch: int = checked(64, POSITIVE)  # completions per iteration (rollout_batch / G prompts); G must divide it
    iterations: int = checked(60, POSITIVE)    # rollout + update rounds
    minibatch_size: int = checked(32, POSITIVE)  # sequences per gradient step
    epochs: int = checked(2, POSITIVE)         # passes over each rollout batch
    lr: float = checked(3e-4, POSITIVE)        # policy learning rate (Adam)
    kl_in: str = checked("reward", one_of(*KL_PLACES))  # "reward": k1 in the reward; "loss": k3 (GRPO eq. 3); "none"
    kl_coef: float = checked(0.05, NON_NEGATIVE)  # β of the KL term, wherever it goes
    # sequence | token | constant; None: the method's own (METHOD_AGGREGATION)
    aggregation: typing.Optional[str] = checked(None, one_of(*AGGREGATIONS), "or none: the method's own")
    clip_eps: float = checked(0.2, POSITIVE)   # ratio clip ε (lower side, and upper if clip_eps_high is None)
    clip_eps_high: typing.Optional[float] = checked(None, POSITIVE)  # upper clip 1+ε_high (DAPO's clip-higher, 0.28); None: ε
    drop_zero_std_groups: bool = False  # leave groups with equal rewards out of the update (DAPO's dynamic sampling)
    temperature: float = checked(1.0, POSITIVE, "log-probs need a distribution")  # sampling temperature of rollouts (log-probs use the same)
    max_new_tokens: int = checked(48, POSITIVE)  # completion length limit; also the constant of aggregation="constant"
    max_prompt_tokens: int = checked(16, POSITIVE)  # longer prompts are refused
    grad_clip: float = checked(1.0, POSITIVE)  # global gradient-norm clip
    eval_every: int = checked(20, POSITIVE)    # iterations between periodic evaluations (gold reward vs KL)
    n_periodic_eval: int = checked(128, POSITIVE)  # test prompts per periodic evaluation
    n_eval_samples: int = checked(256, POSITIVE)  # test prompts for the final evaluation
    seed: int = 0                   # seeds prompts, sampling and minibatch order

    validate = validate

    def check_together(self):
        require(self.group_size >= 2 or self.advantage == "reinforce_pp",
                f"group_size must be >= 2 for advantage={self.advantage} (a group baseline needs "
                f"another sample), got {self.group_size}; only reinforce_pp allows 1")
        require(self.rollout_batch % self.group_size == 0,
                f"group_size {self.group_size} must divide rollout_batch {self.rollout_batch}: "
                "each iteration samples rollout_batch / group_size prompts")

    def resolved_aggregation(self):
        return self.aggregation or METHOD_AGGREGATION[self.advantage]


FAST = dict(iterations=8, rollout_batch=32, eval_every=4, n_periodic_eval=32, n_eval_samples=64, lr=5e-5)


# ---------------------------------------------------------------------------
# The algorithm: sample groups, score, advantages, clipped update (no harness in here)

@torch.no_grad()
def sample_groups(policy, reference, reward_fn, tokenizer, prompts, config, generator):
    """G completions per prompt, rows grouped (prompt 0's G rows first). Returns (batch, gold list);
    on a verifier task the batch also holds each row's format check, `format` (N,)."""
    repeated = [p for p in prompts for _ in range(config.group_size)]
    out, completions = generate(policy, tokenizer, repeated, max_new_tokens=config.max_new_tokens,
                                max_prompt_tokens=config.max_prompt_tokens, temperature=config.temperature,
                                generator=generator)
    tokens, attention, response = trim_padding(out.tokens, out.attention_mask, out.response_mask)
    logprobs, _, _ = policy_forward(policy, None, tokens, attention, config.temperature)    # (N, T-1)
    ref_logprobs = response_logprobs(reference, tokens, attention, config.temperature)       # (N, T-1)
    texts = [p + c for p, c in zip(repeated, completions)]
    scores, gold = reward_fn(tokens, attention, texts)                                      # (N,), list
    batch = dict(tokens=tokens, attention=attention, mask=response[:, 1:].float(), logprobs=logprobs,
                 ref_logprobs=ref_logprobs, scores=scores, finished=out.finished.float())
    if format_fn(config.task) is not None:      # logged only: the correctness reward is `scores`
        batch["format"] = torch.tensor(format_fn(config.task)(texts))                        # (N,)
    return batch, gold


def compute_advantages(batch, config):
    """Per-token advantages (N, T-1) from the scores, and the rewards' group view (N/G, G)."""
    mask, scores, G = batch["mask"], batch["scores"], config.group_size
    kl_coef = config.kl_coef if config.kl_in == "reward" else 0.0
    if config.advantage == "reinforce_pp":
        # REINFORCE++ (Hu 2025, eq. 6-7): A_t = r(x, y) − β Σ_{i≥t} KL_i, whitened over the whole batch.
        # Returns-to-go are GAE with V = 0, γ = λ = 1 (tests/test_losses.py checks that identity).
        rewards = kl_penalized_rewards(scores, batch["logprobs"], batch["ref_logprobs"], mask, kl_coef)  # (N, T-1)
        returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
        sequence_rewards = (rewards * mask).sum(-1)                                      # (N,)
        return masked_whiten(returns, mask), sequence_rewards.view(-1, G)
    # The others: one reward per response, k1 summed over its tokens as the kit's PPO pays it.
    sequence_kl = ((batch["logprobs"] - batch["ref_logprobs"]) * mask).sum(-1)            # (N,)
    grouped = (scores - kl_coef * sequence_kl).view(-1, G)                                # (N/G, G)
    if config.advantage == "rloo":
        advantages = rloo_advantages(grouped)
    else:
        advantages = group_advantages(grouped, scale_std=config.advantage == "grpo")
    return advantages.reshape(-1, 1) * mask, grouped                                      # (N, 1) over T-1


def policy_update(policy, optimizer, batch, config, generator, check_finite=lambda loss: None):
    """`epochs` passes of the clipped update over shuffled minibatches; returns mean metrics.

    `check_finite(loss)` stops training on a NaN or inf loss (the run harness's)."""
    aggregation = config.resolved_aggregation()
    n, logs = batch["tokens"].size(0), []
    for _ in range(config.epochs if n else 0):   # n = 0: drop_zero_std_groups left nothing to learn from
        for idx in torch.randperm(n, generator=generator).split(config.minibatch_size):
            mb = {k: v[idx] for k, v in batch.items()}
            logprobs, logits, _ = policy_forward(policy, None, mb["tokens"], mb["attention"], config.temperature)
            loss, metrics = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], config.clip_eps,
                                            config.clip_eps_high, aggregation, config.max_new_tokens)
            if config.kl_in == "loss":   # GRPO eq. 3: + β·k3 per token, inside the same aggregation
                kl = masked_aggregate(kl_penalty(logprobs, mb["ref_logprobs"], "k3"), mb["mask"], aggregation,
                                      config.max_new_tokens)
                loss = loss + config.kl_coef * kl
                metrics["loss/kl"] = kl.item()
            check_finite(loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
            optimizer.step()
            with torch.no_grad():
                mean_entropy = masked_mean(entropy(logits), mb["mask"]).item()
            logs.append({**metrics, "objective/entropy": mean_entropy})
    return {k: statistics.mean(r[k] for r in logs) for k in logs[0]} if logs else {}


def grpo_iteration(policy, reference, optimizer, reward_fn, tokenizer, prompts, config, generator,
                   check_finite=lambda loss: None):
    """One round: sample groups, score, advantages, update. Returns the iteration's metrics."""
    batch, gold = sample_groups(policy, reference, reward_fn, tokenizer, prompts, config, generator)
    batch["advantages"], grouped = compute_advantages(batch, config)
    zero_std = (grouped == grouped[:, :1]).all(1)                                         # (N/G,) equal rewards
    mask = batch["mask"]
    stats = {"objective/scores": batch["scores"].mean().item(), "gold/reward": statistics.mean(gold),
             "objective/kl": ((batch["logprobs"] - batch["ref_logprobs"]) * mask).sum(-1).mean().item(),
             "objective/length": mask.sum(-1).mean().item(), "objective/eos_rate": batch["finished"].mean().item(),
             "frac_reward_zero_std": zero_std.float().mean().item() if config.group_size > 1 else 0.0}
    if is_verifiable(config.task):   # a 0/1 reward: which groups teach nothing, and why
        right = torch.tensor(gold).view(-1, config.group_size)                            # (N/G, G)
        stats.update({"frac_groups_all_right": (right == 1).all(1).float().mean().item(),
                      "frac_groups_all_wrong": (right == 0).all(1).float().mean().item(),
                      "gold/format_reward": batch["format"].mean().item()})
    if config.drop_zero_std_groups and config.group_size > 1:
        keep = (~zero_std).repeat_interleave(config.group_size)                           # (N,)
        batch = {k: v[keep] for k, v in batch.items()}
    stats.update(policy_update(policy, optimizer, batch, config, generator, check_finite))
    return stats


# ---------------------------------------------------------------------------
# Training

def train_grpo(config, sft_dir, rm_dir, out_dir, device="cpu", resume=False, overwrite=False, progress=True):
    """Run the critic-free stage from the SFT model against the reward model (or gold); return the summary."""
    config.validate()
    require(config.reward == "gold" or rm_dir is not None, "--rm is needed unless --reward gold")
    check_same_task(config.task, sft=sft_dir, rm=rm_dir)
    tokenizer = load_tokenizer()
    policy = load_gpt(sft_dir, device, tokenizer)
    check_generation_fits(config, policy.config.block_size)
    reference = load_gpt(sft_dir, device, tokenizer).requires_grad_(False)
    reward_model = load_scalar_model(rm_dir, device, tokenizer).requires_grad_(False) if rm_dir else None
    seed_everything(config.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr, eps=1e-5, **fused_adam(policy.parameters()))
    gold_fn = get_task(config.task).gold_reward
    reward_fn = make_reward_fn(config, reward_model, gold_fn, device)
    prompts = read_prompts(config.prompts, tokenizer, config.max_prompt_tokens)  # every prompt checked now
    test_prompts = read_prompts(config.test_prompts, tokenizer, config.max_prompt_tokens)
    lengths = types.SimpleNamespace(block_size=policy.config.block_size, max_prompt_tokens=config.max_prompt_tokens)
    val_examples = load_examples(config.val_data or str(task_path(config.task, "sft_val")), tokenizer,
                                 lengths)                                       # for eval/ptx_loss
    n_prompts = config.rollout_batch // config.group_size

    def evaluate(n):
        return evaluate_policy(policy, tokenizer, test_prompts[:n], gold_fn, reference=reference,
                               reward_model=reward_model, max_new_tokens=config.max_new_tokens,
                               max_prompt_tokens=config.max_prompt_tokens, generator=step_generator(config.seed, -1),
                               format_fn=format_fn(config.task))

    with Run(out_dir, "grpo", config, resume=resume, overwrite=overwrite, progress=progress,
             sft=sft_dir, rm=rm_dir) as run:
        t_start = time.perf_counter()
        run.start({"policy": policy, "policy_opt": optimizer}, policy.config)
        for it in run.steps(config.iterations, desc=f"grpo ({config.advantage})"):
            generator = step_generator(config.seed, it)
            ids = torch.randint(len(prompts), (n_prompts,), generator=generator).tolist()
            stats = grpo_iteration(policy, reference, optimizer, reward_fn, tokenizer, [prompts[i] for i in ids],
                                   config, generator, run.check_finite)
            stats.update(kl_coef=config.kl_coef, step=it + 1)
            if (it + 1) % config.eval_every == 0 or it + 1 == config.iterations:
                stats.update({k: v for k, v in evaluate(config.n_periodic_eval).items()
                              if k in PERIODIC_EVAL})
                run.checkpoint(it + 1)
            run.log(stats)
            run.show(score=f"{stats['objective/scores']:.2f}", gold=f"{stats['gold/reward']:.2f}",
                     kl=f"{stats['objective/kl']:.2f}", zero_std=f"{stats['frac_reward_zero_std']:.2f}")

        summary = evaluate(config.n_eval_samples)
        summary["eval/ptx_loss"] = validation_loss(policy, val_examples, tokenizer.eot_token, device)
        summary["train/seconds"] = time.perf_counter() - t_start
        run.plot(["objective/scores", "gold/reward", "objective/kl", "objective/length"], "grpo.png",
                 f"{config.advantage}: proxy and gold reward, KL, length per iteration")
        run.plot(["frac_reward_zero_std", "objective/entropy", "policy/clipfrac", "policy/approx_kl"],
                 "grpo_diagnostics.png", f"{config.advantage} diagnostics")
        if is_verifiable(config.task):
            run.plot(["frac_groups_all_right", "frac_groups_all_wrong", "gold/format_reward", "objective/length"],
                     "grpo_groups.png", f"{config.advantage} on a verifier: groups that teach nothing, format, length")
        return run.finish(summary, policy)
