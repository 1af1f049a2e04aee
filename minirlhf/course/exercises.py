"""The exercise list: the single source of truth.

Solutions live in the package itself, each between a `### BEGIN SOLUTION` line and a
`### END SOLUTION` line (nbgrader's markers, STYLE.md rule 8); the student copy
(minirlhf/course/student_copy.py) replaces each by a stub that raises
`NotImplementedError("Exercise: <name> — see the docstring")`.

EXERCISES below is the one list that the student README, docs/instructor.md, the test
hooks (tests/conftest.py) and the grader (minirlhf/course/grade.py) all read. Rules that
follow from it:
  - an exercise's name is the qualified name of the function it stubs
    (`AdaptiveKLController.update`); the stub's message carries it;
  - a test belongs to an exercise when its node id is in the exercise's `tests` (an id
    without `[...]` covers every parametrized case); `python -m pytest --exercise NAME`
    runs them; a test listed under several exercises passes only when all are done;
  - in a student copy the tests of an unfinished exercise fail, naming it; any other test
    that runs into an unfinished exercise (a whole-stage smoke run, say) is skipped with
    a reason naming it (tests/conftest.py);
  - the grader does not run these tests on a student's code: it runs the exercise's
    checks (minirlhf/course/cases.py) in a sandbox, and every exercise, notebook ones
    included, scores 0 or 1.
"""
import re
from dataclasses import dataclass


class ExerciseError(ValueError):
    """Unbalanced markers, an unusable output folder, a student folder without a package."""


# ---------------------------------------------------------------------------------------
# The exercise list: the single source of truth.


@dataclass(frozen=True)
class Exercise:
    name: str  #: qualified name of the stubbed function, as the stub's message says it
    file: str  #: the file holding its solution region, relative to the repository root
    difficulty: int  #: 1 a line or two, 2 a few lines with one subtlety, 3 a loop or many cases
    notebook: str  #: the notebook that introduces it
    check: str  #: its inline check in minirlhf/course/checks.py ("" if none)
    tests: tuple  #: pytest node ids that check it


_L = "tests/test_losses.py::"
_M = "tests/test_model.py::"
_C = "tests/test_losses_critic_free.py::"
_NB6 = "notebooks/06_grpo.ipynb"
EXERCISES = (
    Exercise("attention_reference", "minirlhf/model.py", 2, "notebooks/01_tiny_gpt_and_sft.ipynb", "check_attention", (
        _M + "test_sdpa_equals_reference_attention_with_padding_mask",
        _M + "test_model_with_reference_attention_gives_same_logits")),
    Exercise("token_logprobs", "minirlhf/losses.py", 1, "notebooks/01_tiny_gpt_and_sft.ipynb", "check_token_logprobs", (
        _L + "test_token_logprobs_matches_log_softmax_gather",)),
    Exercise("sft_loss", "minirlhf/losses.py", 1, "notebooks/01_tiny_gpt_and_sft.ipynb", "check_sft_loss", (
        _L + "test_sft_loss_tiny_example", _L + "test_gradcheck_sft_loss",
        _L + "test_extreme_margins_are_finite")),
    Exercise("bradley_terry_loss", "minirlhf/losses.py", 1, "notebooks/02_reward_model.ipynb",
             "check_bradley_terry_loss", (
        _L + "test_bradley_terry_equal_rewards_is_log2", _L + "test_bradley_terry_hand_computed",
        _L + "test_ranking_loss_with_two_responses_is_bradley_terry", _L + "test_gradcheck_reward_losses",
        _L + "test_extreme_margins_are_finite")),
    Exercise("ranking_loss", "minirlhf/losses.py", 2, "notebooks/02_reward_model.ipynb", "check_ranking_loss", (
        _L + "test_ranking_loss_with_two_responses_is_bradley_terry", _L + "test_ranking_loss_matches_pair_enumeration",
        _L + "test_gradcheck_reward_losses", _L + "test_extreme_margins_are_finite")),
    Exercise("kl_penalty", "minirlhf/losses.py", 2, "notebooks/03_ppo_rlhf.ipynb", "check_kl_penalty", (
        _L + "test_kl_estimators_k1_and_k3_are_unbiased", _L + "test_kl_estimators_hand_values",
        _L + "test_k3_is_nonnegative_including_extremes", _L + "test_k3_is_accurate_in_float32_for_tiny_d",
        _L + "test_gradcheck_k3_near_zero")),
    Exercise("kl_penalized_rewards", "minirlhf/losses.py", 2, "notebooks/03_ppo_rlhf.ipynb",
             "check_kl_penalized_rewards", (
        _L + "test_kl_penalized_rewards_puts_scores_at_last_masked_position",
        _L + "test_kl_penalized_rewards_ignores_inf_off_mask", _L + "test_gradcheck_kl_penalized_rewards")),
    Exercise("gae", "minirlhf/losses.py", 3, "notebooks/00_rl_intro.ipynb", "check_gae", (
        _L + "test_gae_three_steps_by_hand", _L + "test_gae_matches_reference_on_random_masks",
        _L + "test_gae_lambda_one_is_discounted_return_minus_value", _L + "test_gae_lambda_zero_is_td_error")),
    Exercise("ppo_policy_loss", "minirlhf/losses.py", 2, "notebooks/00_rl_intro.ipynb", "check_ppo_policy_loss", (
        _L + "test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage",
        _L + "test_ppo_policy_loss_has_zero_gradient_where_the_clip_binds", _L + "test_gradcheck_ppo_losses")),
    Exercise("ppo_value_loss", "minirlhf/losses.py", 2, "notebooks/03_ppo_rlhf.ipynb", "check_ppo_value_loss", (
        _L + "test_ppo_value_loss_hand_computed", _L + "test_ppo_value_loss_has_zero_gradient_where_the_clip_binds",
        _L + "test_gradcheck_ppo_losses")),
    Exercise("ppo_ptx_loss", "minirlhf/losses.py", 1, "notebooks/03_ppo_rlhf.ipynb", "check_ppo_ptx_loss", (
        _L + "test_ppo_ptx_loss_adds_gamma_times_the_token_mean_nll", _L + "test_gradcheck_ppo_ptx_loss")),
    Exercise("AdaptiveKLController.update", "minirlhf/losses.py", 1, "notebooks/03_ppo_rlhf.ipynb", "check_adaptive_kl", (
        _L + "test_adaptive_kl_controller",)),
    Exercise("dpo_loss", "minirlhf/losses.py", 3, "notebooks/04_dpo.ipynb", "check_dpo_loss", (
        _L + "test_dpo_is_log2_when_policy_equals_reference", _L + "test_dpo_hinge_and_ipo_when_policy_equals_reference",
        _L + "test_dpo_metrics_hand_computed", _L + "test_dpo_gradient_raises_chosen_and_lowers_rejected",
        _L + "test_dpo_ipo_has_its_minimum_at_margin_one_over_two_beta",
        _L + "test_cdpo_and_robust_reduce_to_sigmoid_at_zero_smoothing", _L + "test_gradcheck_dpo",
        _L + "test_extreme_margins_are_finite")),
    Exercise("group_advantages", "minirlhf/losses.py", 1, _NB6, "check_group_advantages", (
        _C + "test_group_advantages_by_hand", _C + "test_group_advantages_sum_to_zero_per_group",
        _C + "test_rloo_is_g_over_g_minus_1_times_dr_grpo", _C + "test_equal_rewards_give_zero_advantages_and_zero_gradient",
        _C + "test_advantages_match_naive_loops")),
    Exercise("rloo_advantages", "minirlhf/losses.py", 1, _NB6, "check_rloo_advantages", (
        _C + "test_rloo_advantages_by_hand", _C + "test_rloo_is_g_over_g_minus_1_times_dr_grpo",
        _C + "test_equal_rewards_give_zero_advantages_and_zero_gradient", _C + "test_advantages_match_naive_loops")),
    Exercise("masked_aggregate", "minirlhf/losses.py", 2, _NB6, "check_masked_aggregate", (
        _C + "test_aggregations_by_hand", _C + "test_sequence_and_token_aggregation_agree_when_lengths_are_equal",
        _C + "test_lengths_weigh_differently_under_each_aggregation",
        _C + "test_sequence_aggregation_with_an_empty_row_is_finite", _C + "test_aggregation_matches_naive_loop")),
    # Notebook exercises: the cell after each checks it; the grader runs the function that the
    # student's exercise cell defines (no pytest tests of their own).
    Exercise("returns_to_go", "notebooks/00_rl_intro.ipynb", 1, "notebooks/00_rl_intro.ipynb", "", ()),
    Exercise("gpt_parameter_count", "notebooks/01_tiny_gpt_and_sft.ipynb", 2, "notebooks/01_tiny_gpt_and_sft.ipynb",
             "", ()),
    Exercise("bayes_ceiling", "notebooks/02_reward_model.ipynb", 2, "notebooks/02_reward_model.ipynb", "", ()),
    Exercise("per_token_rewards", "notebooks/03_ppo_rlhf.ipynb", 2, "notebooks/03_ppo_rlhf.ipynb", "", ()),
    Exercise("dpo_pair_gradient", "notebooks/04_dpo.ipynb", 3, "notebooks/04_dpo.ipynb", "", ()),
)

HIDDEN_TESTS = {}  # exercise name -> hidden test ids; filled in the instructor's copy only
### BEGIN HIDDEN TESTS
HIDDEN_TESTS.update({
    "token_logprobs": (_L + "test_hidden_token_logprobs_three_way_softmax",),
    "sft_loss": (_L + "test_hidden_sft_loss_is_a_token_mean_not_a_row_mean",),
    "ranking_loss": (_L + "test_hidden_ranking_loss_two_rows_by_hand",),
    "kl_penalized_rewards": (_L + "test_hidden_kl_penalized_rewards_k2_by_hand",),
    "gae": (_L + "test_hidden_gae_two_rows_by_hand",),
    "dpo_loss": (_L + "test_hidden_dpo_variants_by_hand",),
})
### END HIDDEN TESTS


def get(name):
    """The Exercise called `name`; ExerciseError lists the valid names."""
    for exercise in EXERCISES:
        if exercise.name == name:
            return exercise
    raise ExerciseError(f"unknown exercise {name!r}; valid: {', '.join(e.name for e in EXERCISES)}")


def test_ids(exercise):
    """Every test id of an exercise, the hidden ones included where this copy has them."""
    return tuple(exercise.tests) + tuple(HIDDEN_TESTS.get(exercise.name, ()))


def matches(nodeid, test_id):
    """True if the collected test `nodeid` is `test_id` or one of its parametrized cases."""
    return nodeid == test_id or nodeid.startswith(test_id + "[")


def exercises_of(nodeid):
    """Names of the exercises that the test `nodeid` belongs to (usually one, maybe none)."""
    return [e.name for e in EXERCISES if any(matches(nodeid, t) for t in test_ids(e))]


_STUB_MESSAGE = re.compile(r"^Exercise: (.+?)(?: — .*)?$", re.S)


def unfinished_exercise(exc):
    """The name in a stub's `NotImplementedError("Exercise: …")` anywhere in exc's chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NotImplementedError):
            match = _STUB_MESSAGE.match(str(exc))
            if match:
                return match.group(1)
        exc = exc.__cause__ or exc.__context__
    return None


def unfinished_message(exc):
    """One line for a user who ran into an unfinished exercise, or None if exc is not one."""
    name = unfinished_exercise(exc)
    if name is None:
        return None
    where = next((f" ({e.file})" for e in EXERCISES if e.name == name), "")
    return f"exercise {name} is not done yet{where} — see its docstring and the exercise list in README.md"
