"""SFT smoke runs: the loss goes down, the run folder is complete, and seeds reproduce.

Tiny configs keep each run to a few seconds; `python -m minirlhf sft` trains the real one.
"""
import json

import pytest

from minirlhf.checkpoints import load_gpt
from minirlhf.common import ConfigError, apply_overrides
from minirlhf.sft import SFTConfig, train_sft

TINY = dict(steps=40, n_layer=1, n_embd=32, n_head=2, eval_every=20, n_eval_samples=16, warmup_steps=5,
            lr=5e-3, batch_size=32)
TIMING_KEYS = {"train/tokens_per_s", "train/flops_per_s"}   # measurements of the machine, not of the run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    summary = train_sft(apply_overrides(SFTConfig(), TINY), out, progress=False)
    return out, summary


def test_loss_goes_down_and_folder_is_complete(tiny_run):
    out, summary = tiny_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"] < 6.3        # log(503) = 6.22 at chance
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.pt", "loss.png"):
        assert (out / name).exists(), f"{name}"
    assert not (out / "checkpoint.pt").exists()
    for key in ("eval/loss", "eval/gold_reward", "train/tokens_per_s"):
        assert key in summary
    assert 0.0 <= summary["eval/gold_reward"] <= 1.0


def test_saved_model_reloads_with_the_same_validation_loss(tiny_run):
    from minirlhf.sft import load_examples, validation_loss
    from minirlhf.tokenizer import load_tokenizer
    out, summary = tiny_run
    tokenizer = load_tokenizer()
    model = load_gpt(out, tokenizer=tokenizer)
    val = load_examples(SFTConfig().val_data, tokenizer, apply_overrides(SFTConfig(), TINY))
    assert validation_loss(model, val, tokenizer.eot_token, "cpu") == pytest.approx(summary["eval/loss"], rel=1e-6)


def test_same_seed_same_summary(tiny_run, tmp_path):
    _, summary = tiny_run
    again = train_sft(apply_overrides(SFTConfig(), TINY), tmp_path / "again", progress=False)
    strip = lambda s: {k: v for k, v in s.items() if k not in TIMING_KEYS}
    assert strip(again) == strip(summary)


def test_finished_run_is_not_overwritten(tiny_run):
    out, _ = tiny_run
    with pytest.raises(ConfigError, match="--overwrite"):
        train_sft(apply_overrides(SFTConfig(), TINY), out, progress=False)


def test_unknown_and_impossible_settings_are_refused():
    with pytest.raises(ConfigError, match="valid keys: .*batch_size"):
        apply_overrides(SFTConfig(), ["batchsize=3"])
    with pytest.raises(ConfigError, match="lr must be positive"):
        apply_overrides(SFTConfig(), ["lr=-1"]).validate()
    assert apply_overrides(SFTConfig(), ["lr=0.01", "steps=5"]).steps == 5
