"""SFT training throughput as a fraction of this machine's fp32 matmul throughput.

DESIGN.md's budget: SFT trains at >= 50 % of the machine's measured fp32 matmul FLOP/s,
counting 6·N FLOPs per token (forward 2N + backward 4N; Kaplan et al. 2020, §2.1). Both
numbers are measured here, on this machine, so the ratio travels between machines:

    1. matmul: the best of several 1024x1024 fp32 products (2·n³ FLOPs each);
    2. SFT: optimiser steps of the default SFT config on real demonstration batches
       (the same code path as `python -m minirlhf sft`: forward, loss, backward, AdamW).

Run: python benchmarks/bench_sft.py   (on an otherwise idle machine: two torch processes
sharing 2 cores slow each other down many times over)
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minirlhf.config import apply_overrides  # noqa: E402
from minirlhf.optim import make_optimizer, optimizer_step  # noqa: E402
from minirlhf.data import completion_batch, shift_for_loss  # noqa: E402
from minirlhf.losses import sft_loss  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf.sft import BatchSchedule, SFTConfig, load_examples  # noqa: E402
from minirlhf.tokenizer import load_tokenizer  # noqa: E402


def matmul_flops(n=1024, seconds=1.0):
    """Best-of fp32 matmul throughput in FLOP/s for n x n matrices."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def sft_throughput(config, steps=30):
    """(tokens/s, FLOP/s by 6·N, N, share of padded positions) over `steps` optimiser steps after a warm-up."""
    tokenizer = load_tokenizer()
    examples = load_examples(config.data, tokenizer, config)
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=config.block_size, n_layer=config.n_layer,
                          n_head=config.n_head, n_embd=config.n_embd))
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    schedule = BatchSchedule([len(ids) for ids, _ in examples], config.batch_size, 0, config.bucket_by_length)
    tokens, positions, elapsed = 0, 0, 0.0
    for step in range(steps + 5):
        inputs, input_mask, targets, loss_mask = shift_for_loss(
            *completion_batch([examples[i] for i in schedule(step)], tokenizer.eot_token))
        start = time.perf_counter()
        loss, _ = sft_loss(model(inputs, input_mask), targets, loss_mask)
        optimizer_step(optimizer, loss, model, config.grad_clip)
        if step >= 5:                      # the first steps warm up the allocator and kernels
            elapsed += time.perf_counter() - start
            tokens += int(input_mask.sum())
            positions += input_mask.numel()
    n_params = model.num_params()
    return tokens / elapsed, 6 * n_params * tokens / elapsed, n_params, 1 - tokens / positions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SFTConfig overrides for an extra row, e.g. --set n_layer=2 n_embd=256 n_head=8")
    args = parser.parse_args()
    default = SFTConfig()
    rows = [("default", default), ("default, bucket_by_length=false",
                                   apply_overrides(default, {"bucket_by_length": "false"}))]
    if args.set:
        rows.append((" ".join(args.set), apply_overrides(default, args.set)))
    peak = matmul_flops()
    print(f"{torch.get_num_threads()} threads; fp32 matmul 1024³ (best): {peak / 1e9:,.1f} GFLOP/s\n")
    print("| SFT config | params N | padding | tokens/s | GFLOP/s by 6·N | SFT / matmul |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, config in rows:
        tok_s, flops, n_params, padding = sft_throughput(config)
        shape = f"{config.n_layer}×{config.n_embd}"
        print(f"| {name} ({shape}) | {n_params / 1e6:.2f}M | {padding:.0%} | {tok_s:,.0f} | {flops / 1e9:,.1f} | "
              f"{flops / peak:.0%} |")


if __name__ == "__main__":
    main()
