"""Tests for --device cuda and --device mps: the kit runs where the hardware exists.

What is checked:
  - everywhere: asking for a device that is missing is a one-line ConfigError naming the
    device (this machine has no GPU, so these run here);
  - on each GPU that exists (otherwise skipped, saying which hardware is missing): the GPT's
    logits on the device equal the CPU's; sampling with the kit's CPU generators works there
    (every stage seeds its sampling with a `torch.Generator()` on the CPU); `run --fast`
    runs every stage on the device and ends with finite numbers.
"""
import json
import math

import pytest
import torch

from minirlhf.config import ConfigError, pick_device
from minirlhf.model import GPT, GPTConfig


def available(device):
    if device == "cuda":
        return torch.cuda.is_available()
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


GPUS = [pytest.param(d, marks=pytest.mark.skipif(not available(d), reason=f"no {d} device on this machine"))
        for d in ("cuda", "mps")]


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_missing_device_is_a_clear_error(device):
    if available(device):
        assert pick_device(device).type == device
        return
    with pytest.raises(ConfigError, match=f"--device {device}: no "):
        pick_device(device)


@pytest.mark.parametrize("device", GPUS)
def test_logits_on_the_device_equal_the_cpus(device):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    tokens = torch.randint(0, 64, (3, 16))
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        on_cpu = model(tokens, mask)
        on_device = model.to(device)(tokens.to(device), mask.to(device)).cpu()
    real = mask.bool()
    assert (on_cpu[real] - on_device[real]).abs().max() < 1e-4


@pytest.mark.parametrize("device", GPUS)
def test_sampling_with_the_kits_cpu_generator(device):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)).to(device).eval()
    prompt = torch.zeros(2, 3, dtype=torch.long, device=device)
    out = model.generate(prompt, max_new_tokens=5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 8) and out.tokens.device.type == device


@pytest.mark.parametrize("device", GPUS)
def test_run_fast_on_the_device(device, tmp_path):
    from minirlhf.pipeline import run_pipeline
    run_pipeline(tmp_path / "run", fast=True, device=torch.device(device), progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    numbers = _floats(summary)
    assert numbers and all(math.isfinite(v) for v in numbers)


def _floats(obj):
    """Every float inside a JSON-like object."""
    if isinstance(obj, float):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _floats(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _floats(v)]
    return []
