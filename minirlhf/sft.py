"""Step 1 of RLHF: supervised fine-tuning (SFT) on demonstrations.

InstructGPT (Ouyang et al. 2022, §3.5) starts from a pretrained model and fine-tunes it on
labeler-written demonstrations. Our tiny GPT starts from scratch, so SFT here is also its
pretraining: it learns the review grammar from the demonstrations.

The loss is the mean negative log-likelihood of the *completion* tokens only: the prompt
is context, not something the model is asked to write (`minirlhf.losses.sft_loss` with the
response mask of the targets).

Batches. By default each epoch is cut into batches of demonstrations of similar length
(`data.length_bucketed_batches`): a batch of random demonstrations is ~40 % padding, and
the forward and backward pass spend as much time on a pad as on a real token. The order
depends only on the seed and the epoch, so an interrupted run resumes to the same result.
`--set bucket_by_length=false` draws each batch uniformly at random instead.

Shape. The default model is 2 blocks of width 256 (1.7M parameters). On a CPU the matrix
products run near the machine's peak at any width here, but layer norms, GELUs, attention
and the optimiser cost time per element, not per FLOP: their share falls as the width
grows. Measured by `benchmarks/bench_sft.py` on 2 cores, 4 blocks of width 128 (0.86M)
train at about 37 % of the machine's matmul throughput, 2 blocks of width 256 at about
50 %, for the same validation loss on this task.

Deliberate simplifications: no gradient accumulation; float32 throughout.
"""
import dataclasses
import statistics
import time

import torch
from tqdm.auto import tqdm

from minirlhf import common, data
from minirlhf.checkpoints import save_model
from minirlhf.data import completion_batch, default_path, encode_example, read_jsonl, shift_for_loss
from minirlhf.evaluate import evaluate_policy
from minirlhf.losses import sft_loss
from minirlhf.model import GPT, GPTConfig
from minirlhf.tasks import get_task
from minirlhf.tokenizer import load_tokenizer


@dataclasses.dataclass
class SFTConfig:
    """Supervised fine-tuning on demonstrations. Defaults train in under a minute on 2 cores."""
    data: str = str(default_path("sft_train"))      # demonstrations JSONL: {"prompt", "completion"}
    val_data: str = str(default_path("sft_val"))    # held-out demonstrations for eval/loss
    test_prompts: str = str(default_path("prompts_test"))  # prompts for sampling (eval/gold_reward)
    task: str = "reviews"          # whose gold judge scores the samples
    n_layer: int = 2               # transformer blocks
    n_head: int = 8                # attention heads per block
    n_embd: int = 256              # width of the residual stream
    block_size: int = 64           # context length: prompt + completion + EOS must fit
    dropout: float = 0.0           # dropout probability (0: RLHF stages need it off anyway)
    steps: int = 350               # optimiser steps
    batch_size: int = 128          # demonstrations per step
    bucket_by_length: bool = True  # batches of similar-length demonstrations (little padding); false: uniform random
    lr: float = 2e-3               # peak learning rate (AdamW)
    warmup_steps: int = 25         # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.1      # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1      # AdamW weight decay on matrices
    grad_clip: float = 1.0         # clip the global gradient norm to this
    eval_every: int = 100          # steps between validation-loss evaluations (and checkpoints)
    max_prompt_tokens: int = 16    # longer prompts are refused
    max_new_tokens: int = 48       # length limit when sampling completions
    n_eval_samples: int = 256      # test prompts sampled for eval/gold_reward
    seed: int = 0                  # seeds data order, initialisation and sampling

    def validate(self):
        common.require(self.steps > 0, "steps must be positive")
        common.require(self.batch_size > 0, "batch_size must be positive")
        common.require(self.lr > 0, "lr must be positive")
        common.require(min(self.n_layer, self.n_head, self.n_embd, self.block_size) > 0,
                       "n_layer, n_head, n_embd and block_size must be positive")
        common.require(self.n_embd % self.n_head == 0, "n_embd must be a multiple of n_head")
        common.require(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        common.require(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        common.require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        common.require(self.weight_decay >= 0, "weight_decay must be >= 0")
        common.require(self.grad_clip > 0, "grad_clip must be positive")
        common.require(self.eval_every > 0, "eval_every must be positive")
        common.require(self.max_prompt_tokens > 0 and self.max_new_tokens > 0,
                       "max_prompt_tokens and max_new_tokens must be positive")
        common.require(self.max_prompt_tokens + self.max_new_tokens <= self.block_size,
                       f"max_prompt_tokens + max_new_tokens ({self.max_prompt_tokens} + {self.max_new_tokens}) "
                       f"must fit in block_size ({self.block_size})")
        common.require(self.n_eval_samples > 0, "n_eval_samples must be positive")


FAST = dict(steps=150, n_layer=2, n_head=4, n_embd=64, batch_size=64, eval_every=50, n_eval_samples=64,
            warmup_steps=20, lr=3e-3)


# ---------------------------------------------------------------------------
# Data and evaluation

def load_examples(path, tokenizer, config):
    """Tokenized (ids, n_prompt) demonstrations from a JSONL file."""
    return [encode_example(tokenizer, r["prompt"], r["completion"], config.block_size, config.max_prompt_tokens)
            for r in read_jsonl(path, "demonstrations", tokenizer, config.max_prompt_tokens)]


class BatchSchedule:
    """Which demonstrations step `step` trains on; a function of (seed, step) only, so that
    `--resume` continues with exactly the batches an uninterrupted run would have seen."""

    def __init__(self, lengths, batch_size, seed, bucket_by_length=True):
        self.lengths, self.batch_size, self.seed, self.bucket = lengths, batch_size, seed, bucket_by_length
        self.batches, self.epochs_built = [], 0   # bucketed batches of every epoch so far, in order

    def __call__(self, step):
        """The indices (into `lengths`) of the examples of step `step`."""
        if not self.bucket:
            return torch.randint(len(self.lengths), (self.batch_size,),
                                 generator=common.step_generator(self.seed, step)).tolist()
        while step >= len(self.batches):
            # epoch e shuffles with the stream of "step" -2 - e, which no training step uses
            generator = common.step_generator(self.seed, -2 - self.epochs_built)
            self.batches += data.length_bucketed_batches(self.lengths, self.batch_size, generator)
            self.epochs_built += 1
        return self.batches[step]


@torch.no_grad()
def validation_loss(model, examples, pad_id, device, batch_size=256):
    """Mean NLL per completion token over `examples` (a token-weighted average)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = completion_batch(examples[start:start + batch_size], pad_id)
        inputs, input_mask, targets, loss_mask = (t.to(device) for t in shift_for_loss(*batch))
        loss, metrics = sft_loss(model(inputs, input_mask), targets, loss_mask)
        total += float(loss) * metrics["sft/tokens"]
        count += metrics["sft/tokens"]
    model.train()
    return total / count


# ---------------------------------------------------------------------------
# Training

def train_sft(config, out_dir, device="cpu", resume=False, overwrite=False, progress=True):
    """Train a GPT on demonstrations; write the run folder and return the summary dict."""
    config.validate()
    tokenizer = load_tokenizer()
    train = load_examples(config.data, tokenizer, config)
    val = load_examples(config.val_data, tokenizer, config)
    test_prompts = [r["prompt"] for r in read_jsonl(config.test_prompts, "prompts", tokenizer,
                                                    config.max_prompt_tokens)][:config.n_eval_samples]
    out_dir = common.prepare_run_dir(out_dir, overwrite=overwrite, resume=resume)

    common.seed_everything(config.seed)
    model_config = GPTConfig(vocab_size=tokenizer.n_vocab, block_size=config.block_size, n_layer=config.n_layer,
                             n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout)
    model = GPT(model_config).to(device)
    optimizer = common.make_optimizer(model, config.lr, config.weight_decay)
    modules = {"model": model, "optimizer": optimizer}
    start_step, rows, _ = common.resume_training(out_dir, modules) if resume else (0, [], None)
    common.write_json(out_dir / "config.json", {**dataclasses.asdict(config), "model": dataclasses.asdict(model_config),
                                                "stage": "sft"})
    log = common.MetricsLog(out_dir / "metrics.jsonl", rows)

    pad = tokenizer.eot_token
    tokens_seen, train_time = 0, 0.0
    schedule = BatchSchedule([len(ids) for ids, _ in train], config.batch_size, config.seed, config.bucket_by_length)
    bar = tqdm(range(start_step, config.steps), desc="sft", disable=not progress, initial=start_step,
               total=config.steps)
    with common.GracefulStop() as stop:
        for step in bar:
            t0 = time.perf_counter()
            lr = common.cosine_lr(step, config.steps, config.warmup_steps, config.lr, config.min_lr_ratio)
            common.set_lr(optimizer, lr)
            batch = completion_batch([train[i] for i in schedule(step)], pad)
            inputs, input_mask, targets, loss_mask = (t.to(device) for t in shift_for_loss(*batch))
            loss, metrics = sft_loss(model(inputs, input_mask), targets, loss_mask)
            common.check_finite(loss, step + 1, out_dir)    # steps are counted from 1, as in metrics.jsonl
            common.optimizer_step(optimizer, loss, model, config.grad_clip)
            train_time += time.perf_counter() - t0
            tokens_seen += int(input_mask.sum())
            bar.set_postfix(loss=f"{metrics['loss/sft']:.3f}", lr=f"{lr:.1e}")
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                val_loss = validation_loss(model, val, pad, device)
                log.log({"step": step + 1, "loss/sft": metrics["loss/sft"], "eval/loss": val_loss, "lr": lr})
                common.save_checkpoint(out_dir, step + 1, modules)
            if stop.requested:
                common.save_checkpoint(out_dir, step + 1, modules)
                raise common.Interrupted(step + 1, out_dir)

    # Final evaluation: validation NLL and the gold reward of samples at temperature 1.
    model.eval()
    summary = {"eval/loss": validation_loss(model, val, pad, device)}
    summary.update(evaluate_policy(model, tokenizer, test_prompts, get_task(config.task).gold_reward,
                                   max_new_tokens=config.max_new_tokens,
                                   max_prompt_tokens=config.max_prompt_tokens,
                                   generator=common.step_generator(config.seed, -1)))
    n_params = model.num_params()
    summary["model/params"] = n_params
    summary["train/tokens_per_s"] = tokens_seen / train_time if train_time > 0 else float("nan")
    summary["train/flops_per_s"] = 6 * n_params * summary["train/tokens_per_s"]   # 6·N per token (Kaplan et al. 2020)
    save_model(model, out_dir)
    common.plot_metrics(log.rows, ["loss/sft", "eval/loss"], out_dir / "loss.png", "SFT: training and validation loss")
    common.write_json(out_dir / "summary.json", summary)
    common.remove_checkpoint(out_dir)
    return summary
