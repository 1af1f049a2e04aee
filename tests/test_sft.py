"""SFT smoke runs: the loss goes down, the run folder is complete, and seeds reproduce.

Tiny configs keep each run to a few seconds; `python -m minirlhf sft` trains the real one.
"""
import json

import pytest
import torch

from minirlhf.checkpoints import load_gpt
from minirlhf.config import ConfigError, apply_overrides
from minirlhf.data import length_bucketed_batches
from minirlhf.optim import fused_adam, make_optimizer, step_generator
from minirlhf.sft import BatchSchedule, SFTConfig, train_sft

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


def test_bucketed_epoch_visits_every_example_once_with_little_padding():
    lengths = [int(x) for x in torch.randint(5, 41, (1000,), generator=torch.Generator().manual_seed(0))]
    epoch = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(1))
    assert sorted(i for batch in epoch for i in batch) == list(range(1000)), "an epoch must visit each example once"
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in epoch)
    padding = 1 - sum(lengths) / padded
    assert padding < 0.05, f"bucketed batches should be almost unpadded, got {padding:.1%} padding"
    random_batches = [range(i, min(i + 32, 1000)) for i in range(0, 1000, 32)]   # i.i.d. lengths: random batches
    random_padding = 1 - sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in random_batches)
    assert random_padding > 0.3, f"the comparison needs random batches to be padded, got {random_padding:.1%}"


def test_batch_schedule_depends_only_on_seed_and_step():
    lengths = list(range(3, 50)) * 7
    first, second = BatchSchedule(lengths, 16, seed=3), BatchSchedule(lengths, 16, seed=3)
    later = [second(step) for step in (45, 3, 70)]                 # a resumed run asks for later steps first
    assert later == [first(step) for step in (45, 3, 70)], "the same (seed, step) must give the same batch"
    assert BatchSchedule(lengths, 16, seed=4)(0) != first(0), "another seed should give another order"
    per_epoch = len(length_bucketed_batches(lengths, 16, torch.Generator()))   # the count does not depend on the order
    assert first(0) != first(per_epoch), "epochs must be shuffled afresh"
    epoch_two = length_bucketed_batches(lengths, 16, step_generator(3, -3))
    assert [first(per_epoch + i) for i in range(per_epoch)] == epoch_two, "step e·n + i is batch i of epoch e"
    unbucketed = BatchSchedule(lengths, 16, seed=3, bucket_by_length=False)
    assert unbucketed(5) == BatchSchedule(lengths, 16, seed=3, bucket_by_length=False)(5), "uniform batches too"
    assert len(unbucketed(5)) == 16, f"uniform batches hold batch_size examples, got {len(unbucketed(5))}"


def test_optimizers_use_the_fused_adam_kernel_where_the_device_has_one():
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert optimizer.defaults.get("fused") is True, "CPU parameters get torch's fused AdamW"
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0], "decay on matrices only"
    on_meta = torch.nn.Linear(3, 2, device="meta")
    assert fused_adam(on_meta.parameters()) == {}, "a device without the kernel gets the plain loop"
