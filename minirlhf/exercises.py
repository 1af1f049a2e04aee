"""Exercises: the list, the student copy generated from the solutions, and grading.

Solutions live in the package itself, each between a `### BEGIN SOLUTION` line and a
`### END SOLUTION` line (nbgrader's markers, STYLE.md rule 8). `make_student` copies the
repository and replaces every such region by one line,
`raise NotImplementedError("Exercise: <name> — see the docstring")`, at the region's
indentation; in notebooks the same happens inside code cells. Test code between
`### BEGIN HIDDEN TESTS` and `### END HIDDEN TESTS` lines is left out of the copy: the
instructor grades with it, students never see it.

EXERCISES below is the one list that the student README, docs/instructor.md, the test
hooks (tests/conftest.py) and `grade` all read. Rules that follow from it:
  - an exercise's name is the qualified name of the function it stubs
    (`AdaptiveKLController.update`); the stub's message carries it;
  - a test belongs to an exercise when its node id is in the exercise's `tests` (an id
    without `[...]` covers every parametrized case); a test listed under several
    exercises counts for each, and passes only when all of them are done;
  - in a student copy the tests of an unfinished exercise fail, naming it; any other test
    that runs into an unfinished exercise (a whole-stage smoke run, say) is skipped with
    a reason naming it (tests/conftest.py);
  - `grade` runs the instructor's tests (hidden ones included) against a student's
    `minirlhf/` in a temporary folder, and scores each exercise as passed / its tests.

Deliberate simplifications: regions are found line by line (no parsing); the enclosing
function is the nearest `def` above the region with a smaller indentation.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from minirlhf.common import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
SOLUTION = ("### BEGIN SOLUTION", "### END SOLUTION")
HIDDEN = ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")
STAMP = ".minirlhf-student.json"  # written into every student copy; marks it as one
INSTRUCTOR_ONLY = ("tests/test_exercises.py", "docs/instructor.md")  # never copied to students
IGNORED = {".git", "runs", "__pycache__", ".venv", "venv", ".pytest_cache", ".ipynb_checkpoints"}


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
    check: str  #: its inline check in minirlhf/checks.py ("" if none)
    tests: tuple  #: pytest node ids that check it


_L = "tests/test_losses.py::"
_M = "tests/test_model.py::"
_C = "tests/test_losses_critic_free.py::"
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
    Exercise("gae", "minirlhf/losses.py", 3, "notebooks/03_ppo_rlhf.ipynb", "check_gae", (
        _L + "test_gae_three_steps_by_hand", _L + "test_gae_matches_reference_on_random_masks",
        _L + "test_gae_lambda_one_is_discounted_return_minus_value", _L + "test_gae_lambda_zero_is_td_error")),
    Exercise("ppo_policy_loss", "minirlhf/losses.py", 2, "notebooks/03_ppo_rlhf.ipynb", "check_ppo_policy_loss", (
        _L + "test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage",
        _L + "test_ppo_policy_loss_has_zero_gradient_where_the_clip_binds", _L + "test_gradcheck_ppo_losses",
        # clip_eps_high and aggregation (the critic-free extension)
        _C + "test_clip_eps_high_none_is_todays_loss_bit_for_bit",
        _C + "test_clip_higher_lets_positive_advantages_grow_further",
        _C + "test_sequence_aggregation_with_an_empty_row_is_finite",
        _C + "test_equal_rewards_give_zero_advantages_and_zero_gradient")),
    Exercise("ppo_value_loss", "minirlhf/losses.py", 2, "notebooks/03_ppo_rlhf.ipynb", "check_ppo_value_loss", (
        _L + "test_ppo_value_loss_hand_computed", _L + "test_ppo_value_loss_has_zero_gradient_where_the_clip_binds",
        _L + "test_gradcheck_ppo_losses")),
    Exercise("AdaptiveKLController.update", "minirlhf/losses.py", 1, "notebooks/03_ppo_rlhf.ipynb", "check_adaptive_kl", (
        _L + "test_adaptive_kl_controller",)),
    Exercise("dpo_loss", "minirlhf/losses.py", 3, "notebooks/04_dpo.ipynb", "check_dpo_loss", (
        _L + "test_dpo_is_log2_when_policy_equals_reference", _L + "test_dpo_hinge_and_ipo_when_policy_equals_reference",
        _L + "test_dpo_metrics_hand_computed", _L + "test_dpo_gradient_raises_chosen_and_lowers_rejected",
        _L + "test_dpo_ipo_has_its_minimum_at_margin_one_over_two_beta",
        _L + "test_cdpo_and_robust_reduce_to_sigmoid_at_zero_smoothing", _L + "test_gradcheck_dpo",
        _L + "test_extreme_margins_are_finite")),
    # Notebook exercises: practice checked by the cell after them, not graded (the grader runs the
    # instructor's notebooks, so it could not see the student's answer).
    Exercise("returns_to_go", "notebooks/00_rl_intro.ipynb", 1, "notebooks/00_rl_intro.ipynb", "", ()),
    Exercise("gpt_parameter_count", "notebooks/01_tiny_gpt_and_sft.ipynb", 2, "notebooks/01_tiny_gpt_and_sft.ipynb",
             "", ()),
    Exercise("bayes_ceiling", "notebooks/02_reward_model.ipynb", 2, "notebooks/02_reward_model.ipynb", "", ()),
    Exercise("per_token_rewards", "notebooks/03_ppo_rlhf.ipynb", 2, "notebooks/03_ppo_rlhf.ipynb", "", ()),
    Exercise("dpo_pair_gradient", "notebooks/04_dpo.ipynb", 3, "notebooks/04_dpo.ipynb", "", ()),
    # Critic-free RL (docs/grpo.md); notebook 06_grpo is not written yet, 03 introduces the clipped loss.
    Exercise("group_advantages", "minirlhf/losses.py", 1, "notebooks/03_ppo_rlhf.ipynb", "check_group_advantages", (
        _C + "test_group_advantages_by_hand", _C + "test_group_advantages_sum_to_zero_per_group",
        _C + "test_rloo_is_g_over_g_minus_1_times_dr_grpo", _C + "test_advantages_match_naive_loops",
        _C + "test_equal_rewards_give_zero_advantages_and_zero_gradient")),
    Exercise("rloo_advantages", "minirlhf/losses.py", 1, "notebooks/03_ppo_rlhf.ipynb", "check_rloo_advantages", (
        _C + "test_rloo_advantages_by_hand", _C + "test_rloo_is_g_over_g_minus_1_times_dr_grpo",
        _C + "test_advantages_match_naive_loops", _C + "test_equal_rewards_give_zero_advantages_and_zero_gradient")),
    Exercise("masked_aggregate", "minirlhf/losses.py", 2, "notebooks/03_ppo_rlhf.ipynb", "check_masked_aggregate", (
        _C + "test_aggregations_by_hand", _C + "test_sequence_and_token_aggregation_agree_when_lengths_are_equal",
        _C + "test_lengths_weigh_differently_under_each_aggregation", _C + "test_aggregation_matches_naive_loop",
        _C + "test_sequence_aggregation_with_an_empty_row_is_finite")),
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


# ---------------------------------------------------------------------------------------
# Regions: solution regions become stubs, hidden-test regions disappear.

_DEF = re.compile(r"^(\s*)(?:async\s+)?def\s+(\w+)|^(\s*)class\s+(\w+)")


def _enclosing_name(lines, start, indent):
    """Qualified name of the function around line `start` ("Class.method"), or None."""
    names, limit = [], indent
    for line in reversed(lines[:start]):
        match = _DEF.match(line)
        if match:
            space, name = (match.group(1), match.group(2)) if match.group(2) else (match.group(3), match.group(4))
            if len(space) < limit:
                names.append(name)
                limit = len(space)
                if limit == 0:
                    break
    return ".".join(reversed(names)) or None


def find_regions(text, where):
    """[(kind, first, last, indent, name)] for each region: kind "solution" or "hidden",
    first/last the 0-based lines of its markers, name the enclosing function (or None)."""
    lines, regions, open_region = text.splitlines(), [], None
    markers = {SOLUTION[0]: ("solution", True), SOLUTION[1]: ("solution", False),
               HIDDEN[0]: ("hidden", True), HIDDEN[1]: ("hidden", False)}
    for i, line in enumerate(lines):
        if line.strip() not in markers:
            continue
        kind, begins = markers[line.strip()]
        if begins and open_region is None:
            open_region = (kind, i, line[: len(line) - len(line.lstrip())])
        elif not begins and open_region is not None and open_region[0] == kind:
            kind, first, indent = open_region
            regions.append((kind, first, i, indent, _enclosing_name(lines, first, len(indent))))
            open_region = None
        else:
            raise ExerciseError(f"{where}:{i + 1}: unexpected {line.strip()!r}")
    if open_region is not None:
        raise ExerciseError(f"{where}:{open_region[1] + 1}: region is never closed")
    return regions


def stub_line(indent, name, fallback):
    """The line that replaces a solution region."""
    if name is None:
        return f'{indent}raise NotImplementedError("Exercise: {fallback}")'
    return f'{indent}raise NotImplementedError("Exercise: {name} — see the docstring")'


def strip_regions(text, where, fallback=None):
    """(student text, names of the stubbed functions): solution regions become one stub
    line each, hidden-test regions vanish, everything else is kept byte for byte. A region
    outside any function is named `fallback` (default: `where`)."""
    fallback = fallback or where
    regions = find_regions(text, where)
    if not regions:
        return text, []
    lines = text.splitlines(keepends=True)
    names = []
    for kind, first, last, indent, name in reversed(regions):
        replacement = []
        if kind == "solution":
            names.append(name or fallback)
            replacement = [stub_line(indent, name, fallback) + "\n"]
        lines[first:last + 1] = replacement
    text = "".join(lines)
    if regions[-1][0] == "hidden" and text.endswith("\n"):
        text = text.rstrip() + "\n"  # a hidden region at the end leaves no trailing blank lines
    return text, names[::-1]


def strip_notebook(text, where):
    """The same for an .ipynb: code cells lose their regions (and every cell its outputs);
    markdown cells are untouched."""
    notebook, names = json.loads(text), []
    for i, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        source, stubbed = strip_regions(source, f"{where} cell {i}", f"{Path(where).stem} cell {i}")
        cell["source"], cell["outputs"], cell["execution_count"] = source.splitlines(keepends=True), [], None
        names += stubbed
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", names


# ---------------------------------------------------------------------------------------
# The student copy.


def source_files(source, skip=None):
    """Relative paths of the files to copy: what git tracks or would track (untracked but
    not ignored), or a directory walk where there is no git; never IGNORED folders."""
    source, paths = Path(source), None
    if (source / ".git").exists():
        try:
            listed = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "--cached", "--others",
                                     "--exclude-standard"], capture_output=True, check=True).stdout.decode()
            paths = [Path(p) for p in listed.split("\0") if p]
        except (OSError, subprocess.CalledProcessError):
            pass
    if paths is None:
        paths = [p.relative_to(source) for p in source.rglob("*")]
    keep = []
    for path in sorted(set(paths)):
        full = source / path
        if (not full.is_file() or full.is_symlink() or IGNORED & set(path.parts)
                or any(part.endswith(".egg-info") for part in path.parts)
                or (skip is not None and full.resolve().is_relative_to(skip))):
            continue
        keep.append(path.as_posix())
    return keep


def _prepare_out(out, source, overwrite):
    if source.is_relative_to(out):
        raise ExerciseError(f"{out} holds the instructor's repository: choose another folder")
    if out.exists() and not out.is_dir():
        raise ExerciseError(f"{out} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExerciseError(f"{out} is not empty; pass --overwrite to replace it")
        if not (out / STAMP).exists():
            raise ExerciseError(f"{out} is not empty and is not a student copy made by make-student: "
                                "refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def make_student(out, source=REPO, overwrite=False):
    """Write the student copy of `source` into `out`. Returns {"files": count, "stubbed":
    [(exercise name, file)]}."""
    source, out = Path(source).resolve(), Path(out).resolve()
    _prepare_out(out, source, overwrite)
    stubbed, n_files = [], 0
    for rel in source_files(source, skip=out):
        if rel in INSTRUCTOR_ONLY or rel == STAMP:
            continue
        src, dst = source / rel, out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith((".py", ".ipynb")):
            text = src.read_text(encoding="utf-8")
            text, names = (strip_notebook if rel.endswith(".ipynb") else strip_regions)(text, rel)
            stubbed += [(name, rel) for name in names]
            dst.write_text(text, encoding="utf-8")
            shutil.copymode(src, dst)
        else:
            shutil.copy2(src, dst)
        n_files += 1
    if not stubbed:
        shutil.rmtree(out)
        raise ExerciseError(f"no solution regions in {source}: is it a student copy already?")
    listed = {e.name for e in EXERCISES}
    unlisted = sorted({name for name, _ in stubbed} - listed)
    if unlisted:
        print(f"warning: solution regions missing from EXERCISES: {', '.join(unlisted)}", file=sys.stderr)
    readme = out / "README.md"
    readme.write_text(student_readme(readme.read_text(encoding="utf-8") if readme.exists() else ""),
                      encoding="utf-8")
    (out / STAMP).write_text(json.dumps({"made_by": "python -m minirlhf make-student",
                                         "exercises": [name for name, _ in stubbed]}, indent=1) + "\n")
    return {"files": n_files, "stubbed": stubbed}


def exercise_table():
    """The exercise list as a markdown table (student README and docs/instructor.md)."""
    rows = ["| # | exercise | file | difficulty | notebook | inline check |",
            "| --- | --- | --- | --- | --- | --- |"]
    for i, e in enumerate(EXERCISES, 1):
        check = f"`{e.check}({e.name.split('.')[0]})`" if e.check else "—"
        rows.append(f"| {i} | `{e.name}` | `{e.file}` | {'★' * e.difficulty} | `{e.notebook}` | {check} |")
    return "\n".join(rows) + "\n"


def student_readme(original):
    """What to do, the exercises, how to check; then the course README."""
    return f"""# Your exercises

This is the student copy of minirlhf. Everything in it runs, except {len(EXERCISES)} functions
that you write yourself: each one's body is a single line,

    raise NotImplementedError("Exercise: <name> — see the docstring")

Replace that line by your code. The docstring above it says what to compute, the shapes
of the arguments (B batch, T tokens, V vocabulary, K responses per prompt) and a hint.

## What to do

1. `pip install -r requirements.txt`
2. Pick an exercise from the table (the notebooks introduce them in this order;
   ★ short, ★★ one subtlety, ★★★ a loop or several cases), open its file, read its
   docstring and write the body.
3. Check it in a notebook: `from minirlhf.checks import check_sft_loss; check_sft_loss(sft_loss)`
   prints ✓ or the inputs, the expected values and what your function returned.
4. Check it with its tests: `python -m pytest --exercise sft_loss`.
5. `python -m pytest` runs everything. The tests of an unfinished exercise fail with
   `NotImplementedError: Exercise: <name>`; tests of whole stages (SFT, reward model,
   PPO, DPO runs) that need an unfinished exercise are skipped, and the skip reason names
   it (`python -m pytest -rs` lists the reasons). When every exercise is done nothing fails.
6. Train: `python -m minirlhf sft --fast --out runs/sft`. A stage that needs an unfinished
   exercise stops with `error: exercise sft_loss is not done yet (minirlhf/losses.py) …`.

Your instructor grades with the same tests and a few more: make the functions right, not
just the tests green.

## Exercises

{exercise_table()}
---

{original}"""


# ---------------------------------------------------------------------------------------
# Grading: the instructor's tests, against a student's package, in a temporary folder.


def _grading_tree(student, tmp):
    """The instructor's repository (hidden tests included) with the student's minirlhf/,
    whose exercises.py is the instructor's (it holds the hidden test ids)."""
    for rel in source_files(REPO):
        if rel in INSTRUCTOR_ONLY or rel.startswith("minirlhf/"):
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, tmp / rel)
    shutil.copytree(student / "minirlhf", tmp / "minirlhf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "minirlhf" / "exercises.py", tmp / "minirlhf" / "exercises.py")


def _score(report):
    """Per-exercise rows and the unattributed tests' outcome counts from a report."""
    outcomes, broken = report.get("outcomes", {}), report.get("collection_errors", [])
    messages = report.get("messages", {})
    rows = []
    for e in EXERCISES:
        results = {}
        for test_id in test_ids(e):
            hits = {n: o for n, o in outcomes.items() if matches(n, test_id)}
            file_broken = any(test_id.startswith(b) for b in broken)
            results.update(hits or {test_id: "error" if file_broken else "not run"})
        if results:
            passed = sum(o == "passed" for o in results.values())
            rows.append({"name": e.name, "file": e.file, "difficulty": e.difficulty, "notebook": e.notebook,
                         "passed": passed, "total": len(results), "score": passed / len(results),
                         "tests": results, "messages": {n: messages[n] for n in results if n in messages}})
    other = {}
    for nodeid, outcome in outcomes.items():
        if not exercises_of(nodeid):
            other[outcome] = other.get(outcome, 0) + 1
    return rows, other


def grade(student, json_path=None, timeout=900, all_tests=False, echo=print):
    """Grade the student copy in `student`; write and return the gradebook record."""
    student = Path(student).resolve()
    if not (student / "minirlhf" / "__init__.py").is_file():
        raise ExerciseError(f"{student} has no minirlhf/ package: is it a student copy?")
    files = ["tests"] if all_tests else sorted({t.split("::")[0] for e in EXERCISES for t in test_ids(e)})
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="minirlhf-grade-") as tmp:
        tmp = Path(tmp)
        _grading_tree(student, tmp)
        report_path = tmp / "grade-report.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONPATH": str(tmp), "MINIRLHF_GRADE_REPORT": str(report_path)}
        command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "--tb=line"]
        try:
            run = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
            returncode, output, timed_out = run.returncode, run.stdout + run.stderr, False
        except subprocess.TimeoutExpired as e:
            returncode, timed_out = None, True
            output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    rows, other = _score(report)
    points = sum(r["score"] for r in rows)
    record = {
        "student_dir": str(student), "graded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "exercises": rows,
        "total": {"points": points, "max_points": len(rows), "score": points / max(len(rows), 1),
                  "tests_passed": sum(r["passed"] for r in rows), "tests": sum(r["total"] for r in rows)},
        "other_tests": other,
        "pytest": {"files": files, "returncode": returncode, "timed_out": timed_out,
                   "seconds": round(time.time() - started, 1), "output_tail": output[-3000:]},
    }
    json_path = Path(json_path) if json_path else student / "grade.json"
    atomic_write_text(json_path, json.dumps(record, indent=1) + "\n")
    echo(format_grade(record) + f"\nwrote {json_path}")
    return record


def format_grade(record):
    """The gradebook record as a table for the terminal."""
    lines = [f"grade of {record['student_dir']} (instructor tests, hidden ones included; "
             f"{record['pytest']['seconds']} s)",
             f"  {'exercise':<29} {'difficulty':<10} {'notebook':<20} {'tests':>7} {'score':>6}"]
    for r in record["exercises"]:
        lines.append(f"  {r['name']:<29} {'★' * r['difficulty']:<10} {Path(r['notebook']).stem:<20} "
                     f"{r['passed']:>3}/{r['total']:<3} {100 * r['score']:>5.0f} %")
    t = record["total"]
    lines.append(f"  total: {t['points']:.2f} of {t['max_points']} exercises = {100 * t['score']:.1f} % "
                 f"({t['tests_passed']}/{t['tests']} tests)")
    if record["other_tests"]:
        counts = ", ".join(f"{n} {o}" for o, n in sorted(record["other_tests"].items()))
        lines.append(f"  other tests (no exercise of their own): {counts}")
    if record["pytest"]["timed_out"]:
        lines.append("  pytest TIMED OUT: tests that did not finish count as not run")
    elif not record["exercises"] or record["pytest"]["returncode"] not in (0, 1):
        lines.append("  pytest did not run normally; its output ends with:\n" + record["pytest"]["output_tail"][-1500:])
    return "\n".join(lines)
