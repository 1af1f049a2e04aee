"""Tests for minirlhf.reward: the reward-model stage and its `rm` command.

What is checked:
  - hand examples: the held-out file next to --prefs; bayes accuracy with a tie; the
    calibration bins and error of one pair; a rankings file read as pairs;
  - properties and references: `score` reads the last real token, so a right-padded and a
    left-padded batch score what each sequence scores alone (and reading the last column
    instead would not); with K = 2 the ranking loss is the pairwise loss, for one batch and
    for a whole training run; a wrong kind of --prefs file is a clear error that names the
    file to pass;
  - smoke runs (a tiny SFT model, trained here, and a small collect): held-out accuracy
    beats chance by a wide margin; the folder is complete and `load_scalar_model` reads it
    back; after normalisation the saved model scores its SFT samples with mean 0, std 1;
    an interrupted run resumes to the same result; a diverging run stops with a message.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from minirlhf import runs as harness
from minirlhf.__main__ import main
from minirlhf.checkpoints import load_scalar_model
from minirlhf.collect import CollectConfig, collect
from minirlhf.config import ConfigError, apply_overrides
from minirlhf.data import DataError, completion_batch, encode_example, pad_left, read_jsonl, write_jsonl
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel
from minirlhf.preferences import held_out_path, read_preferences
from minirlhf.reward import (RewardConfig, bayes_accuracy, calibration, preference_loss, preferences_file,
                             score_records, score_texts, train_reward_model, training_records)
from minirlhf.sft import SFTConfig, train_sft
from minirlhf.tokenizer import load_tokenizer

SMALL_SFT = dict(steps=100, n_layer=1, n_embd=48, n_head=2, eval_every=50, n_eval_samples=16, warmup_steps=10,
                 lr=5e-3, batch_size=32)
SMALL_RM = dict(steps=150, batch_size=16, eval_every=50, warmup_steps=10, lr=3e-3, n_norm_prompts=48)
RANKINGS = [{"prompt": "the plot was", "completions": [" good .", " okay .", " bad ."]},
            {"prompt": "i loved", "completions": [" the music .", " the the .", " it"]}]


# ---------------------------------------------------------------------------
# Hand examples


def test_held_out_file_is_the_sibling(tmp_path):
    assert held_out_path(tmp_path / "pairs.jsonl") == tmp_path / "pairs_test.jsonl"
    assert held_out_path("runs/p/rankings.jsonl").name == "rankings_test.jsonl"
    assert preferences_file("runs/p", "ranking") == Path("runs/p/rankings.jsonl"), "the K-wise loss reads rankings"
    assert preferences_file("runs/p", "pairwise") == Path("runs/p/pairs.jsonl"), "Bradley-Terry reads pairs"


def test_bayes_accuracy_counts_ties_half():
    golds = {("p", "a"): 0.9, ("p", "b"): 0.5, ("p", "c"): 0.5}
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"},      # gold agrees: 1
             {"prompt": "p", "chosen": "b", "rejected": "c"},      # tie: 1/2
             {"prompt": "p", "chosen": "c", "rejected": "a"}]      # gold disagrees: 0
    assert bayes_accuracy(pairs, golds) == pytest.approx(0.5)


def test_calibration_of_one_pair_by_hand():
    # margin log 3: σ = 3/4 for the chosen order (label 1), 1/4 for the other (label 0)
    bins, ece = calibration(torch.tensor([math.log(3.0)]))
    assert [(round(p, 6), y, n) for p, y, n in bins] == [(0.25, 0.0, 1), (0.75, 1.0, 1)]
    assert ece == pytest.approx(0.25)
    assert calibration(torch.zeros(4))[1] == pytest.approx(0.0)          # σ(0) = ½, observed ½


def test_rankings_file_gives_all_pairs_to_the_pairwise_loss(tmp_path):
    write_jsonl(tmp_path / "rankings.jsonl", RANKINGS)
    pairs = training_records(read_preferences(tmp_path / "rankings.jsonl"), "pairwise")
    assert [(p["chosen"], p["rejected"]) for p in pairs[:3]] == [(" good .", " okay ."), (" good .", " bad ."),
                                                                   (" okay .", " bad .")]
    assert len(pairs) == 2 * math.comb(3, 2)
    assert training_records(read_preferences(tmp_path / "rankings.jsonl"), "ranking") == RANKINGS


# ---------------------------------------------------------------------------
# Properties: where the reward is read, K = 2 rankings, wrong files


def sharp_reward_model(seed=0):
    """A tiny scalar-head model whose outputs depend strongly on context (weights std 0.3)."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(vocab_size=load_tokenizer().n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model = ScalarHeadModel.from_gpt(gpt).eval()
    model.reward_gain.fill_(2.0)
    model.reward_bias.fill_(-1.0)
    return model


@torch.no_grad()
def test_reward_is_read_at_the_last_real_token_under_any_padding():
    tokenizer, model = load_tokenizer(), sharp_reward_model()
    texts = [("the plot was", " good ."), ("i", " loved the music . the acting was very bad ."), ("the cast", " was")]
    examples = [encode_example(tokenizer, p, c, 32, 16) for p, c in texts]
    alone = torch.cat([model.score(torch.tensor([ids])) for ids, _ in examples])               # (3,) unpadded
    right = score_records(model, [{"prompt": p, "completions": [c]} for p, c in texts], tokenizer,
                          RewardConfig(), "cpu")[:, 0]                                          # right-padded
    left = model.score(*pad_left([ids for ids, _ in examples], tokenizer.eot_token))            # left-padded
    torch.testing.assert_close(right, alone)
    torch.testing.assert_close(left, alone)
    tokens, mask, _ = completion_batch(examples, tokenizer.eot_token)                           # (3, T)
    at_last_column = 2.0 * model(tokens, mask)[:, -1] - 1.0                 # (3,), a pad in rows 0 and 2
    assert not torch.allclose(at_last_column, alone, atol=1e-3)


def test_ranking_loss_with_two_completions_is_the_pairwise_loss():
    rewards = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))                     # (B, 2)
    pairwise, m_pair = preference_loss(rewards, "pairwise")
    ranking, m_rank = preference_loss(rewards, "ranking")
    torch.testing.assert_close(ranking, pairwise)
    assert m_rank["accuracy"] == m_pair["accuracy"]


@pytest.mark.parametrize("kind, loss, message", [
    ("pairs", "ranking", "loss=ranking needs rankings .* pass .*rankings.jsonl"),
    ("demonstrations", "pairwise", "neither pairs .* nor rankings"),
    ("mixed_k", "ranking", "rankings of different lengths"),
])
def test_wrong_kind_of_preference_file_is_a_clear_error(tmp_path, kind, loss, message):
    records = {"pairs": [{"prompt": "a", "chosen": "b", "rejected": "c"}],
               "demonstrations": [{"prompt": "a", "completion": "b"}],
               "mixed_k": [{"prompt": "a", "completions": ["b", "c"]}, {"prompt": "a", "completions": list("bcd")}]}
    write_jsonl(tmp_path / "pairs.jsonl", records[kind])
    with pytest.raises(DataError, match=message):
        training_records(read_preferences(tmp_path / "pairs.jsonl"), loss)


def test_cli_names_the_file_to_pass(tmp_path, capsys):
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    code = main(["rm", "--sft", str(tmp_path), "--prefs", str(tmp_path / "pairs.jsonl"), "--out",
                 str(tmp_path / "rm"), "--set", "loss=ranking", "--quiet"])
    assert code == 2
    assert "rankings.jsonl" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="loss must be one of pairwise, ranking"):
        apply_overrides(RewardConfig(), ["loss=listwise"]).validate()


# ---------------------------------------------------------------------------
# Smoke runs on a small SFT model's samples


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    sft_dir = tmp_path_factory.mktemp("sft")
    train_sft(apply_overrides(SFTConfig(), SMALL_SFT), sft_dir, progress=False)
    out = tmp_path_factory.mktemp("prefs")
    config = apply_overrides(CollectConfig(), dict(n_prompts=1000, k=4, labeler_temperature=0.02))
    collect(config, sft_dir, out, progress=False)
    return sft_dir, out


@pytest.fixture(scope="module")
def small_run(prefs, tmp_path_factory):
    sft_dir, prefs_dir = prefs
    out = tmp_path_factory.mktemp("rm")
    config = apply_overrides(RewardConfig(), {**SMALL_RM, "loss": "ranking"})
    return out, train_reward_model(config, sft_dir, prefs_dir / "rankings.jsonl", out, progress=False)


def test_small_run_beats_chance_and_writes_its_folder(small_run):
    out, summary = small_run
    assert summary["eval/accuracy"] >= 0.65      # chance is 0.5; seeds 0, 1, 2 measured 0.69 to 0.71
    assert summary["eval/accuracy"] <= summary["eval/bayes_accuracy"] + 0.05
    assert summary["eval/gold_corr"] > 0.4
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.pt", "accuracy.png", "calibration.png",
                 "norm_samples.jsonl"):
        assert (out / name).exists(), f"{name}"
    assert not (out / "checkpoint.pt").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval/loss"] < math.log(2) and rows[-1]["eval/loss"] == pytest.approx(summary["eval/loss"])


def test_saved_model_scores_its_sft_samples_with_mean_0_std_1(small_run):
    out, summary = small_run
    model = load_scalar_model(out)
    assert model.reward_gain.item() == pytest.approx(summary["rm/gain"])
    assert summary["rm/gain"] != pytest.approx(1.0)                   # the buffers were really set
    samples = [json.loads(line) for line in (out / "norm_samples.jsonl").read_text().splitlines()]
    rewards = score_texts(model, load_tokenizer(), [s["prompt"] for s in samples], [s["completion"] for s in samples],
                          RewardConfig(), "cpu")                                               # (N,)
    assert len(samples) == SMALL_RM["n_norm_prompts"]
    assert rewards.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert rewards.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    raw = torch.tensor([s["raw"] for s in samples])
    torch.testing.assert_close(rewards, summary["rm/gain"] * raw + summary["rm/bias"], atol=1e-4, rtol=0)


def test_ranking_on_two_completions_trains_like_pairwise(prefs, tmp_path):
    sft_dir, prefs_dir = prefs
    k2 = [{"prompt": r["prompt"], "completions": r["completions"][:2]}
          for r in read_jsonl(prefs_dir / "rankings.jsonl", "rankings")]
    write_jsonl(tmp_path / "rankings.jsonl", k2)
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["completions"][0],
                                            "rejected": r["completions"][1]} for r in k2])
    tiny = {**SMALL_RM, "steps": 6, "eval_every": 3, "test_prefs": str(prefs_dir / "pairs_test.jsonl")}
    summaries = [train_reward_model(apply_overrides(RewardConfig(), {**tiny, "loss": loss}), sft_dir,
                                    tmp_path / name, tmp_path / loss, progress=False)
                 for loss, name in (("ranking", "rankings.jsonl"), ("pairwise", "pairs.jsonl"))]
    for key in ("eval/accuracy", "eval/loss", "eval/gold_corr", "rm/gain", "rm/bias"):
        assert summaries[0][key] == pytest.approx(summaries[1][key], rel=1e-4, abs=1e-5), f"{key}"


def test_interrupted_run_resumes_to_the_same_result(prefs, tmp_path, monkeypatch):
    sft_dir, prefs_dir = prefs
    config = apply_overrides(RewardConfig(), {**SMALL_RM, "steps": 8, "eval_every": 4})
    whole = train_reward_model(config, sft_dir, prefs_dir / "rankings.jsonl", tmp_path / "whole", progress=False)

    def stop_at_step_6(loss, step, out_dir=None):
        if step == 6:
            raise KeyboardInterrupt                               # dies after the checkpoint at step 4
    monkeypatch.setattr(harness, "check_finite", stop_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(config, sft_dir, prefs_dir / "rankings.jsonl", tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    again = train_reward_model(config, sft_dir, prefs_dir / "rankings.jsonl", tmp_path / "cut", resume=True,
                               progress=False)
    timing = {"train/seconds"}
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}


def test_diverging_run_stops_with_a_message(prefs, tmp_path):
    sft_dir, prefs_dir = prefs
    config = apply_overrides(RewardConfig(), {**SMALL_RM, "lr": 1e30, "grad_clip": 1e30, "warmup_steps": 1})
    with pytest.raises(harness.NonFiniteLossError, match="at step"):
        train_reward_model(config, sft_dir, prefs_dir / "rankings.jsonl", tmp_path / "nan", progress=False)
