"""Tests for minirlhf.collect: the simulated labeler and the preference files it writes.

What is checked:
  - hand examples: a zero-temperature labeler sorts by gold score (ties keep their order);
    the C(K,2) pairs of a ranking; label agreement counted by hand;
  - properties against the model's formulas, by Monte Carlo: for K = 2 the Plackett-Luce
    sampler picks the first item with probability σ((g1 − g2)/τ) (Bradley-Terry), and for
    K = 3 the item ranked first follows softmax(g/τ);
  - a tiny collect run (a tiny SFT model trained here): with τ = 0 every label agrees with
    the gold judge (labels/agreement == 1), the files hold what the summary says, each
    pairs file is exactly the pairs of its rankings file;
  - relabel: the same completions and split ranked again; τ = 0 restores perfect labels on a
    noisy collection, a large τ makes them near coin flips; a folder without rankings is refused.
"""
import math

import pytest
import torch

from helpers import tiny_sft_dir
from minirlhf.collect import CollectConfig, collect, label_agreement, plackett_luce_ranking, relabel
from minirlhf.data import DataError
from minirlhf.config import apply_overrides
from minirlhf.data import read_jsonl
from minirlhf.preferences import pairs_of_ranking
from minirlhf.tasks import get_task


# ---------------------------------------------------------------------------
# Hand examples


def test_zero_temperature_labeler_sorts_by_gold():
    rng = torch.Generator().manual_seed(0)
    assert plackett_luce_ranking([0.2, 0.9, 0.5], 0.0, rng) == [1, 2, 0]
    assert plackett_luce_ranking([0.5, 0.7, 0.5, 0.1], 0.0, rng) == [1, 0, 2, 3]  # tie: original order


def test_pairs_of_ranking_lists_every_pair_best_first():
    pairs = pairs_of_ranking("p", ["a", "b", "c"])
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert all(r["prompt"] == "p" for r in pairs)
    assert len(pairs_of_ranking("p", list("abcd"))) == math.comb(4, 2) == 6


def test_label_agreement_by_hand():
    # gold scores in the labeler's order: [0.9, 0.5, 0.7] orders 2 of 3 pairs as gold does
    assert label_agreement([[0.9, 0.5, 0.7]]) == pytest.approx(2 / 3)
    assert label_agreement([[0.9, 0.5], [0.3, 0.3], [0.2, 0.8]]) == pytest.approx(1 / 2)  # the tie is skipped
    assert math.isnan(label_agreement([[0.4, 0.4]]))


# ---------------------------------------------------------------------------
# Properties: Plackett-Luce frequencies by Monte Carlo


def test_plackett_luce_for_two_items_is_bradley_terry():
    g1, g2, tau, n = 0.6, 0.5, 0.1, 20_000
    rng = torch.Generator().manual_seed(1)
    first = sum(plackett_luce_ranking([g1, g2], tau, rng)[0] == 0 for _ in range(n)) / n
    expected = 1 / (1 + math.exp(-(g1 - g2) / tau))          # σ(1) = 0.731
    assert first == pytest.approx(expected, abs=0.015)        # 4.5 standard errors (0.0031)


def test_plackett_luce_first_place_follows_softmax():
    golds, tau, n = [0.1, 0.3, 0.2], 0.2, 20_000
    rng = torch.Generator().manual_seed(2)
    counts = [0, 0, 0]
    for _ in range(n):
        counts[plackett_luce_ranking(golds, tau, rng)[0]] += 1
    expected = torch.softmax(torch.tensor(golds) / tau, dim=0).tolist()
    for observed, p in zip(counts, expected):
        assert observed / n == pytest.approx(p, abs=0.015)


# ---------------------------------------------------------------------------
# A tiny collect run with a perfect (τ = 0) labeler


@pytest.fixture(scope="module")
def perfect_labels(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefs")   # the session's tiny SFT model: any sampler will do here
    config = apply_overrides(CollectConfig(), dict(n_prompts=40, k=3, labeler_temperature=0.0))
    return out, config, collect(config, tiny_sft_dir(), out, progress=False)


def test_zero_temperature_labels_agree_with_gold(perfect_labels):
    out, config, summary = perfect_labels
    assert summary["labels/agreement"] == 1.0
    assert summary["labels/agreement_test"] == 1.0
    gold = get_task(config.task).gold_reward
    for record in read_jsonl(out / "rankings.jsonl", "rankings"):
        scores = gold([record["prompt"] + c for c in record["completions"]])
        assert scores == sorted(scores, reverse=True)           # best -> worst by gold


def test_files_match_the_summary_and_each_other(perfect_labels):
    out, config, summary = perfect_labels
    train = read_jsonl(out / "rankings.jsonl", "rankings")
    test = read_jsonl(out / "rankings_test.jsonl", "rankings")
    assert (len(train), len(test)) == (summary["labels/train_rankings"], summary["labels/test_rankings"]) == (36, 4)
    assert all(len(r["completions"]) == config.k for r in train + test)
    for name, rankings in (("pairs", train), ("pairs_test", test)):
        expected = [p for r in rankings for p in pairs_of_ranking(r["prompt"], r["completions"])]
        assert read_jsonl(out / f"{name}.jsonl", "pairs") == expected
    assert len(read_jsonl(out / "pairs.jsonl", "pairs")) == summary["labels/train_pairs"] == 36 * 3


# ---------------------------------------------------------------------------
# relabel: the same completions, another labeler


def completions_by_prompt(folder, name):
    return {r["prompt"]: sorted(r["completions"]) for r in read_jsonl(folder / f"{name}.jsonl", "rankings")}


def test_relabel_keeps_the_samples_and_the_split_and_changes_only_the_order(tmp_path):
    noisy_config = apply_overrides(CollectConfig(), dict(n_prompts=40, k=3, labeler_temperature=10.0))
    noisy = collect(noisy_config, tiny_sft_dir(), tmp_path / "noisy", progress=False)
    assert noisy["labels/agreement"] < 0.8                      # τ = 10: near coin flips (0.5)
    exact = relabel(apply_overrides(noisy_config, {"labeler_temperature": 0.0}), tmp_path / "noisy",
                    tmp_path / "exact", progress=False)
    assert exact["labels/agreement"] == exact["labels/agreement_test"] == 1.0
    for key in ("labels/train_rankings", "labels/test_rankings", "labels/train_pairs", "labels/mean_gold",
                "labels/identical_completions"):
        assert exact[key] == pytest.approx(noisy[key]), key
    gold = get_task().gold_reward
    for name in ("rankings", "rankings_test"):
        assert completions_by_prompt(tmp_path / "exact", name) == completions_by_prompt(tmp_path / "noisy", name)
        for record in read_jsonl(tmp_path / "exact" / f"{name}.jsonl", "rankings"):
            scores = gold([record["prompt"] + c for c in record["completions"]])
            assert scores == sorted(scores, reverse=True)
        rankings = read_jsonl(tmp_path / "exact" / f"{name}.jsonl", "rankings")
        expected = [p for r in rankings for p in pairs_of_ranking(r["prompt"], r["completions"])]
        assert read_jsonl(tmp_path / "exact" / f"{name.replace('rankings', 'pairs')}.jsonl", "pairs") == expected
    again = relabel(noisy_config, tmp_path / "exact", tmp_path / "noisy_again", progress=False)
    assert again["labels/agreement"] < 0.8                      # and back to noise
    assert (tmp_path / "exact" / "summary.json").exists()       # a finished run folder, like collect's


def test_relabel_refuses_a_folder_without_rankings(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="rankings_test.jsonl: no such file"):
        relabel(CollectConfig(), tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()                      # refused before anything is written
