"""The `reviews` toy task: the gold judge on hand-written reviews, the grammar, and data/.

Checks that the judge orders sentiment correctly (positive > neutral > negative), that
context matters ("not good" < "good", "X but Y" weighs Y), that degenerate text scores
low, that every demonstration is fluent, and that `python -m minirlhf data` regenerates
data/ byte-identically. Choosing a task: `data --task arithmetic` writes the shipped files byte
for byte (and leaves the tokenizer alone), a task's stage defaults sit between the stage's
defaults and --set, a folder of another task is refused, and an unknown --task lists the
valid ones (exit 2, nothing written).
"""
import filecmp
import random

import pytest

from minirlhf.tasks import arithmetic, get_task, reviews


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


def test_data_task_arithmetic_writes_the_shipped_files(tmp_path, capsys):
    from minirlhf.__main__ import main
    from minirlhf.data import DATA_DIR
    tokenizer = (DATA_DIR / "tokenizer.tiktoken").stat().st_mtime_ns
    assert main(["data", "--task", "arithmetic", "--out", str(tmp_path)]) == 0
    written = sorted((tmp_path / "arithmetic").iterdir())
    assert [p.name for p in written] == sorted(f"{name}.jsonl" for name in arithmetic.SPLITS)
    for path in written:
        assert filecmp.cmp(path, DATA_DIR / "arithmetic" / path.name, shallow=False), path.name
    assert (DATA_DIR / "tokenizer.tiktoken").stat().st_mtime_ns == tokenizer, "the tokenizer is the reviews'"
    assert main(["data", "--task", "arithmetic", "--out", str(tmp_path / "s1"), "--seed", "1"]) == 0
    assert not filecmp.cmp(tmp_path / "s1/arithmetic/sft_train.jsonl", written[2], shallow=False)


def test_task_defaults_sit_between_the_stage_defaults_and_set():
    from minirlhf.grpo import FAST, GRPOConfig
    from minirlhf.tasks import task_config
    config = task_config(GRPOConfig(), "grpo", "arithmetic", overrides=[["lr=1e-4"]])
    assert (config.task, config.reward, config.max_new_tokens, config.group_size, config.lr) == (
        "arithmetic", "gold", 6, 8, 1e-4)
    assert config.prompts.endswith("arithmetic/prompts_train.jsonl")
    assert config.val_data.endswith("arithmetic/sft_val.jsonl"), "eval/ptx_loss reads the task's own demonstrations"
    fast = task_config(GRPOConfig(), "grpo", "arithmetic", fast=True, stage_fast=FAST)
    assert (fast.iterations, fast.lr) == (4, 2e-4), "the task's --fast comes after the stage's"
    assert task_config(GRPOConfig(), "grpo", "reviews") == GRPOConfig(), "reviews: the stage's own defaults"


def test_a_folder_of_another_task_is_refused(tmp_path):
    from minirlhf.config import ConfigError
    from minirlhf.files import write_json
    from minirlhf.runs import check_same_task
    for task in ("reviews", "arithmetic"):
        (tmp_path / task).mkdir()
        write_json(tmp_path / task / "config.json", {"task": task})
    check_same_task("arithmetic_lenient", sft=tmp_path / "arithmetic")   # the same data: allowed
    with pytest.raises(ConfigError, match=f"{tmp_path / 'reviews'} was trained on task reviews; "
                                          "this command asks for arithmetic"):
        check_same_task("arithmetic", sft=tmp_path / "arithmetic", rm=tmp_path / "reviews")


@pytest.mark.parametrize("command", [["sft"], ["grpo", "--sft", "x"], ["run"], ["data"]])
def test_unknown_task_on_the_command_line_lists_the_valid_ones(command, tmp_path, capsys):
    from minirlhf.__main__ import main
    assert main([*command, "--task", "poetry", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "unknown task 'poetry'" in error and "reviews, arithmetic" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_arithmetic_defaults_are_the_settings_of_the_measured_runs():
    """docs/rlvr.md's numbers were run with these fields spelled out by --set; --task gives the same."""
    from minirlhf.config import apply_overrides
    from minirlhf.data import DATA_DIR
    from minirlhf.grpo import GRPOConfig
    from minirlhf.sft import SFTConfig
    from minirlhf.tasks import task_config
    d = DATA_DIR / "arithmetic"
    lengths = dict(task="arithmetic", max_prompt_tokens=8, max_new_tokens=6, n_eval_samples=500)
    sft = dict(data=f"{d}/sft_train.jsonl", val_data=f"{d}/sft_val.jsonl", test_prompts=f"{d}/prompts_test.jsonl",
               block_size=16, n_embd=128, n_head=4, steps=500, eval_every=100, lr=3e-3, **lengths)
    assert task_config(SFTConfig(), "sft", "arithmetic") == apply_overrides(SFTConfig(), sft)
    grpo = dict(reward="gold", prompts=f"{d}/prompts_train.jsonl", test_prompts=f"{d}/prompts_test.jsonl",
                val_data=f"{d}/sft_val.jsonl", group_size=8, rollout_batch=256, minibatch_size=64, epochs=1, lr=2e-4,
                iterations=200, eval_every=25, n_periodic_eval=200, **lengths)
    assert task_config(GRPOConfig(), "grpo", "arithmetic") == apply_overrides(GRPOConfig(), grpo)
