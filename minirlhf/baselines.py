"""The DPO paper's baselines (Rafailov et al. 2023, §6): Preferred-FT and Best-of-N.

Preferred-FT is supervised fine-tuning on the *chosen* response of each pair, starting from
the SFT model: it uses the preferences only to filter the data, never the rejected side.
Its loop (`python -m minirlhf pft`) draws the same batches of whole rankings as DPO and is
evaluated the same way (`dpo.heldout_metrics`, `dpo.sampled_evaluation`), so its run folder
and summary have the same keys as DPO's.

Best-of-N samples N completions per prompt from the SFT policy and keeps the one the
ranker scores highest: the reward model (`ranker=rm`) or, as an upper reference, the gold
judge itself (`ranker=gold`, "oracle BoN"). Nothing is trained; the cost is N samples at
test time. Its KL to the SFT policy is not estimated but taken from the analytic formula

    KL(π_BoN ‖ π_ref) = log N − (N − 1)/N

(Stiennon et al. 2020, appendix on best-of-N; Hilton & Gao 2022, "Measuring Goodhart's
law"), exact when the N samples are almost surely distinct and an upper bound in general
(Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy"). With
small discrete outputs, ties among the N samples make the true KL smaller: the summary
says so with `eval/kl_is_analytic_bound: true`.

Deliberate simplifications: ties in the ranker's score keep the first sample; the kept
completions are scored once by the gold judge, like every other policy's samples.
"""
import dataclasses
import math
import statistics
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from minirlhf.checkpoints import load_gpt, load_scalar_model
from minirlhf.config import (NON_NEGATIVE, POSITIVE, at_least, between, check_generation_fits, checked, one_of,
                             require, validate)
from minirlhf.data import completion_batch, default_path, encode_example, read_jsonl, read_prompts, shift_for_loss
from minirlhf.dpo import heldout_metrics, plot_logps_and_margins, sampled_evaluation
from minirlhf.losses import dpo_loss, sft_loss, token_logprobs
from minirlhf.optim import cosine_lr, make_optimizer, optimizer_step, seed_everything, set_lr, step_generator
from minirlhf.preferences import held_out_path, load_pair_sequences, pair_batch, sample_pairs
from minirlhf.runs import Run, check_same_task
from minirlhf.sampling import generate
from minirlhf.tasks import format_fn, get_task
from minirlhf.tokenizer import load_tokenizer

# ---------------------------------------------------------------------------
# Preferred-FT: the SFT loss on the chosen responses


@dataclasses.dataclass
class PreferredFTConfig:
    """Preferred-FT from the SFT model (step count and learning rate tuned on the draft SFT model, docs/dpo.md)."""
    test_prompts: str = str(default_path("prompts_test"))  # prompts for eval/gold_reward and eval/kl
    test_prefs: Optional[str] = None   # held-out preferences for eval/reward_accuracy (None: the *_test.jsonl beside --prefs)
    task: str = "reviews"              # whose gold judge scores the samples
    beta: float = checked(0.25, POSITIVE)  # β of the implicit reward β·log(π/π_ref), measured on held-out pairs only
    steps: int = checked(40, POSITIVE)  # optimiser steps
    batch_size: int = checked(4, POSITIVE)  # rankings per step, as in DPO (their pairs' chosen responses)
    lr: float = checked(5e-4, POSITIVE)  # peak learning rate (AdamW)
    warmup_steps: int = checked(5, NON_NEGATIVE)  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = checked(0.1, between(0, 1))  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = checked(0.0, NON_NEGATIVE)  # AdamW weight decay on matrices
    grad_clip: float = checked(1.0, POSITIVE)  # clip the global gradient norm to this
    log_every: int = checked(10, POSITIVE)  # steps between metrics.jsonl lines (and checkpoints)
    eval_every: int = checked(0, NON_NEGATIVE)  # steps between gold-reward/KL evaluations (0: final only)
    n_periodic_eval: int = checked(128, POSITIVE)  # test prompts per periodic evaluation
    max_prompt_tokens: int = checked(16, POSITIVE)  # longer prompts are refused
    max_new_tokens: int = checked(48, POSITIVE)  # length limit when sampling completions
    n_eval_samples: int = checked(256, POSITIVE)  # test prompts sampled for eval/gold_reward and eval/kl
    ref_batch_size: int = checked(256, POSITIVE)  # sequences per forward pass when precomputing log π_ref (held out)
    seed: int = 0                      # seeds batch order and evaluation sampling

    validate = validate


PREFERRED_FT_FAST = dict(steps=20, batch_size=4, warmup_steps=5, log_every=5, n_eval_samples=64)


def preferred_ft_batch_loss(policy, data, ids, config, pad_id, device):
    """(loss, metrics) of Preferred-FT on the pairs `ids` (P,): the mean NLL of the chosen
    completions' tokens (`losses.sft_loss`), each counted once per pair it wins. The rejected
    ones only give `logps/rejected`; where `data` carries log π_ref (the held-out pairs), the
    implicit-reward metrics β·log(π/π_ref) are added (eval/reward_accuracy)."""
    *batch, index = pair_batch(data, ids, pad_id, device)                    # (U, T) each; (P, 2)
    inputs, input_mask, targets, loss_mask = shift_for_loss(*batch)          # (U, T-1) each
    logits = policy(inputs, input_mask)                                      # (U, T-1, V)
    # the chosen row of every pair, without copying logits P times: weight each row's tokens by
    # the number of pairs it wins (masked_mean is sum(x·mask) / sum(mask), so this is the same mean)
    wins = torch.bincount(index[:, 0], minlength=logits.size(0)).to(logits.dtype)   # (U,)
    loss, metrics = sft_loss(logits, targets, loss_mask * wins[:, None])
    with torch.no_grad():
        # log π(y|x) from the same logits (`sampling.sequence_logprobs` would run the policy again)
        logps = (token_logprobs(logits, targets) * loss_mask).sum(-1)       # (U,)
        chosen, rejected = logps[index].unbind(-1)                           # (P,), (P,)
        if data.ref_logps is not None:             # the held-out pairs (eval/reward_accuracy)
            ref = data.ref_logps[data.pairs[ids]].to(device)                 # (P, 2)
            _, implicit = dpo_loss(chosen, rejected, *ref.unbind(-1), beta=config.beta)
            metrics.update({k: v for k, v in implicit.items() if k.startswith("rewards/")})
    metrics["logps/chosen"], metrics["logps/rejected"] = chosen.mean().item(), rejected.mean().item()
    return loss, metrics


def train_preferred_ft(config, sft_dir, prefs_path, out_dir, device="cpu", resume=False, overwrite=False,
                       progress=True):
    """SFT on the chosen responses of `prefs_path`; write the run folder and return the summary (DPO's keys)."""
    config.validate()
    check_same_task(config.task, sft=sft_dir)
    started = time.perf_counter()
    tokenizer = load_tokenizer()
    pad = tokenizer.eot_token
    seed_everything(config.seed)
    reference = load_gpt(sft_dir, device, tokenizer).requires_grad_(False)   # only for KL and held-out metrics
    check_generation_fits(config, reference.config.block_size)
    policy = load_gpt(sft_dir, device, tokenizer)
    evaluate = sampled_evaluation(policy, reference, tokenizer, config)
    t0 = time.perf_counter()
    train = load_pair_sequences(prefs_path, tokenizer, reference, config, device, with_reference=False)
    test = load_pair_sequences(config.test_prefs or held_out_path(prefs_path), tokenizer, reference, config, device)
    ref_seconds = time.perf_counter() - t0
    optimizer = make_optimizer(policy, config.lr, config.weight_decay)
    with Run(out_dir, "preferred_ft", config, resume=resume, overwrite=overwrite, progress=progress,
             sft=sft_dir, prefs=prefs_path) as run:
        run.start({"model": policy, "optimizer": optimizer}, policy.config)
        for step in run.steps(config.steps):
            lr = cosine_lr(step, config.steps, config.warmup_steps, config.lr, config.min_lr_ratio)
            set_lr(optimizer, lr)
            ids = sample_pairs(train, config.batch_size, step_generator(config.seed, step))  # (P,)
            loss, metrics = preferred_ft_batch_loss(policy, train, ids, config, pad, device)
            run.check_finite(loss)
            optimizer_step(optimizer, loss, policy, config.grad_clip)
            run.average(metrics)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                row = {"step": step + 1, "lr": lr}
                if config.eval_every and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
                    row.update({k: v for k, v in evaluate(config.n_periodic_eval, n_show=0).items()
                                if k in ("eval/gold_reward", "eval/kl")})
                    row.update(heldout_metrics(policy, test, config, pad, device, preferred_ft_batch_loss))
                run.log(row)
                run.checkpoint(step + 1)

        t0 = time.perf_counter()
        summary = {**evaluate(config.n_eval_samples),
                   **heldout_metrics(policy, test, config, pad, device, preferred_ft_batch_loss)}
        summary.update({"eval/seconds": time.perf_counter() - t0, "train/ref_logps_seconds": ref_seconds})
        run.plot(["loss/sft", "rewards/accuracies"], "loss.png", "preferred_ft: training loss")
        plot_logps_and_margins(run.rows, run.out_dir / "logps_and_margins.png", "preferred_ft (SFT on chosen)")
        if config.eval_every:
            run.plot(["eval/gold_reward", "eval/kl", "eval/reward_accuracy"], "eval.png",
                     "preferred_ft: held-out evaluation")
        summary["train/seconds"] = time.perf_counter() - started
        return run.finish(summary, policy)


# ---------------------------------------------------------------------------
# Best-of-N

@dataclasses.dataclass
class BestOfNConfig:
    """Best-of-N sampling from the SFT policy, ranked by the reward model or the gold judge."""
    test_prompts: str = str(default_path("prompts_test"))  # the same prompts every method is evaluated on
    test_prefs: Optional[str] = None   # held-out pairs for the ranker's eval/reward_accuracy (None: skip)
    task: str = "reviews"              # whose gold judge scores the kept samples
    n: int = checked(4, at_least(1))  # N: samples per prompt; the ranker keeps one (KL bound 0.64 nats)
    ranker: str = checked("rm", one_of("rm", "gold"))  # rm: the reward model given by --rm; gold: the gold judge (oracle BoN)
    temperature: float = checked(1.0, POSITIVE)  # sampling temperature of the SFT policy
    max_prompt_tokens: int = checked(16, POSITIVE)  # longer prompts are refused
    max_new_tokens: int = checked(48, POSITIVE)  # length limit when sampling completions
    n_eval_samples: int = checked(256, POSITIVE)  # test prompts (one kept completion each)
    batch_size: int = checked(128, POSITIVE)  # sequences per generate call (n=1: the same batches as evaluate_policy)
    seed: int = 0                      # seeds sampling

    validate = validate


BEST_OF_N_FAST = dict(n=4, n_eval_samples=64)


def best_of_n_kl_bound(n):
    """Analytic KL(π_BoN ‖ π_ref) = log N − (N−1)/N in nats: 0 for N = 1 (an upper bound in general)."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n(policy, tokenizer, prompts, rank_fn, gold_fn, config, generator, progress=False):
    """Sample `config.n` completions per prompt; keep the one `rank_fn` scores highest.

    rank_fn(tokens, attention_mask, texts) -> (b,) scores of the b sampled sequences of one call
    (tokens, attention_mask (b, T); texts: prompt + completion strings). The prompt·N samples are
    drawn in calls of at most `config.batch_size` sequences (whole prompts per call when N fits in
    one), and each prompt keeps only its best sample so far and a running sum of gold rewards, so
    memory does not grow with N. Returns one dict per prompt: text, gold, score (the ranker's),
    eos, length of the kept sample, and mean_gold, the mean gold reward of all N samples (plain
    SFT sampling).
    """
    n = config.n
    samples = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]    # N samples per prompt, adjacent
    per_call = max(1, config.batch_size // n) * n if n <= config.batch_size else config.batch_size
    kept, gold_sums = [None] * len(prompts), [0.0] * len(prompts)
    for start in tqdm(range(0, len(samples), per_call), desc=f"best-of-{n}", disable=not progress):
        batch = samples[start:start + per_call]
        repeated = [p for _, p in batch]
        out, completions = generate(policy, tokenizer, repeated, max_new_tokens=config.max_new_tokens,
                                    max_prompt_tokens=config.max_prompt_tokens,
                                    temperature=config.temperature, generator=generator)
        texts = [p + c for p, c in zip(repeated, completions)]
        scores = torch.as_tensor(rank_fn(out.tokens, out.attention_mask, texts), dtype=torch.float).view(-1)  # (b,)
        golds = gold_fn(texts)
        lengths = out.response_mask.sum(-1).tolist()                         # (b,)
        for j, (i, _) in enumerate(batch):
            gold_sums[i] += golds[j]
            if kept[i] is None or scores[j].item() > kept[i]["score"]:      # the first maximum wins ties
                kept[i] = {"text": texts[j], "gold": float(golds[j]), "score": scores[j].item(),
                           "eos": float(out.finished[j]), "length": int(lengths[j])}
    for record, total in zip(kept, gold_sums):
        record["mean_gold"] = total / n
    return kept


def ranker_accuracy(rank_fn, tokenizer, pairs_path, config, block_size):
    """Share of held-out pairs whose chosen response the ranker scores above the rejected one."""
    records = read_jsonl(pairs_path, "pairs", tokenizer, config.max_prompt_tokens)
    rows = [(r["prompt"], r[side]) for side in ("chosen", "rejected") for r in records]   # chosen..., rejected...
    scores = []
    for start in range(0, len(rows), 256):
        batch = rows[start:start + 256]
        examples = [encode_example(tokenizer, p, c, block_size, config.max_prompt_tokens) for p, c in batch]
        tokens, mask, _ = completion_batch(examples, tokenizer.eot_token)      # (b, T) each
        scores.extend(torch.as_tensor(rank_fn(tokens, mask, [p + c for p, c in batch]), dtype=torch.float).tolist())
    chosen, rejected = torch.tensor(scores).chunk(2)                         # (N,), (N,)
    return (chosen > rejected).float().mean().item()


def run_best_of_n(config, sft_dir, rm_dir, out_dir, device="cpu", overwrite=False, progress=True):
    """Best-of-N on the test prompts; write config.json and summary.json and return the summary."""
    config.validate()
    check_same_task(config.task, sft=sft_dir, rm=rm_dir)
    started = time.perf_counter()
    require(config.ranker == "gold" or rm_dir, "ranker=rm needs a reward model: pass --rm DIR "
                   "(or --set ranker=gold for the oracle)")
    Run(out_dir, "bon", config, overwrite=overwrite)   # refuse a finished --out before loading anything
    tokenizer = load_tokenizer()
    gold_fn = get_task(config.task).gold_reward
    policy = load_gpt(sft_dir, device, tokenizer)
    check_generation_fits(config, policy.config.block_size)
    prompts = read_prompts(config.test_prompts, tokenizer, config.max_prompt_tokens)[:config.n_eval_samples]
    if config.ranker == "rm":
        reward_model = load_scalar_model(rm_dir, device, tokenizer)
        rank_fn = lambda tokens, mask, texts: reward_model.score(tokens.to(device), mask.to(device)).cpu()
    else:
        rank_fn = lambda tokens, mask, texts: gold_fn(texts)
    with Run(out_dir, "bon", config, overwrite=overwrite, sft=sft_dir, rm=rm_dir) as run:
        run.start({})
        t0 = time.perf_counter()
        kept = best_of_n(policy, tokenizer, prompts, rank_fn, gold_fn, config,
                         step_generator(config.seed, -1), progress)      # the generator evaluate_policy uses
        golds = [k["gold"] for k in kept]
        summary = {
            "eval/gold_reward": statistics.mean(golds),
            "eval/gold_reward_sem": statistics.stdev(golds) / len(golds) ** 0.5 if len(golds) > 1 else 0.0,
            "eval/eos_rate": statistics.mean(k["eos"] for k in kept),
            "eval/length": statistics.mean(k["length"] for k in kept),
            "eval/n_samples": len(kept),
            "eval/kl": best_of_n_kl_bound(config.n),
            "eval/kl_is_analytic_bound": True,
            "bon/n": config.n,
            "bon/gold_reward_all_samples": statistics.mean(k["mean_gold"] for k in kept),
            "eval/seconds": time.perf_counter() - t0,
            "eval/samples": [{"text": k["text"], "gold": round(k["gold"], 4)} for k in kept[:5]],
        }
        if format_fn(config.task) is not None:     # a verifier ranked: pass@1 of the kept answer ≈ pass@N
            summary["eval/pass@1"] = summary["eval/gold_reward"]
            summary["eval/format_reward"] = statistics.mean(format_fn(config.task)([k["text"] for k in kept]))
        if config.ranker == "rm":
            summary["eval/proxy_reward"] = statistics.mean(k["score"] for k in kept)
        if config.test_prefs:
            summary["eval/reward_accuracy"] = ranker_accuracy(rank_fn, tokenizer, config.test_prefs, config,
                                                              policy.config.block_size)
        summary["train/seconds"] = time.perf_counter() - started    # the whole stage (nothing is trained)
        return run.finish(summary)
