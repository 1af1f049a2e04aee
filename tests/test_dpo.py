"""DPO, its variants and the DPO paper's baselines (Preferred-FT, Best-of-N).

Hand-computed values: at initialisation (policy = reference) the DPO loss of a training batch
is log 2 (hinge 1, IPO (1/(2β))²) and every implicit reward is 0; the Best-of-N KL formula.
Properties and references: the deduplicated, length-sorted reference log-probs equal
per-pair unbatched ones; Best-of-N with N = 1 is plain SFT sampling (same samples, KL 0);
an interrupted run resumes to the same weights.
Smoke runs: DPO raises the margin and the gold reward of a small SFT model trained here;
IPO and cDPO run end to end; oracle Best-of-N beats its own unselected samples;
Preferred-FT raises the chosen log-probs; the CLI refuses bad settings.
"""
import collections
import json
import math

import pytest
import torch

from minirlhf import runs as harness
from minirlhf.__main__ import main
from minirlhf.baselines import (BestOfNConfig, PreferredFTConfig, best_of_n_kl_bound, preferred_ft_batch_loss,
                                run_best_of_n, train_preferred_ft)
from minirlhf.checkpoints import load_gpt, save_model
from minirlhf.collect import CollectConfig, collect
from minirlhf.config import apply_overrides
from minirlhf.data import completion_batch, default_path, read_jsonl, shift_for_loss
from minirlhf.dpo import PLAIN_DPO, DPOConfig, dpo_batch_loss, train_dpo
from minirlhf.evaluate import evaluate_policy
from minirlhf.files import write_json
from minirlhf.losses import sft_loss
from minirlhf.model import ScalarHeadModel
from minirlhf.optim import step_generator
from minirlhf.preferences import load_pair_sequences
from minirlhf.sampling import sequence_logprobs
from minirlhf.sft import SFTConfig, train_sft
from minirlhf.tasks import get_task
from minirlhf.tokenizer import load_tokenizer

# A small SFT model that writes mostly grammatical reviews (gold ≈ 0.25), and exact labels.
SFT_SMALL = dict(steps=150, n_layer=2, n_embd=64, n_head=2, eval_every=1000, n_eval_samples=16, warmup_steps=5,
                 lr=3e-3, batch_size=32)
COLLECT_SMALL = dict(n_prompts=300, k=4, labeler_temperature=0.0)
DPO_SMALL = dict(steps=100, batch_size=8, lr=5e-4, beta=0.5, warmup_steps=5, log_every=10, n_eval_samples=256)
QUICK = dict(steps=6, batch_size=4, warmup_steps=2, log_every=2, n_eval_samples=16)   # end-to-end checks only
N_GOLD = 256                                               # test prompts for comparing gold rewards


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(sft_dir, rankings.jsonl, the SFT model's gold reward on N_GOLD test prompts)."""
    root = tmp_path_factory.mktemp("dpo")
    train_sft(apply_overrides(SFTConfig(), SFT_SMALL), root / "sft", progress=False)
    collect(apply_overrides(CollectConfig(), COLLECT_SMALL), root / "sft", root / "prefs", progress=False)
    tokenizer = load_tokenizer()
    prompts = [r["prompt"] for r in read_jsonl(default_path("prompts_test"), "prompts")][:N_GOLD]
    sft_eval = evaluate_policy(load_gpt(root / "sft", tokenizer=tokenizer), tokenizer, prompts,
                               get_task().gold_reward, generator=step_generator(0, -1))
    return root / "sft", root / "prefs" / "rankings.jsonl", sft_eval


@pytest.fixture(scope="module")
def dpo_run(pipeline, tmp_path_factory):
    sft_dir, pairs, _ = pipeline
    out = tmp_path_factory.mktemp("dpo_run")
    return out, train_dpo(apply_overrides(DPOConfig(), DPO_SMALL), sft_dir, pairs, out, progress=False)


# ---------------------------------------------------------------------------
# Hand-computed values

@pytest.mark.parametrize("loss_type, expected", [("sigmoid", math.log(2)), ("robust", math.log(2)),
                                                 ("hinge", 1.0), ("ipo", (1 / (2 * 0.5)) ** 2)])
def test_training_batch_at_initialisation(pipeline, loss_type, expected):
    """Policy = reference: h = 0 in every pair, so the loss is its value at 0 and all rewards are 0."""
    sft_dir, pairs, _ = pipeline
    tokenizer = load_tokenizer()
    config = apply_overrides(DPOConfig(), {"beta": 0.5, "loss_type": loss_type, "nll_coef": 0.0})   # the loss alone
    reference, policy = load_gpt(sft_dir, tokenizer=tokenizer), load_gpt(sft_dir, tokenizer=tokenizer)
    prefs = load_pair_sequences(pairs, tokenizer, reference, config, "cpu")
    loss, metrics = dpo_batch_loss(policy, prefs, torch.arange(0, 64, 3), config, tokenizer.eot_token, "cpu")
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-4), f"{key} at initialisation"
    assert metrics["logps/chosen"] < 0 and metrics["logps/rejected"] < 0


def test_nll_term_adds_the_per_token_nll_of_each_pairs_chosen_response(pipeline):
    """RPO: loss = DPO loss + α · mean over pairs of −log π(y_w|x) / |y_w|, checked against a loop
    that scores each pair's chosen response on its own."""
    sft_dir, pairs, _ = pipeline
    tokenizer = load_tokenizer()
    reference = load_gpt(sft_dir, tokenizer=tokenizer)
    prefs = load_pair_sequences(pairs, tokenizer, reference, DPOConfig(), "cpu")
    ids = torch.arange(0, 30, 2)
    plain, _ = dpo_batch_loss(reference, prefs, ids, apply_overrides(DPOConfig(), {"nll_coef": 0.0}),
                              tokenizer.eot_token, "cpu")
    assert DPOConfig().nll_coef == 0.5                                        # the kit's default is RPO
    with_nll, metrics = dpo_batch_loss(reference, prefs, ids, DPOConfig(), tokenizer.eot_token, "cpu")
    per_token = []
    for n in ids.tolist():
        tokens, mask, response = completion_batch([prefs.sequences[prefs.pairs[n, 0]]], tokenizer.eot_token)
        per_token.append(-sequence_logprobs(reference, tokens, mask, response).item() / response.sum().item())
    nll = sum(per_token) / len(per_token)
    assert metrics["loss/nll_chosen"] == pytest.approx(nll, rel=1e-4), "the NLL term, against a per-pair loop"
    assert with_nll.item() == pytest.approx(plain.item() + 0.5 * nll, rel=1e-4), "loss = DPO + α·NLL"


def test_best_of_n_kl_formula():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl_bound(16) == pytest.approx(2.7726 - 0.9375, abs=1e-4)


# ---------------------------------------------------------------------------
# Properties and references

def test_deduplicated_reference_logps_equal_per_pair_ones(pipeline):
    """Each distinct sequence is scored once, in length-sorted batches; the naive way scores
    every pair's chosen and rejected response on its own. Both must agree."""
    sft_dir, pairs, _ = pipeline
    tokenizer = load_tokenizer()
    reference = load_gpt(sft_dir, tokenizer=tokenizer)
    prefs = load_pair_sequences(pairs, tokenizer, reference, DPOConfig(), "cpu")
    records = read_jsonl(pairs.with_name("pairs.jsonl"), "pairs")       # collect's pairs of the same rankings
    assert len(prefs.pairs) == len(records) and len(prefs.sequences) < 2 * len(records)
    # the groups partition the pairs; a ranking of K = 4 gives a group of 6 pairs over 4 sequences
    assert sorted(torch.cat(prefs.groups).tolist()) == list(range(len(records)))
    assert collections.Counter(len(g) for g in prefs.groups) == {6: len(read_jsonl(pairs, "rankings"))}
    assert all(len(torch.unique(prefs.pairs[g])) <= 4 for g in prefs.groups if len(g) == 6)   # ties: fewer
    for n in (0, 7, len(records) - 1):
        for column in (0, 1):
            example = prefs.sequences[prefs.pairs[n, column]]
            naive = sequence_logprobs(reference, *completion_batch([example], tokenizer.eot_token))   # (1,)
            assert prefs.ref_logps[prefs.pairs[n, column]].item() == pytest.approx(naive.item(), abs=1e-4)
        chosen_ids = prefs.sequences[prefs.pairs[n, 0]][0]
        assert tokenizer.decode(chosen_ids[:-1]) == records[n]["prompt"] + records[n]["chosen"]


def test_reference_scores_depend_on_the_sequences_not_on_their_order_and_are_remembered(pipeline, monkeypatch):
    """log π_ref of a sequence is the same to the last bit whatever order (or file) it comes in,
    so a second scoring of the same sequences by the same weights can be served from memory, and
    is; other weights are scored afresh."""
    from minirlhf import preferences
    sft_dir, pairs, _ = pipeline
    tokenizer = load_tokenizer()
    reference = load_gpt(sft_dir, tokenizer=tokenizer)
    sequences = load_pair_sequences(pairs, tokenizer, reference, DPOConfig(), "cpu", with_reference=False).sequences
    preferences._REFERENCE_SCORES.clear()
    first = preferences.logps_of_sequences(reference, sequences, tokenizer.eot_token, "cpu", batch_size=64)
    shuffled = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(0)).tolist()
    calls = []
    real = preferences.by_length_in_chunks
    monkeypatch.setattr(preferences, "by_length_in_chunks", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = preferences.logps_of_sequences(reference, [sequences[i] for i in shuffled], tokenizer.eot_token, "cpu",
                                           batch_size=64)
    assert calls == [], "the same sequences under the same weights were scored again"
    assert torch.equal(again, first[shuffled]), "each sequence keeps its own score, in the caller's order"
    again[0] = 123.0                                                       # the caller's copy, not the memory's
    reloaded = load_gpt(sft_dir, tokenizer=tokenizer)                      # another load of the same checkpoint
    assert torch.equal(preferences.logps_of_sequences(reloaded, sequences, tokenizer.eot_token, "cpu", batch_size=64),
                       first) and calls == []
    preferences._REFERENCE_SCORES.clear()                                  # scored afresh in another order:
    fresh = preferences.logps_of_sequences(reference, [sequences[i] for i in shuffled], tokenizer.eot_token, "cpu",
                                           batch_size=64)
    assert calls == [1] and torch.equal(fresh, first[shuffled]), "bit-identical without the memory too"
    with torch.no_grad():
        reloaded.lm_head.weight.mul_(1.01)                                # other weights: other numbers
    other = preferences.logps_of_sequences(reloaded, sequences, tokenizer.eot_token, "cpu", batch_size=64)
    assert calls == [1, 1] and not torch.allclose(other, first)


def test_best_of_one_is_sft_sampling(pipeline, tmp_path):
    """N = 1 keeps the only sample: the summary equals evaluate_policy's on the SFT model, KL 0.
    The ranker is an untrained reward-model folder, which exercises loading it."""
    sft_dir, _, sft_eval = pipeline
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    sft = load_gpt(sft_dir)
    save_model(ScalarHeadModel.from_gpt(sft), rm_dir)
    write_json(rm_dir / "config.json", {"model": json.loads((sft_dir / "config.json").read_text())["model"]})
    config = apply_overrides(BestOfNConfig(), {"n": 1, "n_eval_samples": N_GOLD})
    summary = run_best_of_n(config, sft_dir, rm_dir, tmp_path / "bon", progress=False)
    for key in ("eval/gold_reward", "eval/length", "eval/eos_rate"):
        assert summary[key] == sft_eval[key], f"{key} differs from SFT sampling"
    assert summary["eval/kl"] == 0.0 and summary["eval/kl_is_analytic_bound"] is True
    assert "eval/proxy_reward" in summary


def test_interrupted_run_resumes_to_the_same_weights(pipeline, tmp_path, monkeypatch):
    sft_dir, pairs, _ = pipeline
    config = apply_overrides(DPOConfig(), QUICK)
    train_dpo(config, sft_dir, pairs, tmp_path / "straight", progress=False)

    class StopAfterThreeSteps(harness.GracefulStop):
        checks = 0

        @property
        def requested(self):
            StopAfterThreeSteps.checks += 1
            return StopAfterThreeSteps.checks == 3

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(harness, "GracefulStop", StopAfterThreeSteps)
    with pytest.raises(harness.Interrupted):
        train_dpo(config, sft_dir, pairs, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    train_dpo(config, sft_dir, pairs, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = (load_gpt(tmp_path / name).state_dict() for name in ("straight", "resumed"))
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


# ---------------------------------------------------------------------------
# Smoke runs

def test_dpo_raises_the_margin_and_the_gold_reward(pipeline, dpo_run):
    _, _, sft_eval = pipeline
    out, summary = dpo_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss/dpo"] > rows[-1]["loss/dpo"]
    assert min(r["rewards/margins"] for r in rows[-3:]) > max(rows[0]["rewards/margins"], 0.0)
    assert summary["eval/margins"] > 0 and summary["eval/reward_accuracy"] > 0.55
    # 256 samples each: the standard error of either mean is about 0.02
    assert summary["eval/gold_reward"] > sft_eval["eval/gold_reward"] + 0.06
    assert 0 < summary["eval/kl"] < 10
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.pt", "loss.png", "logps_and_margins.png"):
        assert (out / name).exists(), f"{name} missing"
    assert not (out / "checkpoint.pt").exists()
    assert load_gpt(out).config == load_gpt(pipeline[0]).config


@pytest.mark.parametrize("overrides", [{"loss_type": "ipo"}, {"label_smoothing": 0.1}, PLAIN_DPO],
                         ids=["ipo", "cdpo", "plain-dpo"])
def test_variants_run_end_to_end(pipeline, tmp_path, overrides):
    sft_dir, pairs, _ = pipeline
    summary = train_dpo(apply_overrides(DPOConfig(), {**QUICK, **overrides}), sft_dir, pairs, tmp_path, progress=False)
    for key in ("eval/gold_reward", "eval/kl", "eval/reward_accuracy", "eval/samples", "train/seconds"):
        assert key in summary, f"{key} missing from summary"
    assert math.isfinite(summary["eval/loss"])


def test_oracle_best_of_n_improves_the_gold_reward(pipeline, tmp_path):
    sft_dir, _, sft_eval = pipeline
    config = apply_overrides(BestOfNConfig(), {"n": 4, "ranker": "gold", "n_eval_samples": 64})
    summary = run_best_of_n(config, sft_dir, None, tmp_path, progress=False)
    assert summary["eval/gold_reward"] > summary["bon/gold_reward_all_samples"] + 0.05
    assert summary["eval/gold_reward"] > sft_eval["eval/gold_reward"]
    assert summary["eval/kl"] == pytest.approx(math.log(4) - 0.75)


def test_preferred_ft_loss_is_sft_on_the_chosen_row_of_every_pair(pipeline):
    """Reference: copy the chosen sequence of each pair into its own row and take the plain SFT loss."""
    sft_dir, pairs, _ = pipeline
    tokenizer = load_tokenizer()
    model = load_gpt(sft_dir, tokenizer=tokenizer)
    config = PreferredFTConfig()
    prefs = load_pair_sequences(pairs, tokenizer, model, config, "cpu", with_reference=False)
    ids = torch.arange(0, 24)                          # 4 rankings of K=4: a completion wins 0 to 3 pairs
    loss, metrics = preferred_ft_batch_loss(model, prefs, ids, config, tokenizer.eot_token, "cpu")
    chosen = [prefs.sequences[int(i)] for i in prefs.pairs[ids, 0]]
    inputs, input_mask, targets, loss_mask = shift_for_loss(*completion_batch(chosen, tokenizer.eot_token))
    expected, expected_metrics = sft_loss(model(inputs, input_mask), targets, loss_mask)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["sft/tokens"] == expected_metrics["sft/tokens"]


def test_preferred_ft_raises_the_chosen_logprobs(pipeline, tmp_path):
    sft_dir, pairs, _ = pipeline
    config = apply_overrides(PreferredFTConfig(), {"n_eval_samples": 16, "log_every": 10})   # the pft command's 40 steps
    summary = train_preferred_ft(config, sft_dir, pairs, tmp_path, progress=False)
    # judged on one fixed set of training pairs (the logged values are means over random batches)
    tokenizer = load_tokenizer()
    sft_model = load_gpt(sft_dir, tokenizer=tokenizer)
    prefs = load_pair_sequences(pairs, tokenizer, sft_model, config, "cpu", with_reference=False)
    ids = torch.arange(min(200, len(prefs.pairs)))
    trained = load_gpt(tmp_path, tokenizer=tokenizer)
    loss_before, before = preferred_ft_batch_loss(sft_model, prefs, ids, config, tokenizer.eot_token, "cpu")
    loss_after, after = preferred_ft_batch_loss(trained, prefs, ids, config, tokenizer.eot_token, "cpu")
    assert loss_after.item() < loss_before.item() - 0.005    # the chosen texts are SFT samples: a small gain
    assert after["logps/chosen"] > before["logps/chosen"]
    assert "eval/reward_accuracy" in summary and "eval/kl" in summary
    assert json.loads((tmp_path / "config.json").read_text())["stage"] == "preferred_ft"


def test_cli(pipeline, tmp_path, capsys):
    sft_dir, pairs, _ = pipeline
    assert main(["bon", "--sft", str(sft_dir), "--out", str(tmp_path / "bon"), "--quiet",
                 "--set", "ranker=gold", "n=2", "n_eval_samples=4"]) == 0
    assert json.loads((tmp_path / "bon" / "summary.json").read_text())["bon/n"] == 2
    assert main(["bon", "--sft", str(sft_dir), "--out", str(tmp_path / "no_rm"), "--quiet"]) == 2
    assert main(["dpo", "--sft", str(sft_dir), "--prefs", str(pairs), "--out", str(tmp_path / "bad"),
                 "--set", "loss_type=hinge", "label_smoothing=0.1"]) == 2
    assert "label_smoothing applies" in capsys.readouterr().err
