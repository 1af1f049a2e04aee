"""The direct alternative to RLHF: Direct Preference Optimisation (Rafailov et al. 2023).

RLHF maximises reward under a KL leash to the SFT model (DPO eq. 3),

    max_π  E_{x, y~π}[ r(x, y) ]  −  β · KL( π(·|x) ‖ π_ref(·|x) ),

whose optimum is π*(y|x) = π_ref(y|x) · exp(r(x, y)/β) / Z(x) (eq. 4). Solved for the reward,
r(x, y) = β · log π*(y|x)/π_ref(y|x) + β · log Z(x) (eq. 5): every policy defines an
*implicit reward*. Under the Bradley-Terry model only reward differences matter, so Z(x)
cancels (eq. 6) and the reward-model loss, written with the implicit reward, trains the
policy directly on the preference pairs (eq. 7, `losses.dpo_loss`): no reward model, no
sampling, no RL. The variants (IPO, cDPO, robust, hinge) change only the loss of h.

This stage trains on the same rankings the reward model sees (`minirlhf.preferences`); the
policy starts from the SFT model, which also serves, frozen, as π_ref. Because π_ref never
changes, its log-probs are computed once, before training (`load_pair_sequences`), and a
process that trains several runs from one SFT model on the same completions (a notebook) reuses
them, bit for bit (`preferences.logps_of_sequences`). A batch is a few whole rankings: their
C(K,2) pairs cost only K sequences in the forward pass.

Deliberate simplifications: rankings are drawn at random each step with a generator that
depends only on (seed, step), so --resume continues exactly; log-probs are summed over
response tokens (DPO's sequence log-probs, no length normalisation); the policy stays in
eval mode, so dropout (0 in the SFT model anyway) never makes log π noisy. The
Preferred-FT baseline (baselines.py) has its own loop and shares the evaluation below.
"""
import dataclasses
import time
from typing import Optional

import torch

from minirlhf.checkpoints import load_gpt
from minirlhf.config import (NON_NEGATIVE, POSITIVE, between, check_generation_fits, checked, one_of, require,
                             validate)
from minirlhf.data import by_length_in_chunks, default_path, read_prompts
from minirlhf.evaluate import evaluate_policy
from minirlhf.losses import DPO_LOSS_TYPES, dpo_loss, rpo_nll
from minirlhf.optim import cosine_lr, make_optimizer, optimizer_step, seed_everything, set_lr, step_generator
from minirlhf.preferences import distinct_rows, held_out_path, load_pair_sequences, sample_pairs
from minirlhf.runs import Run, check_same_task, figure
from minirlhf.sampling import sequence_logprobs
from minirlhf.tasks import format_fn, get_task
from minirlhf.tokenizer import load_tokenizer


@dataclasses.dataclass
class DPOConfig:
    """DPO on preference pairs, starting from the SFT model. Defaults train in under a minute on 2 cores.

    The defaults add the NLL term on the chosen responses (RPO, nll_coef=0.5, β=0.25): on the
    toy task plain DPO trades grammar for sentiment, and the term keeps it (docs/dpo.md).
    `PLAIN_DPO` (`--set nll_coef=0 beta=1 lr=2e-4`) is the DPO paper's loss at its best
    settings here."""
    test_prompts: str = str(default_path("prompts_test"))  # prompts for eval/gold_reward and eval/kl
    test_prefs: Optional[str] = None   # held-out preferences for eval/reward_accuracy (None: the *_test.jsonl beside --prefs)
    task: str = "reviews"              # whose gold judge scores the samples
    loss_type: str = checked("sigmoid", one_of(*DPO_LOSS_TYPES), "Preferred-FT is `python -m minirlhf pft`")  # sigmoid (DPO), ipo, hinge, robust
    beta: float = checked(0.25, POSITIVE)  # β: weight of the KL term; the implicit reward is β·log(π/π_ref)
    label_smoothing: float = checked(0.0, between(0, 0.5, high_open=True))  # ε: assumed label-flip rate (cDPO with sigmoid; robust)
    nll_coef: float = checked(0.5, NON_NEGATIVE)  # α: + α·NLL per token of the chosen responses (RPO, Pang et al. 2024); 0: DPO
    steps: int = checked(300, POSITIVE)  # optimiser steps
    batch_size: int = checked(4, POSITIVE)  # rankings per step, each with all its pairs (K=16: 120 pairs from 16 sequences); a pairs file: pairs
    lr: float = checked(3e-4, POSITIVE)  # peak learning rate (AdamW)
    warmup_steps: int = checked(20, NON_NEGATIVE)  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = checked(0.1, between(0, 1))  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = checked(0.0, NON_NEGATIVE)  # AdamW weight decay on matrices (0: the KL term is the regulariser)
    grad_clip: float = checked(1.0, POSITIVE)  # clip the global gradient norm to this
    log_every: int = checked(10, POSITIVE)  # steps between metrics.jsonl lines (and checkpoints)
    eval_every: int = checked(0, NON_NEGATIVE)  # steps between gold-reward/KL evaluations in metrics.jsonl (0: final only)
    n_periodic_eval: int = checked(128, POSITIVE)  # test prompts per periodic evaluation (the first of the final's prompts)
    max_prompt_tokens: int = checked(16, POSITIVE)  # longer prompts are refused
    max_new_tokens: int = checked(48, POSITIVE)  # length limit when sampling completions
    n_eval_samples: int = checked(256, POSITIVE)  # test prompts sampled for eval/gold_reward and eval/kl
    ref_batch_size: int = checked(256, POSITIVE)  # sequences per forward pass when precomputing log π_ref
    chunk_rows: int = checked(16, POSITIVE)  # a step's sequences run in length-sorted chunks of this many rows (less padding)
    seed: int = 0                      # seeds batch order and evaluation sampling


    validate = validate

    def check_together(self):
        require(self.label_smoothing == 0 or self.loss_type in ("sigmoid", "robust"),
                "label_smoothing applies to loss_type sigmoid (cDPO) and robust only")


FAST = dict(steps=30, batch_size=4, warmup_steps=5, log_every=5, n_eval_samples=64)
# The DPO paper's loss (no NLL term), with the β and learning rate that did best for it here (docs/dpo.md).
PLAIN_DPO = dict(nll_coef=0.0, beta=1.0, lr=2e-4)


# ---------------------------------------------------------------------------
# One batch: the loss and its metrics

def policy_logps(policy, data, rows, pad_id, device, chunk_rows):
    """(U,) log π(y|x) of the sequences `rows`, in length-sorted chunks of `chunk_rows` (gradients flow)."""
    sequences = [data.sequences[i] for i in rows.tolist()]
    return by_length_in_chunks(lambda *batch: sequence_logprobs(policy, *batch), sequences, pad_id, device,
                               chunk_rows)


def dpo_batch_loss(policy, data, ids, config, pad_id, device):
    """(loss, metrics) of DPO on the pairs `ids` (P,): one policy forward over their distinct sequences."""
    rows, index = distinct_rows(data, ids)                                   # (U,), (P, 2)
    logps = policy_logps(policy, data, rows, pad_id, device, config.chunk_rows)   # (U,) log π(y|x)
    index = index.to(device)
    chosen, rejected = logps[index].unbind(-1)                               # (P,), (P,)
    ref_chosen, ref_rejected = data.ref_logps[data.pairs[ids]].to(device).unbind(-1)   # (P,), (P,)
    loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=config.beta,
                             loss_type=config.loss_type, label_smoothing=config.label_smoothing)
    metrics["logps/chosen"] = chosen.mean().item()
    metrics["logps/rejected"] = rejected.mean().item()
    lengths = torch.tensor([len(data.sequences[i][0]) - data.sequences[i][1] for i in rows.tolist()],
                           device=device).clamp(min=1)                      # (U,) response tokens, EOS included
    per_token = (logps.detach() / lengths)[index]                            # (P, 2): the sums' length-free view
    metrics["logps/chosen_per_token"] = per_token[:, 0].mean().item()
    metrics["logps/rejected_per_token"] = per_token[:, 1].mean().item()
    if config.nll_coef > 0:   # RPO: + α · the chosen responses' NLL per token
        nll, nll_metrics = rpo_nll(logps, lengths, index[:, 0])
        loss = loss + config.nll_coef * nll
        metrics.update(nll_metrics)
    return loss, metrics


# ---------------------------------------------------------------------------
# Evaluation, shared with Preferred-FT

@torch.no_grad()
def heldout_metrics(policy, data, config, pad_id, device, batch_loss=dpo_batch_loss, batch_size=256):
    """Mean batch metrics over every held-out pair: eval/loss and eval/reward_accuracy, the
    implicit reward β·log(π/π_ref) used as a reward model on pairs never trained on."""
    totals, n = {}, len(data.pairs)
    for start in range(0, n, batch_size):
        ids = torch.arange(start, min(n, start + batch_size))
        loss, metrics = batch_loss(policy, data, ids, config, pad_id, device)
        for key, value in {"loss": float(loss), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + value * len(ids) / n
    return {"eval/loss": totals["loss"], "eval/reward_accuracy": totals["rewards/accuracies"],
            "eval/margins": totals["rewards/margins"]}


def sampled_evaluation(policy, reference, tokenizer, config):
    """n_prompts -> the shared evaluation (gold reward, KL to π_ref) of `policy` on the first test prompts."""
    prompts = read_prompts(config.test_prompts, tokenizer, config.max_prompt_tokens)[:config.n_eval_samples]
    gold_fn = get_task(config.task).gold_reward

    def evaluate(n_prompts, n_show=5):
        return evaluate_policy(policy, tokenizer, prompts[:n_prompts], gold_fn, reference=reference,
                               max_new_tokens=config.max_new_tokens, max_prompt_tokens=config.max_prompt_tokens,
                               generator=step_generator(config.seed, -1), n_show=n_show,
                               format_fn=format_fn(config.task))
    return evaluate


def plot_logps_and_margins(rows, path, title):
    """The plot students ask about: log π of chosen responses may fall while the margin rises."""
    panels = {"policy log-probs of the data (nats)": ("logps/chosen", "logps/rejected"),
              "implicit rewards β·log(π/π_ref)": ("rewards/chosen", "rewards/rejected", "rewards/margins")}
    panels = {title: [k for k in keys if k in rows[0]] for title, keys in panels.items()}
    panels = {title: keys for title, keys in panels.items() if keys}
    fig, axes = figure(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
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

def train_dpo(config, sft_dir, prefs_path, out_dir, device="cpu", resume=False, overwrite=False, progress=True):
    """Train a policy on preferences with `config.loss_type`; write the run folder and return the summary."""
    config.validate()
    check_same_task(config.task, sft=sft_dir)
    started = time.perf_counter()
    tokenizer = load_tokenizer()
    pad = tokenizer.eot_token
    seed_everything(config.seed)
    reference = load_gpt(sft_dir, device, tokenizer).requires_grad_(False)   # frozen π_ref
    check_generation_fits(config, reference.config.block_size)
    policy = load_gpt(sft_dir, device, tokenizer)                            # π, initialised to π_ref
    evaluate = sampled_evaluation(policy, reference, tokenizer, config)
    t0 = time.perf_counter()
    train = load_pair_sequences(prefs_path, tokenizer, reference, config, device)
    test = load_pair_sequences(config.test_prefs or held_out_path(prefs_path), tokenizer, reference, config, device)
    ref_seconds = time.perf_counter() - t0
    optimizer = make_optimizer(policy, config.lr, config.weight_decay)
    with Run(out_dir, "dpo", config, resume=resume, overwrite=overwrite, progress=progress,
             sft=sft_dir, prefs=prefs_path) as run:
        run.start({"model": policy, "optimizer": optimizer}, policy.config)
        for step in run.steps(config.steps):
            lr = cosine_lr(step, config.steps, config.warmup_steps, config.lr, config.min_lr_ratio)
            set_lr(optimizer, lr)
            ids = sample_pairs(train, config.batch_size, step_generator(config.seed, step))  # (P,)
            loss, metrics = dpo_batch_loss(policy, train, ids, config, pad, device)
            run.check_finite(loss)
            optimizer_step(optimizer, loss, policy, config.grad_clip)
            run.average(metrics)
            run.show(**{k: f"{v:.3g}" for k, v in metrics.items()})
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                row = {"step": step + 1, "lr": lr}
                if config.eval_every and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
                    row.update({k: v for k, v in evaluate(config.n_periodic_eval, n_show=0).items()
                                if k in ("eval/gold_reward", "eval/kl")})
                    row.update(heldout_metrics(policy, test, config, pad, device))
                run.log(row)
                run.checkpoint(step + 1)

        t0 = time.perf_counter()
        summary = {**evaluate(config.n_eval_samples), **heldout_metrics(policy, test, config, pad, device)}
        summary.update({"eval/seconds": time.perf_counter() - t0, "train/ref_logps_seconds": ref_seconds})
        run.plot(["loss/dpo", "rewards/accuracies"], "loss.png", "dpo: training loss")
        plot_logps_and_margins(run.rows, run.out_dir / "logps_and_margins.png",
                               f"dpo ({config.loss_type}, β={config.beta})")
        if config.eval_every:
            run.plot(["eval/gold_reward", "eval/kl", "eval/reward_accuracy"], "eval.png", "dpo: held-out evaluation")
        summary["train/seconds"] = time.perf_counter() - started          # the whole stage, as in every stage
        return run.finish(summary, policy)
