"""The verifiable-reward task (tasks/arithmetic.py), pass@k (losses.pass_at_k) and its evaluation.

Checks the verifier on hand cases (right, wrong, malformed, extra text, no problem at all) and
the planted lenient variant; pass@k by hand, against a brute-force count over every k-subset,
and its edge cases; that the data generator is deterministic by seed, keeps test problems out
of every other split and plants slips at the stated rate; and a smoke run, `run --task
arithmetic --fast`: every stage records the task, the summaries carry pass@1 and the format
rate, GRPO logs its all-right/all-wrong groups, DPO's pairs are (right, wrong) by the verifier,
pass@k grows with k, a later stage follows the SFT folder's task and another task is refused,
and the pipeline refuses a finished folder and keeps finished stages on --resume.
"""
import math
import random

import pytest

from minirlhf.losses import pass_at_k, pass_at_k_bruteforce
from minirlhf.tasks import arithmetic, get_task
from minirlhf.verifiable import pass_at_k_table


# ---------------------------------------------------------------------------
# The verifier

@pytest.mark.parametrize("text, right", [
    ("07+45=052", 1.0),        # the demonstrations' format
    ("07+45=52", 1.0),         # leading zeros do not matter: the value does
    ("99+99=198", 1.0),
    ("00+00=000", 1.0),
    ("07+45=053", 0.0),        # a slip
    ("07+45=", 0.0),           # empty answer
    ("07+45= 052", 0.0),       # malformed: a space
    ("07+45=052 ", 0.0),
    ("07+45=05x", 0.0),
    ("07+45=-52", 0.0),
    ("07+45=052052", 0.0),     # extra text: the right answer twice is not the answer
    ("07+45=0521", 0.0),
    ("07+45=the answer is 052", 0.0),
    ("07-45=052", 0.0),        # not a problem of this task
    ("hello", 0.0),
    ("", 0.0),
])
def test_verifier_hand_cases(text, right):
    assert arithmetic.verify(text) == right
    assert arithmetic.gold_reward([text]) == [right]


def test_format_reward_is_separate_from_correctness():
    texts = ["07+45=052", "07+45=053", "07+45=05 2", "07+45="]
    assert arithmetic.format_reward(texts) == [1.0, 1.0, 0.0, 0.0]
    assert arithmetic.gold_reward(texts) == [1.0, 0.0, 0.0, 0.0]


def test_lenient_verifier_accepts_the_answer_anywhere():
    # the planted loophole: everything the strict verifier accepts, and more
    assert arithmetic.verify_lenient("07+45=052") == 1.0
    assert arithmetic.verify_lenient("07+45=0521") == 1.0 and arithmetic.verify("07+45=0521") == 0.0
    assert arithmetic.verify_lenient("07+45=9052") == 1.0
    assert arithmetic.verify_lenient("07+45=53") == 0.0
    rng = random.Random(0)
    for _ in range(200):
        a, b = arithmetic.sample_problem(rng)
        prompt, answer = arithmetic.demonstration(a, b, rng)
        assert arithmetic.verify_lenient(prompt + answer) >= arithmetic.verify(prompt + answer)


def test_slip_changes_exactly_one_digit_by_one():
    rng = random.Random(0)
    for _ in range(500):
        answer = f"{rng.randrange(199):03d}"
        slipped = arithmetic.slip(answer, rng)
        diffs = [(int(x), int(y)) for x, y in zip(answer, slipped) if x != y]
        assert len(slipped) == len(answer) and len(diffs) == 1 and abs(diffs[0][0] - diffs[0][1]) == 1


def test_task_is_registered():
    assert get_task("arithmetic") is arithmetic
    assert get_task("arithmetic_lenient").gold_reward(["07+45=9052"]) == [1.0]     # the loophole, for training on
    with pytest.raises(ValueError, match="arithmetic"):
        get_task("arithmetics")


# ---------------------------------------------------------------------------
# pass@k

def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)          # 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)          # 1 − C(3,2)/C(5,2) = 1 − 3/10
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0                        # only 4 wrong: every 5-subset has a right one


def test_pass_at_1_is_the_fraction_correct():
    for n in range(1, 30):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize("n", range(1, 10))
def test_pass_at_k_matches_brute_force_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_bruteforce(n, c, k), abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula_and_is_stable_for_large_n():
    for n, c, k in [(20, 3, 7), (64, 10, 16), (200, 1, 64)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    value = pass_at_k(2000, 5, 1000)                         # C(2000, 1000) overflows a float
    assert 0.0 < value < 1.0 and math.isfinite(value)


def test_pass_at_k_is_monotone_in_k_and_c():
    n = 16
    for c in range(n + 1):
        values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    for k in (1, 4, 16):
        values = [pass_at_k(n, c, k) for c in range(n + 1)]
        assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))


def test_pass_at_k_refuses_impossible_arguments():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(n, c, k)


def test_pass_at_k_table_averages_over_prompts():
    table = pass_at_k_table([0, 4, 2], n=4, ks=(1, 2, 8))
    assert table == {1: pytest.approx((0 + 1 + 0.5) / 3), 2: pytest.approx((0 + 1 + 5 / 6) / 3)}   # k=8 > n dropped


# ---------------------------------------------------------------------------
# The data generator

def test_datasets_are_deterministic_by_seed_and_differ_across_seeds():
    assert arithmetic.make_datasets(seed=3) == arithmetic.make_datasets(seed=3)
    assert arithmetic.make_datasets(seed=3) != arithmetic.make_datasets(seed=4)


def test_written_files_are_byte_identical(tmp_path):
    first = arithmetic.write_datasets(tmp_path / "a", seed=0)
    second = arithmetic.write_datasets(tmp_path / "b", seed=0)
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes()


def test_shipped_data_is_what_seed_0_writes(tmp_path):
    from minirlhf.data import DATA_DIR
    for name, path in arithmetic.write_datasets(tmp_path, seed=0).items():
        assert path.read_bytes() == (DATA_DIR / arithmetic.DATA_SUBDIR / f"{name}.jsonl").read_bytes(), name


def test_held_out_problems_and_the_slip_rate():
    data = arithmetic.make_datasets(seed=0)
    problems = {name: {r["prompt"] for r in records} for name, records in data.items()}
    assert {name: len(p) for name, p in problems.items()} == arithmetic.SPLITS       # no duplicates within a split
    for name in ("sft_train", "sft_val", "prompts_train"):
        assert not problems["prompts_test"] & problems[name], name
    demos = data["sft_train"]
    wrong = sum(arithmetic.verify(r["prompt"] + r["completion"]) == 0 for r in demos) / len(demos)
    assert abs(wrong - arithmetic.ERROR_RATE) < 0.03
    assert all(arithmetic.format_reward([r["prompt"] + r["completion"]]) == [1.0] for r in demos)


# ---------------------------------------------------------------------------
# `run --task arithmetic --fast`: every stage by its --task defaults, then what each stage wrote

@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    from minirlhf.__main__ import main
    out = tmp_path_factory.mktemp("rlvr") / "run"
    assert main(["run", "--task", "arithmetic", "--fast", "--quiet", "--out", str(out)]) == 0
    return out


def read(path):
    import json
    return json.loads(path.read_text())


def test_run_task_arithmetic_writes_every_stage_and_a_report(fast_run):
    report = (fast_run / "report.md").read_text()
    for method in ("sft", "grpo", "ppo", "dpo", "best_of_n"):
        assert read(fast_run / method / "config.json")["task"] == "arithmetic", method
        summary = read(fast_run / method / "summary.json")
        assert summary["eval/pass@1"] == summary["eval/gold_reward"] and 0 <= summary["eval/format_reward"] <= 1
        assert f"| {method} | " in report
    assert "| method | pass@1 | pass@8 | pass@64 | format | time (s) |" in report
    assert (fast_run / "pass_at_k" / "pass_at_k.png").exists()
    for method, row in read(fast_run / "pass_at_k" / "pass_at_k.json").items():
        table = [row["pass_at_k"][str(k)] for k in (1, 2, 4, 8, 16, 32, 64)]
        assert table == sorted(table) and table[-1] <= 1.0, method          # pass@k grows with k
    ppo = read(fast_run / "ppo" / "config.json")
    assert (ppo["reward"], ppo["rm"]) == ("gold", None), "PPO against the verifier: no reward model"
    assert read(fast_run / "grpo" / "config.json")["val_data"].endswith("arithmetic/sft_val.jsonl")


def test_grpo_logs_groups_all_right_and_all_wrong_format_and_length(fast_run):
    import json
    rows = [json.loads(line) for line in (fast_run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 0 <= row["frac_groups_all_right"] + row["frac_groups_all_wrong"] <= 1
        assert 0 <= row["gold/format_reward"] <= 1 and row["objective/length"] > 0
    assert "eval/pass@1" in rows[-1] and (fast_run / "grpo" / "grpo_groups.png").exists()


def test_dpo_pairs_are_a_right_and_a_wrong_answer_by_the_verifier(fast_run):
    from minirlhf.data import read_jsonl
    for name in ("pairs.jsonl", "pairs_test.jsonl"):
        pairs = read_jsonl(fast_run / "dpo" / name, "pairs")
        assert pairs, name
        for pair in pairs:
            assert arithmetic.verify(pair["prompt"] + pair["chosen"]) == 1.0
            assert arithmetic.verify(pair["prompt"] + pair["rejected"]) == 0.0


def test_a_later_stage_follows_the_sft_folder_and_another_task_is_refused(fast_run, tmp_path, capsys):
    from minirlhf.__main__ import main
    sft = str(fast_run / "sft")
    assert main(["grpo", "--sft", sft, "--task", "reviews", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert f"{sft} was trained on task arithmetic; this command asks for reviews" in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "refused before anything is written"
    assert main(["collect", "--sft", sft, "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "no preferences or reward model are needed" in capsys.readouterr().err
    assert main(["grpo", "--sft", sft, "--fast", "--quiet", "--out", str(tmp_path / "grpo"),
                 "--set", "iterations=1", "eval_every=1", "n_periodic_eval=8", "n_eval_samples=8"]) == 0
    config = read(tmp_path / "grpo" / "config.json")
    assert (config["task"], config["reward"], config["max_new_tokens"]) == ("arithmetic", "gold", 6)
    for command in (["bon"], ["dpo", "--set", "steps=2"]):    # no --rm, no --prefs: the verifier serves
        assert main([*command, "--sft", sft, "--fast", "--quiet", "--out", str(tmp_path / command[0])]) == 0, command
        assert read(tmp_path / command[0] / "config.json")["task"] == "arithmetic"
    assert (tmp_path / "dpo" / "pairs.jsonl").exists()


def test_run_refuses_a_finished_folder_and_resume_keeps_the_stages(fast_run, capsys):
    from minirlhf.__main__ import main
    assert main(["run", "--task", "arithmetic", "--fast", "--quiet", "--out", str(fast_run)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    model = (fast_run / "grpo" / "model.pt").stat().st_mtime_ns
    assert main(["run", "--task", "arithmetic", "--fast", "--quiet", "--out", str(fast_run), "--resume"]) == 0
    assert (fast_run / "grpo" / "model.pt").stat().st_mtime_ns == model, "a finished stage is kept"
