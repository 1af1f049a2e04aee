"""The direct alternative to RLHF: Direct Preference Optimisation (Rafailov et al. 2023).

RLHF maximises reward under a KL leash to the SFT model (DPO eq. 3),

    max_π  E_{x, y~π}[ r(x, y) ]  −  β · KL( π(·|x) ‖ π_ref(·|x) ),

whose optimum is π*(y|x) = π_ref(y|x) · exp(r(x, y)/β) / Z(x) (eq. 4). Solved for the reward,
r(x, y) = β · log π*(y|x)/π_ref(y|x) + β · log Z(x) (eq. 5): every policy defines an
*implicit reward*. Under the Bradley-Terry model only reward differences matter, so Z(x)
cancels (eq. 6) and the reward-model loss, written with the implicit reward, trains the
policy directly on the preference pairs (eq. 7, `losses.dpo_loss`): no reward model, no
sampling, no RL. The variants (IPO, cDPO, robust, hinge) change only the loss of h.

This stage trains on the same pairs.jsonl the reward model sees; the policy starts from
the SFT model, which also serves, frozen, as π_ref. Because π_ref never changes, its
log-probs are computed once, before training (`load_preferences`). A batch is a few whole
rankings: their C(K,2) pairs cost only K sequences in the forward pass (`pair_batch`).

Deliberate simplifications: rankings are drawn at random each step with a generator that
depends only on (seed, step), so --resume continues exactly; log-probs are summed over
response tokens (DPO's sequence log-probs, no length normalisation); the policy stays in
eval mode, so dropout (0 in the SFT model anyway) never makes log π noisy. The
Preferred-FT baseline runs through this loop with loss_type=preferred_ft (baselines.py).
"""
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from minirlhf import common
from minirlhf.checkpoints import load_gpt, save_model
from minirlhf.data import by_length_in_chunks, completion_batch, default_path, encode_example, read_jsonl
from minirlhf.evaluate import evaluate_policy
from minirlhf.losses import DPO_LOSS_TYPES, dpo_loss
from minirlhf.sampling import sequence_logprobs
from minirlhf.tasks import get_task
from minirlhf.tokenizer import load_tokenizer


@dataclasses.dataclass
class DPOConfig:
    """DPO on preference pairs, starting from the SFT model. Defaults train in under a minute on 2 cores.

    The defaults add the NLL term on the chosen responses (RPO, nll_coef=0.5, β=0.25): on the
    toy task plain DPO trades grammar for sentiment, and the term keeps it (docs/dpo.md).
    `PLAIN_DPO` (`--set nll_coef=0 beta=1 lr=2e-4`) is the DPO paper's loss at its best
    settings here."""
    test_prompts: str = str(default_path("prompts_test"))  # prompts for eval/gold_reward and eval/kl
    test_prefs: Optional[str] = None   # held-out pairs for eval/reward_accuracy (None: pairs_test.jsonl beside --prefs)
    task: str = "reviews"              # whose gold judge scores the samples
    loss_type: str = "sigmoid"         # sigmoid (DPO), ipo, hinge, robust; or preferred_ft (the SFT-on-chosen baseline)
    beta: float = 0.25                 # β: weight of the KL term; the implicit reward is β·log(π/π_ref)
    label_smoothing: float = 0.0       # ε: assumed label-flip rate (cDPO with sigmoid; robust)
    nll_coef: float = 0.5              # α: + α·NLL per token of the chosen responses (RPO, Pang et al. 2024); 0: DPO
    steps: int = 300                   # optimiser steps
    batch_size: int = 4                # rankings per step, each with all its pairs (K=16: 120 pairs from 16 sequences)
    lr: float = 3e-4                   # peak learning rate (AdamW)
    warmup_steps: int = 20             # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.1          # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0          # AdamW weight decay on matrices (0: the KL term is the regulariser)
    grad_clip: float = 1.0             # clip the global gradient norm to this
    log_every: int = 10                # steps between metrics.jsonl lines (and checkpoints)
    eval_every: int = 0                # steps between gold-reward/KL evaluations in metrics.jsonl (0: final only)
    n_periodic_eval: int = 128         # test prompts per periodic evaluation (the first of the final's prompts)
    max_prompt_tokens: int = 16        # longer prompts are refused
    max_new_tokens: int = 48           # length limit when sampling completions
    n_eval_samples: int = 256          # test prompts sampled for eval/gold_reward and eval/kl
    ref_batch_size: int = 256          # sequences per forward pass when precomputing log π_ref
    chunk_rows: int = 16               # a step's sequences run in length-sorted chunks of this many rows (less padding)
    seed: int = 0                      # seeds batch order and evaluation sampling

    def validate(self):
        common.require(self.loss_type in DPO_LOSS_TYPES + ("preferred_ft",),
                       f"loss_type must be one of {', '.join(DPO_LOSS_TYPES + ('preferred_ft',))}")
        common.require(self.beta > 0, "beta must be positive")
        common.require(0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)")
        common.require(self.label_smoothing == 0 or self.loss_type in ("sigmoid", "robust"),
                       "label_smoothing applies to loss_type sigmoid (cDPO) and robust only")
        common.require(self.steps > 0 and self.batch_size > 0, "steps and batch_size must be positive")
        common.require(self.lr > 0, "lr must be positive")
        common.require(self.grad_clip > 0, "grad_clip must be positive")
        common.require(self.nll_coef >= 0, "nll_coef must be >= 0")
        common.require(self.chunk_rows > 0, "chunk_rows must be positive")
        common.require(self.n_eval_samples > 0, "n_eval_samples must be positive")
        common.require(self.log_every > 0 and self.eval_every >= 0, "log_every > 0 and eval_every >= 0")


FAST = dict(steps=30, batch_size=4, warmup_steps=5, log_every=5, n_eval_samples=64)
# The DPO paper's loss (no NLL term), with the β and learning rate that did best for it here (docs/dpo.md).
PLAIN_DPO = dict(nll_coef=0.0, beta=1.0, lr=2e-4)


# ---------------------------------------------------------------------------
# Preference data, with the reference log-probs computed once

@dataclasses.dataclass
class Preferences:
    """Tokenized pairs. Each (prompt, completion) is stored once: with K completions ranked per
    prompt, its C(K,2) pairs share K sequences, so a model runs (K−1)/2 times fewer sequences."""
    sequences: list            # S distinct (ids, n_prompt) examples: prompt + completion + EOS
    pairs: torch.Tensor        # (N, 2) long: indices [chosen, rejected] into `sequences`
    groups: list               # long tensors of pair indices: pairs linked by shared sequences (a ranking)
    ref_logps: Optional[torch.Tensor]   # (S,) summed log π_ref(y|x) of each sequence (None: not needed)


@torch.no_grad()
def logps_of_sequences(model, sequences, pad_id, device, batch_size=256):
    """(S,) summed response log-probs of (ids, n_prompt) examples, batched by length (less padding)."""
    return by_length_in_chunks(lambda *batch: sequence_logprobs(model, *batch), sequences, pad_id, device,
                               batch_size).cpu()


def load_preferences(path, tokenizer, reference, config, device, with_reference=True):
    """Read pairs.jsonl, tokenize each distinct sequence once, and score it under π_ref."""
    index, sequences, pairs = {}, [], []
    for record in read_jsonl(path, "pairs", tokenizer, config.max_prompt_tokens):
        pair = []
        for completion in (record["chosen"], record["rejected"]):
            key = (record["prompt"], completion)
            if key not in index:
                index[key] = len(sequences)
                sequences.append(encode_example(tokenizer, *key, reference.config.block_size,
                                                config.max_prompt_tokens))
            pair.append(index[key])
        pairs.append(pair)
    ref_logps = (logps_of_sequences(reference, sequences, tokenizer.eot_token, device, config.ref_batch_size)
                 if with_reference else None)
    return Preferences(sequences, torch.tensor(pairs), ranking_groups(pairs, len(sequences)), ref_logps)


def ranking_groups(pairs, n_sequences):
    """Group pairs that share a sequence, directly or through other pairs (connected components):
    the C(K,2) pairs of one ranking form one group, whatever order the file lists them in."""
    parent = list(range(n_sequences))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for chosen, rejected in pairs:
        parent[root(chosen)] = root(rejected)
    groups = {}
    for n, (chosen, _) in enumerate(pairs):
        groups.setdefault(root(chosen), []).append(n)
    return [torch.tensor(g) for g in groups.values()]


def distinct_rows(prefs, ids):
    """The distinct sequences (U,) of the pairs `ids` (P,), and index (P, 2) long: the position in
    them of each pair's [chosen, rejected]. All C(K,2) pairs of a ranking need only K rows."""
    return torch.unique(prefs.pairs[ids], return_inverse=True)               # (U,), (P, 2)


def pair_batch(prefs, ids, pad_id, device):
    """The distinct sequences of the pairs `ids` (P,) as one right-padded batch: tokens,
    attention_mask, response_mask, each (U, T), and index (P, 2) (see `distinct_rows`)."""
    rows, index = distinct_rows(prefs, ids)
    batch = completion_batch([prefs.sequences[i] for i in rows.tolist()], pad_id)
    return (*(t.to(device) for t in batch), index.to(device))


def policy_logps(policy, prefs, rows, pad_id, device, chunk_rows):
    """(U,) log π(y|x) of the sequences `rows`, in length-sorted chunks of `chunk_rows` (gradients flow)."""
    sequences = [prefs.sequences[i] for i in rows.tolist()]
    return by_length_in_chunks(lambda *batch: sequence_logprobs(policy, *batch), sequences, pad_id, device,
                               chunk_rows)


def sample_pairs(prefs, n_groups, generator):
    """Indices (P,) of every pair of `n_groups` rankings drawn at random: a ranking's pairs stay together
    (InstructGPT §3.5 keeps a ranking's comparisons in one batch element, as the reward model does)."""
    drawn = torch.randint(len(prefs.groups), (n_groups,), generator=generator).tolist()
    return torch.cat([prefs.groups[i] for i in drawn])                       # (P,)


# ---------------------------------------------------------------------------
# One batch: the loss and its metrics

def dpo_batch_loss(policy, prefs, ids, config, pad_id, device):
    """(loss, metrics) of DPO on the pairs `ids` (P,): one policy forward over their distinct sequences."""
    rows, index = distinct_rows(prefs, ids)                                   # (U,), (P, 2)
    logps = policy_logps(policy, prefs, rows, pad_id, device, config.chunk_rows)   # (U,) log π(y|x)
    index = index.to(device)
    chosen, rejected = logps[index].unbind(-1)                               # (P,), (P,)
    ref_chosen, ref_rejected = prefs.ref_logps[prefs.pairs[ids]].to(device).unbind(-1)   # (P,), (P,)
    loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=config.beta,
                             loss_type=config.loss_type, label_smoothing=config.label_smoothing)
    metrics["logps/chosen"] = chosen.mean().item()
    metrics["logps/rejected"] = rejected.mean().item()
    if config.nll_coef > 0:
        # RPO: the chosen responses' NLL per token, averaged over pairs (a ranking's best is in K-1 pairs)
        ids_and_prompts = [prefs.sequences[i] for i in rows.tolist()]
        lengths = torch.tensor([len(ids) - n_prompt for ids, n_prompt in ids_and_prompts],
                               device=device).clamp(min=1)                  # (U,) response tokens, EOS included
        nll = -(logps / lengths)[index[:, 0]].mean()                         # (U,) -> (P,) chosen rows -> scalar
        loss = loss + config.nll_coef * nll
        metrics["loss/nll_chosen"] = nll.item()
    return loss, metrics


def batch_loss_function(loss_type):
    """The per-batch loss of a config's loss_type: DPO and its variants, or Preferred-FT."""
    if loss_type == "preferred_ft":
        from minirlhf.baselines import preferred_ft_batch_loss
        return preferred_ft_batch_loss
    return dpo_batch_loss


@torch.no_grad()
def heldout_metrics(policy, prefs, config, pad_id, device, batch_size=256):
    """Mean batch metrics over every held-out pair: eval/loss and eval/reward_accuracy, the
    implicit reward β·log(π/π_ref) used as a reward model on pairs never trained on."""
    batch_loss = batch_loss_function(config.loss_type)
    totals, n = {}, len(prefs.pairs)
    for start in range(0, n, batch_size):
        ids = torch.arange(start, min(n, start + batch_size))
        loss, metrics = batch_loss(policy, prefs, ids, config, pad_id, device)
        for key, value in {"loss": float(loss), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + value * len(ids) / n
    return {"eval/loss": totals["loss"], "eval/reward_accuracy": totals["rewards/accuracies"],
            "eval/margins": totals["rewards/margins"]}


def plot_logps_and_margins(rows, path, title):
    """The plot students ask about: log π of chosen responses may fall while the margin rises."""
    panels = {"policy log-probs of the data (nats)": ("logps/chosen", "logps/rejected"),
              "implicit rewards β·log(π/π_ref)": ("rewards/chosen", "rewards/rejected", "rewards/margins")}
    panels = {title: [k for k in keys if k in rows[0]] for title, keys in panels.items()}
    panels = {title: keys for title, keys in panels.items() if keys}
    fig, axes = common.figure(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    colors = {"chosen": "tab:green", "rejected": "tab:red", "margins": "black"}
    for ax, (panel_title, keys) in zip(axes[0], panels.items()):
        for key in keys:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], color=colors[key.split("/")[1]], label=key)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# Training

def train_dpo(config, sft_dir, prefs_path, out_dir, device="cpu", resume=False, overwrite=False, progress=True,
              stage="dpo"):
    """Train a policy on preference pairs with `config.loss_type`; write the run folder and return the summary."""
    config.validate()
    started = time.perf_counter()
    out_dir = common.prepare_run_dir(out_dir, overwrite=overwrite, resume=resume)
    tokenizer = load_tokenizer()
    pad = tokenizer.eot_token
    task = get_task(config.task)
    test_prompts = [r["prompt"] for r in read_jsonl(config.test_prompts, "prompts", tokenizer,
                                                    config.max_prompt_tokens)][:config.n_eval_samples]
    test_prefs_path = config.test_prefs or Path(prefs_path).with_name("pairs_test.jsonl")

    common.seed_everything(config.seed)
    reference = load_gpt(sft_dir, device, tokenizer).requires_grad_(False)   # frozen π_ref
    common.check_generation_fits(config, reference.config.block_size)
    policy = load_gpt(sft_dir, device, tokenizer)                            # π, initialised to π_ref
    t0 = time.perf_counter()
    # Preferred-FT never looks at π_ref while training: only its held-out pairs are scored.
    train = load_preferences(prefs_path, tokenizer, reference, config, device,
                             with_reference=config.loss_type != "preferred_ft")
    test = load_preferences(test_prefs_path, tokenizer, reference, config, device)
    ref_seconds = time.perf_counter() - t0
    optimizer = common.make_optimizer(policy, config.lr, config.weight_decay)
    common.write_json(out_dir / "config.json", {**dataclasses.asdict(config), "model": dataclasses.asdict(policy.config),
                                                "stage": stage, "sft": str(sft_dir), "prefs": str(prefs_path)})
    modules = {"model": policy, "optimizer": optimizer}
    start_step, rows, _ = common.resume_training(out_dir, modules) if resume else (0, [], None)
    log = common.MetricsLog(out_dir / "metrics.jsonl", rows)

    def evaluate(n_prompts, n_show=5):
        return evaluate_policy(policy, tokenizer, test_prompts[:n_prompts], task.gold_reward, reference=reference,
                               max_new_tokens=config.max_new_tokens, max_prompt_tokens=config.max_prompt_tokens,
                               generator=common.step_generator(config.seed, -1), n_show=n_show)

    batch_loss = batch_loss_function(config.loss_type)
    window = []                                      # metrics of the steps since the last log line
    bar = tqdm(range(start_step, config.steps), desc=stage, disable=not progress, initial=start_step,
               total=config.steps)
    with common.GracefulStop() as stop:
        for step in bar:
            lr = common.cosine_lr(step, config.steps, config.warmup_steps, config.lr, config.min_lr_ratio)
            common.set_lr(optimizer, lr)
            ids = sample_pairs(train, config.batch_size, common.step_generator(config.seed, step))  # (P,)
            loss, metrics = batch_loss(policy, train, ids, config, pad, device)
            common.check_finite(loss, step, out_dir)
            common.optimizer_step(optimizer, loss, policy, config.grad_clip)
            window.append(metrics)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k != "sft/tokens"}, refresh=False)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                row = {"step": done, **{k: statistics.mean(m[k] for m in window) for k in window[0]}, "lr": lr}
                if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                    row.update({k: v for k, v in evaluate(config.n_periodic_eval, n_show=0).items()
                                if k in ("eval/gold_reward", "eval/kl")})
                    row.update(heldout_metrics(policy, test, config, pad, device))
                log.log(row)
                window = []
                common.save_checkpoint(out_dir, done, modules)
            if stop.requested:
                common.save_checkpoint(out_dir, done, modules)
                raise common.Interrupted(done, out_dir)

    # Final evaluation: the shared sampler-based one, then the implicit reward on held-out pairs.
    t0 = time.perf_counter()
    summary = evaluate(config.n_eval_samples)
    summary.update(heldout_metrics(policy, test, config, pad, device))
    summary["eval/seconds"] = time.perf_counter() - t0
    summary["train/ref_logps_seconds"] = ref_seconds
    save_model(policy, out_dir)
    main_loss = "loss/sft" if config.loss_type == "preferred_ft" else "loss/dpo"
    common.plot_metrics(log.rows, [main_loss, "rewards/accuracies"], out_dir / "loss.png", f"{stage}: training loss")
    plot_logps_and_margins(log.rows, out_dir / "logps_and_margins.png", f"{stage} ({config.loss_type}, β={config.beta})")
    if config.eval_every:
        common.plot_metrics(log.rows, ["eval/gold_reward", "eval/kl", "eval/reward_accuracy"],
                            out_dir / "eval.png", f"{stage}: held-out evaluation")
    summary["train/seconds"] = time.perf_counter() - started          # the whole stage, as in every stage
    common.write_json(out_dir / "summary.json", summary)
    common.remove_checkpoint(out_dir)
    return summary
