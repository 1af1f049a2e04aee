"""Shared helpers for the smoke tests: one tiny SFT model per test session.

Training it takes a few seconds; every stage's smoke test starts from it, so each test
file stays fast. The model is small (2 layers, width 48, ~4 s to train) and writes
mostly fluent reviews (gold reward ~0.5, like the demonstrations).
"""
import functools
import tempfile
from pathlib import Path

from minirlhf.config import apply_overrides

TINY_SFT = dict(steps=250, n_layer=2, n_embd=48, n_head=2, eval_every=50, n_eval_samples=16, warmup_steps=10,
                lr=5e-3, batch_size=32)


@functools.lru_cache(maxsize=None)
def tiny_sft_dir():
    """Path of a tiny SFT run folder, trained once per session."""
    from minirlhf.sft import SFTConfig, train_sft
    out = Path(tempfile.mkdtemp(prefix="minirlhf-tiny-sft-")) / "sft"
    train_sft(apply_overrides(SFTConfig(), TINY_SFT), out, progress=False)
    return out
