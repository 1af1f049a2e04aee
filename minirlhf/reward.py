"""Step 2b of RLHF: a reward model learns the simulated labelers' preferences.

The reward model r(x, y) is the SFT model with its language-model output replaced by a
scalar head (`ScalarHeadModel.from_gpt`; Stiennon et al. 2020, §3.4), read at the last real
token of `prompt + completion + EOS` (`ScalarHeadModel.score`). It is trained on the
labels that `collect.py` wrote, with one of two losses from `minirlhf/losses.py`:

  loss=pairwise  Bradley-Terry on pairs (Bradley & Terry 1952; Stiennon et al. 2020 eq. 1):
                 −log σ(r(x, y_c) − r(x, y_r)). A rankings file is split into its C(K,2) pairs.
  loss=ranking   InstructGPT's K-wise loss (Ouyang et al. 2022, eq. 1): all C(K,2) pairs of
                 one prompt in ONE batch element, 1/C(K,2) Σ_{i<j} −log σ(r_i − r_j). The K
                 completions of a prompt go through one forward pass: K forwards buy C(K,2)
                 comparisons instead of 2 forwards per comparison.

Bradley-Terry only sees differences of rewards, so r is defined up to a shift (and its
scale is whatever fits the label noise). After training the rewards are normalised so that
samples of the SFT policy score mean 0 and standard deviation 1 (InstructGPT §3.5 uses mean
0 on demonstrations): `reward_gain = 1/std`, `reward_bias = −mean/std`, two buffers of the
model, saved in model.pt. PPO then starts from rewards of a known scale.

Deliberate simplifications: batches are drawn at random each step, with a generator that
depends only on (seed, step), rather than in epochs (so --resume gives the same run); all
rankings in a file must have the same K; the whole trunk is fine-tuned, nothing is frozen.
"""
import dataclasses
import math
import random
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from minirlhf.checkpoints import load_gpt
from minirlhf.config import NON_NEGATIVE, POSITIVE, at_least, between, check_generation_fits, checked, one_of, require, validate
from minirlhf.data import DataError, by_length_in_chunks, encode_example, write_jsonl
from minirlhf.losses import bradley_terry_loss, ranking_loss
from minirlhf.model import ScalarHeadModel
from minirlhf.optim import cosine_lr, make_optimizer, optimizer_step, seed_everything, set_lr, step_generator
from minirlhf.preferences import held_out_path, read_preferences
from minirlhf.runs import Run, figure
from minirlhf.sampling import sample_completions
from minirlhf.tasks import get_task
from minirlhf.tokenizer import load_tokenizer

LOSSES = ("pairwise", "ranking")


@dataclasses.dataclass
class RewardConfig:
    """Train a reward model on preferences. Defaults train in well under a minute on 2 cores."""
    loss: str = checked("ranking", one_of(*LOSSES))  # "ranking" (K-wise, InstructGPT; rankings.jsonl) or "pairwise" (pairs.jsonl)
    test_prefs: Optional[str] = None  # held-out preferences; None: the sibling *_test.jsonl of --prefs
    task: str = "reviews"             # whose gold judge gives eval/bayes_accuracy and eval/gold_corr
    steps: int = checked(340, POSITIVE)  # optimiser steps (1.5 passes over collect's 1800 rankings; 60 s budget)
    batch_size: int = checked(8, POSITIVE)  # rankings per step (K=16: 120 pairs from 16 rows each), or pairs per step (pairwise)
    lr: float = checked(1e-3, POSITIVE)  # peak learning rate (AdamW)
    warmup_steps: int = checked(20, NON_NEGATIVE)  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = checked(0.1, between(0, 1))  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = checked(0.1, NON_NEGATIVE)  # AdamW weight decay on matrices
    grad_clip: float = checked(1.0, POSITIVE)  # clip the global gradient norm to this
    eval_every: int = checked(100, POSITIVE)  # steps between held-out evaluations (and checkpoints)
    max_prompt_tokens: int = checked(16, POSITIVE)  # longer prompts are refused
    max_new_tokens: int = checked(48, POSITIVE)  # length limit of the SFT samples used for normalisation
    n_norm_prompts: int = checked(256, at_least(2), "a std needs two samples")  # train records whose prompts' SFT samples set the reward's mean and std
    chunk_rows: int = checked(16, POSITIVE)  # a step's sequences run in length-sorted chunks of this many rows (less padding)
    seed: int = 0                     # seeds batch order, the head's init and the normalisation samples

    validate = validate


FAST = dict(steps=60, batch_size=8, eval_every=20, warmup_steps=6, lr=1e-3, n_norm_prompts=64)


# ---------------------------------------------------------------------------
# Preference data (minirlhf.preferences): rankings for the K-wise loss, pairs for Bradley-Terry

def preferences_file(prefs_dir, loss):
    """The file of a `collect` folder that `loss` trains on: rankings.jsonl for the K-wise
    loss (all pairs of a ranking in one batch element), pairs.jsonl for Bradley-Terry."""
    return Path(prefs_dir) / ("rankings.jsonl" if loss == "ranking" else "pairs.jsonl")


def training_records(prefs, loss):
    """What `loss` trains on: the rankings, or every ranking's C(K,2) pairs. A pairs file cannot
    give rankings back: loss=ranking on one is refused with the file to pass instead."""
    if loss == "pairwise":
        return prefs.pairs()
    if prefs.kind == "pairs":
        raise DataError(f"{prefs.path} holds pairs, but loss=ranking needs rankings "
                        f"{{'prompt', 'completions'}}: pass {prefs.path.with_name('rankings.jsonl')} "
                        "(written by `collect` beside pairs.jsonl), or use --set loss=pairwise")
    return prefs.rankings


def completions_of(record):
    """The completions of one record, best first: [chosen, rejected] or the ranking."""
    return record["completions"] if "completions" in record else [record["chosen"], record["rejected"]]


# ---------------------------------------------------------------------------
# Scoring: K completions per record, all in one forward pass

def score_records(model, records, tokenizer, config, device, chunk_rows=None):
    """Rewards (B, K) of the B records' completions, each row best -> worst (K = 2 for pairs).

    Rows are prompt + completion + EOS, right-padded; `score` reads the last real token. The
    B*K rows run in length-sorted chunks of `chunk_rows` (default `config.chunk_rows`), which
    pad far less than one batch: the K completions of a prompt differ in length."""
    block = model.config.block_size
    examples = [encode_example(tokenizer, r["prompt"], c, block, config.max_prompt_tokens)
                for r in records for c in completions_of(r)]                # B*K, record-major
    rewards = by_length_in_chunks(lambda tokens, mask, _: model.score(tokens, mask), examples,
                                  tokenizer.eot_token, device, chunk_rows or config.chunk_rows)  # (B*K,)
    return rewards.view(len(records), -1)                                   # (B, K)


def preference_loss(rewards, loss):
    """Pairwise: Bradley-Terry on rewards[:, 0] vs rewards[:, 1]; ranking: the K-wise loss."""
    if loss == "pairwise":
        return bradley_terry_loss(rewards[:, 0], rewards[:, 1])
    return ranking_loss(rewards)


@torch.no_grad()
def score_texts(model, tokenizer, prompts, completions, config, device, batch_size=256):
    """Rewards (N,) of N (prompt, completion) pairs, in length-sorted batches of `batch_size`."""
    records = [{"prompt": p, "completions": [c]} for p, c in zip(prompts, completions)]
    return score_records(model, records, tokenizer, config, device, batch_size)[:, 0].cpu()


# ---------------------------------------------------------------------------
# Held-out evaluation: accuracy, its ceiling, loss, correlation with gold, calibration

@torch.no_grad()
def evaluate_pairs(model, tokenizer, pairs, golds, config, device):
    """Held-out metrics of the reward model on `pairs`; `golds` maps (prompt, text) -> gold.

    Each distinct completion is scored once. Returns (metrics, margins (N,) r_c − r_r)."""
    was_training = model.training
    model.eval()
    texts = list(golds)                                                 # distinct (prompt, completion)
    rewards = score_texts(model, tokenizer, [p for p, _ in texts], [c for _, c in texts], config, device)
    index = {t: i for i, t in enumerate(texts)}
    chosen = rewards[[index[p["prompt"], p["chosen"]] for p in pairs]]      # (N,)
    rejected = rewards[[index[p["prompt"], p["rejected"]] for p in pairs]]  # (N,)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    model.train(was_training)
    gold = torch.tensor([golds[t] for t in texts])
    corr = torch.corrcoef(torch.stack([rewards, gold]))[0, 1].item()        # Pearson
    return {"eval/accuracy": metrics["accuracy"], "eval/loss": loss.item(), "eval/gold_corr": corr}, chosen - rejected


def bayes_accuracy(pairs, golds):
    """How often the gold judge agrees with the (noisy) label, ties ½: the ceiling of eval/accuracy."""
    agree = [1.0 if golds[p["prompt"], p["chosen"]] > golds[p["prompt"], p["rejected"]]
             else 0.5 if golds[p["prompt"], p["chosen"]] == golds[p["prompt"], p["rejected"]] else 0.0
             for p in pairs]
    return statistics.mean(agree)


def calibration(margins, n_bins=10):
    """Bins of predicted P(a ≻ b) = σ(r_a − r_b) against how often the label says a ≻ b.

    Each pair counts in both orders, (σ(m), label 1) and (σ(−m), label 0), since the label
    always names the chosen one first. Returns (bins [(mean predicted, observed, count)],
    expected calibration error = Σ count/N · |observed − predicted|)."""
    p = torch.sigmoid(torch.cat([margins, -margins]))                       # (2N,)
    y = torch.cat([torch.ones_like(margins), torch.zeros_like(margins)])    # (2N,)
    which = (p * n_bins).long().clamp(max=n_bins - 1)                       # (2N,) bin of each
    bins = [(p[which == b].mean().item(), y[which == b].mean().item(), int((which == b).sum()))
            for b in range(n_bins) if (which == b).any()]
    ece = sum(n * abs(obs - pred) for pred, obs, n in bins) / len(p)
    return bins, ece


def plot_rm(rows, bins, ceiling, out_dir):
    """accuracy.png (train and held-out accuracy vs step) and calibration.png."""
    fig, ax = figure(figsize=(5, 3.5))
    for key, label in (("accuracy", "train (batches since last log)"), ("eval/accuracy", "held-out")):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], marker=".", label=label)
    ax.axhline(ceiling, color="gray", ls="--", label="bayes accuracy (ceiling)")
    ax.set(xlabel="step", ylabel="pairwise accuracy", title="Reward model accuracy")
    _save(fig, ax, out_dir / "accuracy.png")
    fig, ax = figure(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="gray", ls="--", label="perfect calibration")
    largest = max(n for _, _, n in bins)
    ax.scatter([b[0] for b in bins], [b[1] for b in bins], s=[10 + 200 * n / largest for _, _, n in bins])
    ax.set(xlabel="predicted P(a preferred) = σ(r_a − r_b)", ylabel="observed frequency (labels)",
           title="Calibration on held-out pairs", xlim=(0, 1), ylim=(0, 1))
    _save(fig, ax, out_dir / "calibration.png")


def _save(fig, ax, path):
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# Normalisation: SFT samples get mean 0 and std 1

@torch.no_grad()
def normalise_rewards(model, policy, tokenizer, prompts, config, device):
    """Sample one completion per prompt from the SFT `policy`, score it with the raw reward,
    and set reward_gain = 1/std, reward_bias = −mean/std (population std). Returns the samples."""
    model.reward_gain.fill_(1.0)
    model.reward_bias.fill_(0.0)
    completions = sample_completions(policy, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                                     max_prompt_tokens=config.max_prompt_tokens,
                                     generator=step_generator(config.seed, -1))
    raw = score_texts(model.eval(), tokenizer, prompts, completions, config, device)  # (N,)
    mean, std = raw.mean().item(), raw.std(correction=0).item()
    require(std > 0, "every SFT sample got the same reward: cannot normalise (is the RM trained?)")
    model.reward_gain.fill_(1.0 / std)
    model.reward_bias.fill_(-mean / std)
    return [{"prompt": p, "completion": c, "raw": r} for p, c, r in zip(prompts, completions, raw.tolist())]


# ---------------------------------------------------------------------------
# Training

def final_evaluation(model, policy, tokenizer, train, test, golds, config, device, out_dir):
    """Held-out metrics on the raw rewards (the scale Bradley-Terry fitted), then normalisation
    on SFT samples of the training prompts (written to norm_samples.jsonl)."""
    summary, margins = evaluate_pairs(model, tokenizer, test, golds, config, device)
    bins, summary["eval/calibration_error"] = calibration(margins)
    summary["eval/bayes_accuracy"] = bayes_accuracy(test, golds)
    summary["eval/pairs"] = len(test)
    summary["train/comparisons"] = sum(math.comb(len(completions_of(r)), 2) for r in train)
    picked = random.Random(config.seed).sample(range(len(train)), min(config.n_norm_prompts, len(train)))
    prompts = [train[i]["prompt"] for i in picked]                          # repeats follow the prompt distribution
    write_jsonl(out_dir / "norm_samples.jsonl", normalise_rewards(model, policy, tokenizer, prompts, config, device))
    summary["rm/gain"], summary["rm/bias"] = model.reward_gain.item(), model.reward_bias.item()
    shown = list(golds)[:5]
    normalised = score_texts(model, tokenizer, [p for p, _ in shown], [c for _, c in shown], config, device)
    summary["eval/samples"] = [{"text": p + c, "gold": round(golds[p, c], 4), "reward": round(r, 3)}
                               for (p, c), r in zip(shown, normalised.tolist())]
    summary["model/params"] = model.trunk.num_params()
    return summary, bins


def train_reward_model(config, sft_dir, prefs_path, out_dir, device="cpu", resume=False, overwrite=False,
                       progress=True):
    """Train a reward model from the SFT model on `prefs_path`; write the run folder and return the summary."""
    config.validate()
    started = time.perf_counter()
    tokenizer = load_tokenizer()
    train = training_records(read_preferences(prefs_path, tokenizer, config.max_prompt_tokens), config.loss)
    test_path = Path(config.test_prefs) if config.test_prefs else held_out_path(prefs_path)
    require(test_path.exists(), f"no held-out preferences at {test_path}: pass --set test_prefs=PATH")
    test = read_preferences(test_path, tokenizer, config.max_prompt_tokens).pairs()   # evaluation: pairs
    seed_everything(config.seed)                                            # the head's init (and load_gpt's)
    policy = load_gpt(sft_dir, device, tokenizer)
    check_generation_fits(config, policy.config.block_size)                 # the normalisation samples
    test_texts = list(dict.fromkeys((r["prompt"], c) for r in test for c in completions_of(r)))
    golds = dict(zip(test_texts, get_task(config.task).gold_reward([p + c for p, c in test_texts])))
    model = ScalarHeadModel.from_gpt(policy).to(device).train()
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    with Run(out_dir, "rm", config, resume=resume, overwrite=overwrite, progress=progress,
             sft=sft_dir, prefs=prefs_path, test_prefs_used=test_path) as run:
        run.start({"model": model, "optimizer": optimizer}, model.config)
        for step in run.steps(config.steps, desc=f"rm ({config.loss})"):
            lr = cosine_lr(step, config.steps, config.warmup_steps, config.lr, config.min_lr_ratio)
            set_lr(optimizer, lr)
            ids = torch.randint(len(train), (config.batch_size,), generator=step_generator(config.seed, step))
            rewards = score_records(model, [train[i] for i in ids.tolist()], tokenizer, config, device)  # (B, K)
            loss, metrics = preference_loss(rewards, config.loss)
            run.check_finite(loss)
            optimizer_step(optimizer, loss, model, config.grad_clip)
            run.average(metrics)
            run.show(loss=f"{metrics['loss/rm']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                held_out, _ = evaluate_pairs(model, tokenizer, test, golds, config, device)
                run.log({"step": step + 1, "lr": lr, **held_out})
                run.checkpoint(step + 1)

        summary, bins = final_evaluation(model, policy, tokenizer, train, test, golds, config, device, run.out_dir)
        summary["train/seconds"] = time.perf_counter() - started
        plot_rm(run.rows, bins, summary["eval/bayes_accuracy"], run.out_dir)
        return run.finish(summary, model)
