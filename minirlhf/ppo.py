"""Step 3 of RLHF: PPO against the reward model, with a per-token KL penalty.

InstructGPT (Ouyang et al. 2022, eq. 2) maximises

    E_{x, y~π}[ r(x, y) − β · log(π(y|x) / π_SFT(y|x)) ] + γ · E_{x~pretrain}[ log π(x) ]

Text generation is an MDP: the state is the prompt plus the tokens so far, an action is
the next token, and the episode ends at EOS. The reward model's score arrives at the last
token; the KL term is paid token by token (Ziegler et al. 2019; `kl_penalized_rewards`).
Each iteration:

    1. rollout: sample completions from π (KV cache), score them with the reward model
    2. log-probs of the sampled tokens under π (old) and π_SFT (reference), critic values
    3. per-token rewards = score at the end − β·KL per token; GAE advantages (γ=1, λ=0.95)
    4. a few epochs of clipped PPO updates on shuffled minibatches (Schulman et al. 2017),
       plus γ_ptx × NLL of SFT demonstrations (PPO-ptx)

Deliberate simplifications: the policy stays in eval mode (dropout off, as RLHF needs);
the "pretraining" data of PPO-ptx is the SFT demonstrations, as the toy task has no
other corpus; one rollout batch per iteration, no replay.
"""
import dataclasses
import statistics
import time
import types
import typing

import torch

from minirlhf.checkpoints import load_gpt, load_scalar_model
from minirlhf.config import NON_NEGATIVE, POSITIVE, between, check_generation_fits, checked, one_of, require, validate
from minirlhf.data import completion_batch, default_path, read_prompts, shift_for_loss
from minirlhf.evaluate import evaluate_policy
from minirlhf.losses import (AdaptiveKLController, entropy, explained_variance, gae, kl_penalized_rewards,
                             masked_mean, masked_whiten, ppo_policy_loss, ppo_ptx_loss, ppo_value_loss, token_logprobs)
from minirlhf.model import ScalarHeadModel
from minirlhf.optim import fused_adam, seed_everything, step_generator
from minirlhf.runs import Run, check_same_task
from minirlhf.sampling import generate, response_logprobs, trim_padding
from minirlhf.sft import load_examples, validation_loss
from minirlhf.tasks import format_fn, get_task, task_path
from minirlhf.tokenizer import load_tokenizer


@dataclasses.dataclass
class PPOConfig:
    """RLHF with PPO. Defaults train the default SFT model to gold reward ~0.9 in under two minutes."""
    prompts: str = str(default_path("prompts_train"))       # rollout prompts JSONL: {"prompt"}
    test_prompts: str = str(default_path("prompts_test"))   # evaluation prompts
    ptx_data: str = str(default_path("sft_train"))           # demonstrations for PPO-ptx
    val_data: typing.Optional[str] = None   # demonstrations for eval/ptx_loss (None: the task's sft_val.jsonl)
    task: str = "reviews"           # whose gold judge is logged (and optimised with reward=gold)
    reward: str = checked("rm", one_of("rm", "gold"))  # "rm": the learned reward model; "gold": the gold judge (PPO-GT)
    iterations: int = checked(60, POSITIVE)      # rollout + update rounds
    rollout_batch: int = checked(64, POSITIVE)   # prompts sampled per iteration
    minibatch_size: int = checked(32, POSITIVE)  # sequences per gradient step
    ppo_epochs: int = checked(2, POSITIVE)       # passes over each rollout batch
    lr: float = checked(3e-4, POSITIVE)          # policy learning rate (Adam); high for a big model, right for a tiny one
    value_lr: float = checked(1e-4, POSITIVE)    # critic learning rate
    kl_coef: float = checked(0.05, NON_NEGATIVE)  # β: the per-token KL penalty coefficient (initial value if adaptive)
    kl_estimator: str = checked("k1", one_of("k1", "k3"))  # per-token KL estimate in the reward: k1 (log-ratio) or k3
    adaptive_kl: bool = False       # adapt β towards kl_target (Ziegler et al. 2019)
    kl_target: float = checked(3.0, POSITIVE)    # target sequence KL in nats for the adaptive controller
    kl_horizon: int = checked(2000, POSITIVE)    # controller horizon in sequences
    gamma: float = checked(1.0, between(0, 1))   # discount; 1 as the reward arrives once, at the end
    lam: float = checked(0.95, between(0, 1))    # GAE λ
    clip_eps: float = checked(0.2, POSITIVE)     # PPO ratio clip ε
    value_clip_eps: float = checked(0.2, POSITIVE)  # critic value clip
    whiten_rewards: bool = False    # standardise per-token rewards within the batch before GAE
    critic: str = checked("separate", one_of("separate", "shared"))  # "separate": value model initialised from the RM; "shared": a head on the policy trunk
    vf_coef: float = checked(0.5, NON_NEGATIVE)  # value-loss weight when the critic is shared
    ptx_coef: float = checked(0.0, NON_NEGATIVE)  # γ of PPO-ptx: weight of the demonstrations' NLL (0 = off)
    ptx_batch: int = checked(32, POSITIVE)       # demonstrations per ptx gradient step
    missing_eos_penalty: float = checked(0.0, NON_NEGATIVE, "it is subtracted")  # subtracted from the score of completions that never emit EOS
    temperature: float = checked(1.0, POSITIVE, "log-probs need a distribution")  # sampling temperature of rollouts (log-probs use the same)
    max_new_tokens: int = checked(48, POSITIVE)  # completion length limit
    max_prompt_tokens: int = checked(16, POSITIVE)  # longer prompts are refused
    grad_clip: float = checked(1.0, POSITIVE)    # global gradient-norm clip
    eval_every: int = checked(20, POSITIVE)  # iterations between periodic evaluations (gold reward vs KL)
    n_periodic_eval: int = checked(128, POSITIVE)  # test prompts per periodic evaluation
    n_eval_samples: int = checked(256, POSITIVE)  # test prompts for the final evaluation
    seed: int = 0                   # seeds prompts, sampling and minibatch order


    validate = validate


# --fast: a smaller step, as the fast reward model is weak (~67 % accuracy) and lr 3e-4 wrecked the tiny policy
FAST = dict(iterations=8, rollout_batch=32, eval_every=4, n_periodic_eval=32, n_eval_samples=64, lr=5e-5)
# the periodic evaluation's metrics kept in metrics.jsonl (pass@1 and format: a verifier task only)
PERIODIC_EVAL = ("eval/gold_reward", "eval/kl", "eval/proxy_reward", "eval/pass@1", "eval/format_reward")


# ---------------------------------------------------------------------------
# Rollouts: sample, score, and compute everything the update needs

def policy_forward(policy, value_head, tokens, attention_mask, temperature):
    """Log-probs (B, T-1) of tokens[:, 1:], logits (B, T-1, V) and, with a shared critic, values (B, T-1)."""
    hidden = policy.hidden_states(tokens[:, :-1], attention_mask[:, :-1])   # (B, T-1, C)
    logits = policy.lm_head(hidden) / temperature                           # (B, T-1, V)
    values = value_head(hidden).squeeze(-1) if value_head is not None else None  # (B, T-1)
    return token_logprobs(logits, tokens[:, 1:]), logits, values


@torch.no_grad()
def rollout(policy, reference, critic, reward_fn, tokenizer, prompts, config, generator, kl_coef):
    """Sample one completion per prompt and compute rewards, advantages and returns (all (B, T-1))."""
    out, completions = generate(policy, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                                max_prompt_tokens=config.max_prompt_tokens, temperature=config.temperature,
                                generator=generator)
    tokens, attention, response = trim_padding(out.tokens, out.attention_mask, out.response_mask)
    mask = response[:, 1:].float()                                           # (B, T-1), the actions
    value_head = critic if config.critic == "shared" else None
    logprobs, _, values = policy_forward(policy, value_head, tokens, attention, config.temperature)
    ref_logprobs = response_logprobs(reference, tokens, attention, config.temperature)  # (B, T-1)
    if values is None:
        values = critic(tokens[:, :-1], attention[:, :-1])                   # (B, T-1): V(state before token t+1)
    texts = [p + c for p, c in zip(prompts, completions)]
    scores, gold = reward_fn(tokens, attention, texts)                       # (B,), list of floats
    formatted = format_fn(config.task)(texts) if format_fn(config.task) else None   # logged, never rewarded
    scores = scores - config.missing_eos_penalty * (~out.finished).float()
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, config.kl_estimator)
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    advantages, returns = gae(rewards, values * mask, mask, config.gamma, config.lam)
    seq_kl = ((logprobs - ref_logprobs) * mask).sum(-1)                      # (B,) sequence log-ratio
    stats = {"objective/scores": scores.mean().item(), "gold/reward": statistics.mean(gold),
             "objective/kl": seq_kl.mean().item(), "objective/kl_sem": (seq_kl.std() / len(seq_kl) ** 0.5).item(),
             "objective/rlhf_reward": (scores - kl_coef * seq_kl).mean().item(),
             "objective/eos_rate": out.finished.float().mean().item(),
             "objective/length": mask.sum(-1).mean().item()}
    if formatted is not None:
        stats["gold/format_reward"] = statistics.mean(formatted)
    batch = dict(tokens=tokens, attention=attention, mask=mask, logprobs=logprobs, values=values,
                 advantages=masked_whiten(advantages, mask) * mask, returns=returns)
    return batch, stats, texts


# ---------------------------------------------------------------------------
# The PPO update

def ppo_update(policy, critic, optimizers, batch, ptx_examples, pad_id, config, generator,
               check_finite=lambda loss: None):
    """`ppo_epochs` passes of clipped policy and value updates over shuffled minibatches.

    `check_finite(loss)` stops training on a NaN or inf loss (the run harness's)."""
    n = batch["tokens"].size(0)
    shared = config.critic == "shared"
    logs = []
    for epoch in range(config.ppo_epochs):
        for idx in torch.randperm(n, generator=generator).split(config.minibatch_size):
            mb = {k: v[idx] for k, v in batch.items()}
            logprobs, logits, values = policy_forward(policy, critic if shared else None,
                                                      mb["tokens"], mb["attention"], config.temperature)
            pg_loss, pg_metrics = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"],
                                                  config.clip_eps)
            if not shared:
                values = critic(mb["tokens"][:, :-1], mb["attention"][:, :-1])        # (b, T-1)
            vf_loss, vf_metrics = ppo_value_loss(values, mb["values"], mb["returns"], mb["mask"],
                                                 config.value_clip_eps)
            loss = pg_loss + (config.vf_coef * vf_loss if shared else 0.0)
            ptx_metrics = {}
            if config.ptx_coef > 0:   # PPO-ptx: InstructGPT eq. 2's γ·E[log π(x_pretrain)]
                ids = torch.randint(len(ptx_examples), (config.ptx_batch,), generator=generator).tolist()
                inputs, input_mask, targets, loss_mask = shift_for_loss(
                    *completion_batch([ptx_examples[i] for i in ids], pad_id))
                loss, ptx_metrics = ppo_ptx_loss(loss, policy(inputs, input_mask), targets, loss_mask,
                                                 config.ptx_coef)
            total = loss if shared else loss + vf_loss      # a separate critic has its own optimiser
            check_finite(total)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
            torch.nn.utils.clip_grad_norm_(critic.parameters(), config.grad_clip)
            for opt in optimizers:
                opt.step()
            with torch.no_grad():
                mean_entropy = masked_mean(entropy(logits), mb["mask"]).item()
            logs.append({**pg_metrics, **vf_metrics, **ptx_metrics, "objective/entropy": mean_entropy})
    return {k: statistics.mean(r[k] for r in logs) for k in logs[0]}


# ---------------------------------------------------------------------------
# Training

def make_reward_fn(config, reward_model, gold_fn, device):
    """(tokens, attention, texts) -> (scores (B,), gold list): the optimised score and the gold reward."""
    def reward_fn(tokens, attention, texts):
        gold = gold_fn(texts)
        if config.reward == "gold":
            return torch.tensor(gold, device=device), gold
        return reward_model.score(tokens, attention), gold
    return reward_fn


def make_critic(config, policy, rm_dir, reward_model, device, tokenizer):
    """The value function: a head on the policy's trunk (shared), or a model of its own, which
    starts from the reward model (InstructGPT) or, with reward=gold, from the SFT model."""
    if config.critic == "shared":
        return torch.nn.Linear(policy.config.n_embd, 1).to(device)
    if reward_model is not None:
        return load_scalar_model(rm_dir, device, tokenizer)
    return ScalarHeadModel.from_gpt(policy).to(device).eval()


def load_demonstrations(config, tokenizer, block_size):
    """PPO-ptx's demonstrations (None when ptx_coef is 0), and the SFT validation set for eval/ptx_loss."""
    lengths = types.SimpleNamespace(block_size=block_size, max_prompt_tokens=config.max_prompt_tokens)
    ptx_examples = load_examples(config.ptx_data, tokenizer, lengths) if config.ptx_coef > 0 else None
    val_path = config.val_data or str(task_path(config.task, "sft_val"))   # the task's own demonstrations
    return ptx_examples, load_examples(val_path, tokenizer, lengths)


def train_ppo(config, sft_dir, rm_dir, out_dir, device="cpu", resume=False, overwrite=False, progress=True):
    """Run PPO from the SFT model against the reward model (or gold); return the summary dict."""
    config.validate()
    require(config.reward == "gold" or rm_dir is not None, "--rm is needed unless --reward gold")
    check_same_task(config.task, sft=sft_dir, rm=rm_dir)
    tokenizer = load_tokenizer()
    policy = load_gpt(sft_dir, device, tokenizer)
    check_generation_fits(config, policy.config.block_size)
    reference = load_gpt(sft_dir, device, tokenizer).requires_grad_(False)
    reward_model = load_scalar_model(rm_dir, device, tokenizer).requires_grad_(False) if rm_dir else None
    seed_everything(config.seed)
    critic = make_critic(config, policy, rm_dir, reward_model, device, tokenizer)
    optimizers = [torch.optim.Adam(module.parameters(), lr=lr, eps=1e-5, **fused_adam(module.parameters()))
                  for module, lr in ((policy, config.lr), (critic, config.value_lr))]
    gold_fn = get_task(config.task).gold_reward
    reward_fn = make_reward_fn(config, reward_model, gold_fn, device)
    prompts = read_prompts(config.prompts, tokenizer, config.max_prompt_tokens)  # every prompt checked now
    test_prompts = read_prompts(config.test_prompts, tokenizer, config.max_prompt_tokens)
    ptx_examples, val_examples = load_demonstrations(config, tokenizer, policy.config.block_size)
    kl_ctl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)

    def evaluate(n):
        return evaluate_policy(policy, tokenizer, test_prompts[:n], gold_fn, reference=reference,
                               reward_model=reward_model, max_new_tokens=config.max_new_tokens,
                               max_prompt_tokens=config.max_prompt_tokens, generator=step_generator(config.seed, -1),
                               format_fn=format_fn(config.task))

    with Run(out_dir, "ppo", config, resume=resume, overwrite=overwrite, progress=progress,
             sft=sft_dir, rm=rm_dir) as run:
        t_start = time.perf_counter()
        run.start({"policy": policy, "critic": critic, "policy_opt": optimizers[0], "critic_opt": optimizers[1]},
                  policy.config, extra_state=lambda: {"kl_coef": kl_ctl.value})
        kl_ctl.value = run.state.get("kl_coef", kl_ctl.value)
        for it in run.steps(config.iterations):
            generator = step_generator(config.seed, it)
            ids = torch.randint(len(prompts), (config.rollout_batch,), generator=generator).tolist()
            batch, stats, _ = rollout(policy, reference, critic, reward_fn, tokenizer, [prompts[i] for i in ids],
                                      config, generator, kl_ctl.value)
            batch = {k: v.to(device) for k, v in batch.items()}
            stats.update(ppo_update(policy, critic, optimizers, batch, ptx_examples, tokenizer.eot_token, config,
                                    generator, run.check_finite), kl_coef=kl_ctl.value, step=it + 1)
            stats["val/explained_variance"] = explained_variance(batch["values"], batch["returns"],
                                                                 batch["mask"]).item()
            if config.adaptive_kl:
                kl_ctl.update(stats["objective/kl"], config.rollout_batch)
            if (it + 1) % config.eval_every == 0 or it + 1 == config.iterations:
                stats.update({k: v for k, v in evaluate(config.n_periodic_eval).items() if k in PERIODIC_EVAL})
                run.checkpoint(it + 1)
            run.log(stats)
            run.show(score=f"{stats['objective/scores']:.2f}", gold=f"{stats['gold/reward']:.2f}",
                     kl=f"{stats['objective/kl']:.2f}", clip=f"{stats['policy/clipfrac']:.2f}")

        summary = evaluate(config.n_eval_samples)
        summary["eval/ptx_loss"] = validation_loss(policy, val_examples, tokenizer.eot_token, device)
        summary["train/seconds"] = time.perf_counter() - t_start
        run.plot(["objective/scores", "gold/reward", "objective/kl", "kl_coef"], "ppo.png",
                 "PPO: proxy reward, gold reward and KL per iteration")
        run.plot(["policy/clipfrac", "policy/approx_kl", "loss/value", "val/explained_variance"],
                 "ppo_diagnostics.png", "PPO diagnostics")
        return run.finish(summary, policy)
