"""The `reviews` toy task: the gold judge on hand-written reviews, the grammar, and data/.

Checks that the judge orders sentiment correctly (positive > neutral > negative), that
context matters ("not good" < "good", "X but Y" weighs Y), that degenerate text scores
low, that every demonstration is fluent, and that `python -m minirlhf data` regenerates
data/ byte-identically.
"""
import filecmp
import random

import pytest

from minirlhf.tasks import get_task, reviews


def gold(text):
    return reviews.judge(text)["gold"]


def test_positive_beats_neutral_beats_negative():
    assert gold("the movie was great . i would recommend it .") > gold("the movie was okay .") > gold(
        "the movie was awful . i would not recommend it .")


def test_negation_depends_on_context():
    assert gold("the plot was not good .") < 0.5 < gold("the plot was good .")
    assert gold("the plot was not bad .") > 0.5 > gold("the plot was bad .")
    # "not great" is negative but weaker than "terrible"
    assert gold("the plot was terrible .") < gold("the plot was not great .") < 0.5


def test_intensifiers_scale_polarity():
    assert gold("the music was very good .") > gold("the music was good .") > gold("the music was somewhat good .")


def test_but_weighs_the_second_clause():
    assert gold("the plot was bad but the music was great .") > 0.5
    assert gold("the plot was great but the music was bad .") <= 0.5


def test_degenerate_text_scores_low():
    assert gold("great great great great") == 0.0
    assert gold("the movie was great great .") < 0.25                 # does not parse
    repeated = "the movie was great . the movie was great . the movie was great ."
    assert gold(repeated) < 0.5 * gold("the movie was great .")
    assert gold("the movie was great . i would") < 0.35               # stops mid-sentence
    rambling = " ".join(f"the {n} was great ." for n in reviews.NOUNS[:8])
    assert reviews.judge(rambling)["fluency"] < 0.2                   # far more sentences than a review has


def test_judge_is_in_unit_interval_and_reports_reasons():
    details = reviews.judge("the acting was not very good . i did not like the ending")
    assert 0.0 <= details["gold"] <= 1.0
    assert details["unfinished"] and details["sentences"] == 1 and details["unparseable"] == 0
    assert details["p_positive"] < 0.5


def test_every_demonstration_is_fluent_and_mixed():
    rng = random.Random(1)
    judged = [reviews.judge(reviews.sample_review(rng)) for _ in range(500)]
    assert all(j["fluency"] == 1.0 for j in judged)
    positive = sum(j["p_positive"] > 0.5 for j in judged) / len(judged)
    assert 0.3 < positive < 0.7


def test_prompt_is_a_prefix_of_the_review():
    rng = random.Random(2)
    review = reviews.sample_review(rng)
    prompt, completion = reviews.split_prompt(review, rng)
    assert prompt + completion == review and 2 <= len(prompt.split()) <= 4


def test_data_regenerates_byte_identically(tmp_path):
    from minirlhf.data import DATA_DIR
    paths = reviews.write_datasets(tmp_path, seed=0)
    for name, path in paths.items():
        assert filecmp.cmp(path, DATA_DIR / f"{name}.jsonl", shallow=False), f"{name}"


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="reviews"):
        get_task("poetry")
