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

import torch
from tqdm.auto import tqdm

from minirlhf import common
from minirlhf.checkpoints import load_gpt, load_scalar_model, save_model
from minirlhf.data import completion_batch, default_path, read_jsonl, shift_for_loss
from minirlhf.evaluate import evaluate_policy
from minirlhf.losses import (AdaptiveKLController, gae, kl_penalized_rewards, masked_mean, masked_whiten,
                             ppo_policy_loss, ppo_value_loss, sft_loss, token_logprobs)
from minirlhf.model import ScalarHeadModel
from minirlhf.sampling import decode_responses, generate, trim_padding
from minirlhf.sft import load_examples, validation_loss
from minirlhf.tasks import get_task
from minirlhf.tokenizer import load_tokenizer


@dataclasses.dataclass
class PPOConfig:
    """RLHF with PPO. Defaults train the default SFT model to gold reward ~0.9 in under two minutes."""
    prompts: str = str(default_path("prompts_train"))       # rollout prompts JSONL: {"prompt"}
    test_prompts: str = str(default_path("prompts_test"))   # evaluation prompts
    ptx_data: str = str(default_path("sft_train"))           # demonstrations for PPO-ptx
    task: str = "reviews"           # whose gold judge is logged (and optimised with reward=gold)
    reward: str = "rm"              # "rm": the learned reward model; "gold": the gold judge (PPO-GT)
    iterations: int = 60            # rollout + update rounds
    rollout_batch: int = 64         # prompts sampled per iteration
    minibatch_size: int = 32        # sequences per gradient step
    ppo_epochs: int = 2             # passes over each rollout batch
    lr: float = 3e-4                # policy learning rate (Adam); high for a big model, right for a tiny one
    value_lr: float = 1e-4          # critic learning rate
    kl_coef: float = 0.05           # β: the per-token KL penalty coefficient (initial value if adaptive)
    kl_estimator: str = "k1"        # per-token KL estimate in the reward: k1 (log-ratio) or k3
    adaptive_kl: bool = False       # adapt β towards kl_target (Ziegler et al. 2019)
    kl_target: float = 3.0          # target sequence KL in nats for the adaptive controller
    kl_horizon: int = 2000          # controller horizon in sequences
    gamma: float = 1.0              # discount; 1 as the reward arrives once, at the end
    lam: float = 0.95               # GAE λ
    clip_eps: float = 0.2           # PPO ratio clip ε
    value_clip_eps: float = 0.2     # critic value clip
    whiten_rewards: bool = False    # standardise per-token rewards within the batch before GAE
    critic: str = "separate"        # "separate": value model initialised from the RM; "shared": a head on the policy trunk
    vf_coef: float = 0.5            # value-loss weight when the critic is shared
    ptx_coef: float = 0.0           # γ of PPO-ptx: weight of the demonstrations' NLL (0 = off)
    ptx_batch: int = 32             # demonstrations per ptx gradient step
    missing_eos_penalty: float = 0.0  # subtracted from the score of completions that never emit EOS
    temperature: float = 1.0        # sampling temperature of rollouts (log-probs use the same)
    max_new_tokens: int = 48        # completion length limit
    max_prompt_tokens: int = 16     # longer prompts are refused
    grad_clip: float = 1.0          # global gradient-norm clip
    eval_every: int = 20            # iterations between periodic evaluations (gold reward vs KL)
    n_periodic_eval: int = 128      # test prompts per periodic evaluation
    n_eval_samples: int = 256       # test prompts for the final evaluation
    seed: int = 0                   # seeds prompts, sampling and minibatch order

    def validate(self):
        common.require(self.reward in ("rm", "gold"), "reward must be 'rm' or 'gold'")
        common.require(self.critic in ("separate", "shared"), "critic must be 'separate' or 'shared'")
        common.require(self.kl_estimator in ("k1", "k3"), "kl_estimator must be k1 or k3")
        common.require(self.kl_coef >= 0, "kl_coef must be >= 0")
        common.require(self.clip_eps > 0 and self.value_clip_eps > 0, "clip_eps must be positive")
        common.require(self.lr > 0 and self.value_lr > 0, "learning rates must be positive")
        common.require(self.rollout_batch > 0 and self.minibatch_size > 0, "batch sizes must be positive")
        common.require(self.temperature > 0, "temperature must be positive (log-probs need a distribution)")
        common.require(self.ptx_coef >= 0, "ptx_coef must be >= 0")
        common.require(self.kl_target > 0 and self.kl_horizon > 0, "kl_target and kl_horizon must be positive")
        common.require(self.iterations > 0 and self.ppo_epochs > 0, "iterations and ppo_epochs must be positive")
        common.require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        common.require(self.vf_coef >= 0, "vf_coef must be >= 0")
        common.require(self.ptx_batch > 0, "ptx_batch must be positive")
        common.require(self.missing_eos_penalty >= 0, "missing_eos_penalty must be >= 0 (it is subtracted)")
        common.require(self.grad_clip > 0, "grad_clip must be positive")
        common.require(self.max_prompt_tokens > 0 and self.max_new_tokens > 0,
                       "max_prompt_tokens and max_new_tokens must be positive")
        common.require(self.eval_every > 0, "eval_every must be positive")
        common.require(self.n_periodic_eval > 0 and self.n_eval_samples > 0,
                       "n_periodic_eval and n_eval_samples must be positive")


# --fast: a smaller step, as the fast reward model is weak (~67 % accuracy) and lr 3e-4 wrecked the tiny policy
FAST = dict(iterations=8, rollout_batch=32, eval_every=4, n_periodic_eval=32, n_eval_samples=64, lr=5e-5)


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
    ref_logprobs = token_logprobs(reference(tokens[:, :-1], attention[:, :-1]) / config.temperature,
                                  tokens[:, 1:])                             # (B, T-1)
    if values is None:
        values = critic(tokens[:, :-1], attention[:, :-1])                   # (B, T-1): V(state before token t+1)
    texts = [p + c for p, c in zip(prompts, completions)]
    scores, gold = reward_fn(tokens, attention, texts)                       # (B,), list of floats
    scores = scores - config.missing_eos_penalty * (~out.finished).float()
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, config.kl_estimator)
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    advantages, returns = gae(rewards, values * mask, mask, config.gamma, config.lam)
    seq_kl = ((logprobs - ref_logprobs) * mask).sum(-1)                      # (B,) sequence log-ratio
    stats = {"objective/scores": scores.mean().item(), "gold/reward": statistics.mean(gold),
             "objective/kl": seq_kl.mean().item(), "objective/rlhf_reward": (scores - kl_coef * seq_kl).mean().item(),
             "objective/eos_rate": out.finished.float().mean().item(),
             "objective/length": mask.sum(-1).mean().item()}
    batch = dict(tokens=tokens, attention=attention, mask=mask, logprobs=logprobs, values=values,
                 advantages=masked_whiten(advantages, mask) * mask, returns=returns)
    return batch, stats, texts


def explained_variance(values, returns, mask):
    """1 − Var(R − V)/Var(R) over the mask: 1 is a perfect critic, ≤ 0 no better than a constant."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return (1 - var_residual / var_returns.clamp_min(1e-8)).item()


# ---------------------------------------------------------------------------
# The PPO update

def ppo_update(policy, critic, optimizers, batch, ptx_examples, pad_id, config, generator, iteration,
               out_dir=None):
    """`ppo_epochs` passes of clipped policy and value updates over shuffled minibatches.

    `iteration` (0-based) and `out_dir` only name where training stopped if a loss is NaN or inf."""
    n = batch["tokens"].size(0)
    shared = config.critic == "shared"
    logs = []
    for epoch in range(config.ppo_epochs):
        for j, idx in enumerate(torch.randperm(n, generator=generator).split(config.minibatch_size)):
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
                ptx_loss, _ = sft_loss(policy(inputs, input_mask), targets, loss_mask)
                loss = loss + config.ptx_coef * ptx_loss
                ptx_metrics = {"loss/ptx": ptx_loss.item()}
            common.check_finite(loss if shared else loss + vf_loss, iteration + 1, out_dir)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            (loss if shared else loss + vf_loss).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
            torch.nn.utils.clip_grad_norm_(critic.parameters(), config.grad_clip)
            for opt in optimizers:
                opt.step()
            with torch.no_grad():
                entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)       # (b, T-1)
            logs.append({**pg_metrics, **vf_metrics, **ptx_metrics,
                         "objective/entropy": masked_mean(entropy, mb["mask"]).item()})
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


def train_ppo(config, sft_dir, rm_dir, out_dir, device="cpu", resume=False, overwrite=False, progress=True):
    """Run PPO from the SFT model against the reward model (or gold); return the summary dict."""
    config.validate()
    common.require(config.reward == "gold" or rm_dir is not None, "--rm is needed unless --reward gold")
    tokenizer = load_tokenizer()
    policy = load_gpt(sft_dir, device, tokenizer)
    common.check_generation_fits(config, policy.config.block_size)
    reference = load_gpt(sft_dir, device, tokenizer).requires_grad_(False)
    reward_model = load_scalar_model(rm_dir, device, tokenizer).requires_grad_(False) if rm_dir else None
    common.seed_everything(config.seed)
    if config.critic == "shared":
        critic = torch.nn.Linear(policy.config.n_embd, 1).to(device)
    elif reward_model is not None:   # InstructGPT: the value function starts from the reward model
        critic = load_scalar_model(rm_dir, device, tokenizer)
    else:
        critic = ScalarHeadModel.from_gpt(policy).to(device).eval()
    optimizers = [torch.optim.Adam(module.parameters(), lr=lr, eps=1e-5, **common.fused_adam(module.parameters()))
                  for module, lr in ((policy, config.lr), (critic, config.value_lr))]
    gold_fn = get_task(config.task).gold_reward
    # Every prompt is checked now, not when a rollout first samples it.
    prompts = [r["prompt"] for r in read_jsonl(config.prompts, "prompts", tokenizer, config.max_prompt_tokens)]
    test_prompts = [r["prompt"] for r in read_jsonl(config.test_prompts, "prompts", tokenizer,
                                                    config.max_prompt_tokens)]
    lengths = types.SimpleNamespace(block_size=policy.config.block_size, max_prompt_tokens=config.max_prompt_tokens)
    ptx_examples = load_examples(config.ptx_data, tokenizer, lengths) if config.ptx_coef > 0 else None
    val_examples = load_examples(str(default_path("sft_val")), tokenizer, lengths)
    out_dir = common.prepare_run_dir(out_dir, overwrite=overwrite, resume=resume)
    kl_ctl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    modules = {"policy": policy, "critic": critic, "policy_opt": optimizers[0], "critic_opt": optimizers[1]}
    start, rows, state = common.resume_training(out_dir, modules) if resume else (0, [], None)
    if state is not None:
        kl_ctl.value = state["kl_coef"]
    common.write_json(out_dir / "config.json", {**dataclasses.asdict(config), "model": dataclasses.asdict(policy.config),
                                                "sft": str(sft_dir), "rm": str(rm_dir), "stage": "ppo"})
    log = common.MetricsLog(out_dir / "metrics.jsonl", rows)
    reward_fn = make_reward_fn(config, reward_model, gold_fn, device)

    def periodic_eval(n):
        return evaluate_policy(policy, tokenizer, test_prompts[:n], gold_fn, reference=reference,
                               reward_model=reward_model, max_new_tokens=config.max_new_tokens,
                               max_prompt_tokens=config.max_prompt_tokens,
                               generator=common.step_generator(config.seed, -1))

    t_start = time.perf_counter()
    bar = tqdm(range(start, config.iterations), desc="ppo", disable=not progress, initial=start,
               total=config.iterations)
    with common.GracefulStop() as stop:
        for it in bar:
            generator = common.step_generator(config.seed, it)
            ids = torch.randint(len(prompts), (config.rollout_batch,), generator=generator).tolist()
            batch, stats, _ = rollout(policy, reference, critic, reward_fn, tokenizer, [prompts[i] for i in ids],
                                      config, generator, kl_ctl.value)
            batch = {k: v.to(device) for k, v in batch.items()}
            update = ppo_update(policy, critic, optimizers, batch, ptx_examples, tokenizer.eot_token, config,
                                generator, it, out_dir)
            stats.update(update, kl_coef=kl_ctl.value, step=it + 1)
            stats["val/explained_variance"] = explained_variance(batch["values"], batch["returns"], batch["mask"])
            if config.adaptive_kl:
                kl_ctl.update(stats["objective/kl"], config.rollout_batch)
            if (it + 1) % config.eval_every == 0 or it + 1 == config.iterations:
                periodic = periodic_eval(config.n_periodic_eval)
                stats.update({k: v for k, v in periodic.items() if k in ("eval/gold_reward", "eval/kl",
                                                                         "eval/proxy_reward")})
                common.save_checkpoint(out_dir, it + 1, modules, {"kl_coef": kl_ctl.value})
            log.log(stats)
            bar.set_postfix(score=f"{stats['objective/scores']:.2f}", gold=f"{stats['gold/reward']:.2f}",
                            kl=f"{stats['objective/kl']:.2f}", clip=f"{stats['policy/clipfrac']:.2f}")
            if stop.requested:
                common.save_checkpoint(out_dir, it + 1, modules, {"kl_coef": kl_ctl.value})
                raise common.Interrupted(it + 1, out_dir)

    summary = periodic_eval(config.n_eval_samples)
    summary["eval/ptx_loss"] = validation_loss(policy, val_examples, tokenizer.eot_token, device)
    summary["train/seconds"] = time.perf_counter() - t_start
    save_model(policy, out_dir)
    common.plot_metrics(log.rows, ["objective/scores", "gold/reward", "objective/kl", "kl_coef"],
                        out_dir / "ppo.png", "PPO: proxy reward, gold reward and KL per iteration")
    common.plot_metrics(log.rows, ["policy/clipfrac", "policy/approx_kl", "loss/value", "val/explained_variance"],
                        out_dir / "ppo_diagnostics.png", "PPO diagnostics")
    common.write_json(out_dir / "summary.json", summary)
    common.remove_checkpoint(out_dir)
    return summary
