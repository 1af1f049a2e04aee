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
import time

import torch

from minirlhf import data
from minirlhf.config import NON_NEGATIVE, POSITIVE, between, checked, require, validate
from minirlhf.data import completion_batch, default_path, encode_example, read_jsonl, read_prompts, shift_for_loss
from minirlhf.evaluate import evaluate_policy
from minirlhf.losses import sft_loss
from minirlhf.model import GPT, GPTConfig
from minirlhf.optim import cosine_lr, make_optimizer, optimizer_step, seed_everything, set_lr, step_generator
from minirlhf.runs import Run
from minirlhf.tasks import format_fn, get_task
from minirlhf.tokenizer import load_tokenizer


@dataclasses.dataclass
class SFTConfig:
    """Supervised fine-tuning on demonstrations. Defaults train in under a minute on 2 cores."""
    data: str = str(default_path("sft_train"))      # demonstrations JSONL: {"prompt", "completion"}
    val_data: str = str(default_path("sft_val"))    # held-out demonstrations for eval/loss
    test_prompts: str = str(default_path("prompts_test"))  # prompts for sampling (eval/gold_reward)
    task: str = "reviews"          # whose gold judge scores the samples
    n_layer: int = checked(2, POSITIVE)        # transformer blocks
    n_head: int = checked(8, POSITIVE)         # attention heads per block
    n_embd: int = checked(256, between(1, 8192))       # width of the residual stream
    block_size: int = checked(64, between(1, 4096))    # context length: prompt + completion + EOS must fit
    dropout: float = checked(0.0, between(0, 1, high_open=True))  # dropout probability (0: RLHF stages need it off)
    steps: int = checked(350, POSITIVE)        # optimiser steps
    batch_size: int = checked(128, POSITIVE)   # demonstrations per step
    bucket_by_length: bool = True  # batches of similar-length demonstrations (little padding); false: uniform random
    lr: float = checked(2e-3, POSITIVE)        # peak learning rate (AdamW)
    warmup_steps: int = checked(25, NON_NEGATIVE)   # linear warm-up steps before the cosine decay
    min_lr_ratio: float = checked(0.1, between(0, 1))  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = checked(0.1, NON_NEGATIVE)   # AdamW weight decay on matrices
    grad_clip: float = checked(1.0, POSITIVE)  # clip the global gradient norm to this
    eval_every: int = checked(100, POSITIVE)   # steps between validation-loss evaluations (and checkpoints)
    max_prompt_tokens: int = checked(16, POSITIVE)  # longer prompts are refused
    max_new_tokens: int = checked(48, POSITIVE)     # length limit when sampling completions
    n_eval_samples: int = checked(256, POSITIVE)    # test prompts sampled for eval/gold_reward
    seed: int = 0                  # seeds data order, initialisation and sampling

    validate = validate

    def check_together(self):
        require(self.n_embd % self.n_head == 0, "n_embd must be a multiple of n_head")
        require(self.max_prompt_tokens + self.max_new_tokens <= self.block_size,
                f"max_prompt_tokens + max_new_tokens ({self.max_prompt_tokens} + {self.max_new_tokens}) "
                f"must fit in block_size ({self.block_size})")


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
                                 generator=step_generator(self.seed, step)).tolist()
        while step >= len(self.batches):
            # epoch e shuffles with the stream of "step" -2 - e, which no training step uses
            generator = step_generator(self.seed, -2 - self.epochs_built)
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


def final_evaluation(model, tokenizer, val, test_prompts, config, device, tokens_per_s):
    """Validation NLL, the gold reward of samples at temperature 1, and the training throughput."""
    model.eval()
    summary = {"eval/loss": validation_loss(model, val, tokenizer.eot_token, device)}
    summary.update(evaluate_policy(model, tokenizer, test_prompts, get_task(config.task).gold_reward,
                                   max_new_tokens=config.max_new_tokens,
                                   max_prompt_tokens=config.max_prompt_tokens,
                                   generator=step_generator(config.seed, -1), format_fn=format_fn(config.task)))
    summary["model/params"] = model.num_params()
    summary["train/tokens_per_s"] = tokens_per_s
    summary["train/flops_per_s"] = 6 * model.num_params() * tokens_per_s   # 6·N per token (Kaplan et al. 2020)
    return summary


# ---------------------------------------------------------------------------
# Training

def train_sft(config, out_dir, device="cpu", resume=False, overwrite=False, progress=True):
    """Train a GPT on demonstrations; write the run folder and return the summary dict."""
    config.validate()
    tokenizer = load_tokenizer()
    pad = tokenizer.eot_token
    train = load_examples(config.data, tokenizer, config)
    val = load_examples(config.val_data, tokenizer, config)
    test_prompts = read_prompts(config.test_prompts, tokenizer, config.max_prompt_tokens)[:config.n_eval_samples]
    with Run(out_dir, "sft", config, resume=resume, overwrite=overwrite, progress=progress) as run:
        seed_everything(config.seed)
        model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=config.block_size, n_layer=config.n_layer,
                              n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout)).to(device)
        optimizer = make_optimizer(model, config.lr, config.weight_decay)
        run.start({"model": model, "optimizer": optimizer}, model.config)
        schedule = BatchSchedule([len(ids) for ids, _ in train], config.batch_size, config.seed,
                                 config.bucket_by_length)
        tokens_seen, train_time = 0, 0.0
        for step in run.steps(config.steps):
            t0 = time.perf_counter()
            lr = cosine_lr(step, config.steps, config.warmup_steps, config.lr, config.min_lr_ratio)
            set_lr(optimizer, lr)
            batch = completion_batch([train[i] for i in schedule(step)], pad)
            inputs, input_mask, targets, loss_mask = (t.to(device) for t in shift_for_loss(*batch))
            loss, metrics = sft_loss(model(inputs, input_mask), targets, loss_mask)
            run.check_finite(loss)
            optimizer_step(optimizer, loss, model, config.grad_clip)
            train_time += time.perf_counter() - t0
            tokens_seen += int(input_mask.sum())
            run.show(loss=f"{metrics['loss/sft']:.3f}", lr=f"{lr:.1e}")
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                run.log({"step": step + 1, "loss/sft": metrics["loss/sft"],
                         "eval/loss": validation_loss(model, val, pad, device), "lr": lr})
                run.checkpoint(step + 1)

        tokens_per_s = tokens_seen / train_time if train_time > 0 else float("nan")
        summary = final_evaluation(model, tokenizer, val, test_prompts, config, device, tokens_per_s)
        run.plot(["loss/sft", "eval/loss"], "loss.png", "SFT: training and validation loss")
        return run.finish(summary, model)
