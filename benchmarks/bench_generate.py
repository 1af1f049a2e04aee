"""Generation speed with and without the KV cache.

A GPT of the default SFT model's shape (SFTConfig's layers, heads, width and context; the
kit's vocabulary) samples 32 new tokens for a batch of 64 prompts of 8 tokens, once with
the cache and once recomputing the whole sequence at every step. Each variant gets one
warm-up run, then the best of 3 is reported as tokens/s (new tokens only). Target: the
cache is at least 2x faster. Run: python benchmarks/bench_generate.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf.sft import SFTConfig  # noqa: E402
from minirlhf.tokenizer import load_tokenizer  # noqa: E402

BATCH, PROMPT_LEN, NEW_TOKENS, REPEATS = 64, 8, 32, 3


def tokens_per_second(model: GPT, prompts: torch.Tensor, use_cache: bool) -> float:
    def run():
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        model.generate(prompts, max_new_tokens=NEW_TOKENS, use_cache=use_cache, generator=generator)
        return time.perf_counter() - start

    run()  # warm-up
    best = min(run() for _ in range(REPEATS))
    return BATCH * NEW_TOKENS / best


def main():
    torch.manual_seed(0)
    sft = SFTConfig()
    config = GPTConfig(vocab_size=load_tokenizer().n_vocab, block_size=sft.block_size, n_layer=sft.n_layer,
                       n_head=sft.n_head, n_embd=sft.n_embd)
    model = GPT(config).eval()
    prompts = torch.randint(0, config.vocab_size, (BATCH, PROMPT_LEN))  # (B, T0)
    cached = tokens_per_second(model, prompts, use_cache=True)
    uncached = tokens_per_second(model, prompts, use_cache=False)
    print(f"GPT {model.num_params() / 1e6:.2f}M params, batch {BATCH}, prompt {PROMPT_LEN}, "
          f"{NEW_TOKENS} new tokens, {torch.get_num_threads()} threads, best of {REPEATS}\n")
    print("| cached tok/s | uncached tok/s | speedup |")
    print("| ---: | ---: | ---: |")
    print(f"| {cached:,.0f} | {uncached:,.0f} | {cached / uncached:.2f}x |")


if __name__ == "__main__":
    main()
