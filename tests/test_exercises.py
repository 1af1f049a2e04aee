"""Tests for the exercises machinery: minirlhf/course/ (the list, the student copy, the inline
checks) and tests/conftest.py. The grader has its own file, tests/test_grading.py.

What is checked:
  - the exercise list agrees with the solution regions in the repository, with the tests
    it names, with the inline checks and with docs/instructor.md;
  - region stripping by hand: stubs at the region's indentation naming the function
    (methods as Class.method), hidden tests removed, notebooks' code cells only,
    unbalanced markers refused with file and line;
  - the generated student copy: no solution text and no markers anywhere, no .git, runs/
    or caches, every .py compiles, a README listing the exercises; make-student refuses a
    non-empty folder and a student copy as its source;
  - in the student copy, pytest fails exactly the exercises' tests (each naming its
    exercise) and skips the stage tests that need one, naming it; a stage command names
    the unfinished exercise with exit code 2;
  - round trip: the solutions put back into the stubs pass the tests there;
  - no working reference ships: gae_reference and the one-line token_logprobs are gone;
  - each inline check passes the real solution and fails a deliberately wrong function.

Subprocess pytest runs are the slow part: each runs only the test files it needs.
"""
import ast
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minirlhf import losses, model
from minirlhf.course import checks, exercises, student_copy
from minirlhf.course.exercises import EXERCISES
from minirlhf.course.student_copy import REPO

GRADED = [e for e in EXERCISES if e.tests]   # package exercises; notebook practice is not graded

MARKERS = student_copy.SOLUTION + student_copy.HIDDEN + student_copy.INSTRUCTOR
RUN_FILES = ["tests/test_losses.py", "tests/test_losses_critic_free.py", "tests/test_model.py"]


def run_pytest(cwd, *args, report=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd), "PYTHONDONTWRITEBYTECODE": "1"}
    if report:
        env["MINIRLHF_GRADE_REPORT"] = str(report)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def texts(root, files=None):
    """{relative path: text} of every text file under root (or of `files`); notebooks as
    their cells' sources."""
    found = {}
    for path in (root.rglob("*") if files is None else [root / f for f in files]):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if path.suffix == ".ipynb":
            cells = json.loads(text)["cells"]
            text = "\n".join("".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells)
        found[path.relative_to(root).as_posix()] = text
    return found


def restore(kit, names):
    """Put the solution regions of the (package) exercises `names` back in place of their stubs."""
    for e in GRADED:
        if e.name not in names:
            continue
        source = (REPO / e.file).read_text()
        kind, first, last, indent, _ = next(r for r in student_copy.find_regions(source, e.file) if r[4] == e.name)
        solution = "".join(source.splitlines(keepends=True)[first:last + 1])
        stub = student_copy.stub_line(indent, e.name, "") + "\n"
        text = (kit / e.file).read_text()
        assert text.count(stub) == 1, f"{e.name}: expected one stub"
        (kit / e.file).write_text(text.replace(stub, solution))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "kit"
    result = student_copy.make_student(out)
    assert sorted(name for name, _ in result["stubbed"]) == sorted(e.name for e in EXERCISES)
    return out


# ---------------------------------------------------------------------------------------
# The exercise list


def test_exercise_list_matches_solution_regions_checks_and_tests():
    regions = set()
    sources = [f for f in student_copy.source_files(REPO) if f.endswith((".py", ".ipynb"))]
    for rel, text in texts(REPO, sources).items():
        if rel not in student_copy.INSTRUCTOR_ONLY:
            regions |= {(r[4], rel) for r in student_copy.find_regions(text, rel) if r[0] == "solution"}
    assert regions == {(e.name, e.file) for e in EXERCISES}
    assert len({e.name for e in EXERCISES}) == len(EXERCISES)
    have_notebooks, defined = any((REPO / "notebooks").glob("*.ipynb")), {}
    for e in EXERCISES:
        assert e.difficulty in (1, 2, 3), f"{e.name}"
        assert e.notebook.startswith("notebooks/") and e.notebook.endswith(".ipynb"), f"{e.name}"
        assert not have_notebooks or (REPO / e.notebook).exists(), f"{e.name}: no {e.notebook}"
        if e.file.endswith(".ipynb"):   # notebook practice: checked by the next cell, not graded
            assert e.file == e.notebook and not e.check and not exercises.test_ids(e), f"{e.name}"
            continue
        assert callable(getattr(checks, e.check)), f"{e.name}"
        assert exercises.test_ids(e), f"{e.name} has no tests"
        for test_id in exercises.test_ids(e):
            path, name = test_id.split("::")
            if path not in defined:
                tree = ast.parse((REPO / path).read_text())
                defined[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name in defined[path], f"{test_id}"


def test_instructor_guide_shows_the_generated_exercise_table():
    guide = (REPO / "docs" / "instructor.md").read_text()
    assert student_copy.exercise_table() in guide, "regenerate the table: see docs/instructor.md"


def test_test_attribution_and_stub_messages():
    assert exercises.exercises_of("tests/test_losses.py::test_gradcheck_dpo[hinge-0.0]") == ["dpo_loss"]
    assert set(exercises.exercises_of("tests/test_losses.py::test_gradcheck_reward_losses")) == {
        "bradley_terry_loss", "ranking_loss"}
    assert exercises.exercises_of("tests/test_losses.py::test_masked_mean_ignores_padding_values") == []
    assert exercises.exercises_of("tests/test_losses.py::test_gradcheck_dpo_other") == []
    try:
        try:
            raise NotImplementedError("Exercise: AdaptiveKLController.update — see the docstring")
        except NotImplementedError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert exercises.unfinished_exercise(e) == "AdaptiveKLController.update"
        assert "(minirlhf/losses.py)" in exercises.unfinished_message(e)
    assert exercises.unfinished_message(NotImplementedError("abstract method")) is None


# ---------------------------------------------------------------------------------------
# Region stripping by hand


def test_strip_regions_stubs_functions_and_methods_and_drops_hidden_tests():
    source = "\n".join([
        "def f(x):", '    """Doc."""', "    " + MARKERS[0], "    return x + 1", "    " + MARKERS[1], "",
        "class C:", "    def update(self):", "        if True:", "            " + MARKERS[0],
        "            pass", "            " + MARKERS[1], "", MARKERS[2], "def test_secret():", "    pass",
        MARKERS[3], "def test_kept():", "    pass", ""])
    text, names = student_copy.strip_regions(source, "x.py")
    assert names == ["f", "C.update"]
    assert text == "\n".join([
        "def f(x):", '    """Doc."""', '    raise NotImplementedError("Exercise: f — see the docstring")', "",
        "class C:", "    def update(self):", "        if True:",
        '            raise NotImplementedError("Exercise: C.update — see the docstring")', "",
        "def test_kept():", "    pass", ""])
    for broken in ([MARKERS[0]], [MARKERS[1]], [MARKERS[0], MARKERS[0]], [MARKERS[0], MARKERS[3]]):
        with pytest.raises(exercises.ExerciseError, match="x.py:"):
            student_copy.strip_regions("\n".join(["a = 1"] + broken), "x.py")


def test_strip_notebook_changes_code_cells_only():
    code = f"def f(x):\n    {MARKERS[0]}\n    return 2 * x\n    {MARKERS[1]}\n"
    loose = f"{MARKERS[0]}\ny = 3\n{MARKERS[1]}\n"
    markdown = f"Markers in prose are left alone:\n{MARKERS[0]}\n"
    notebook = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": markdown.splitlines(keepends=True)},
        {"cell_type": "code", "metadata": {}, "source": code.splitlines(keepends=True), "execution_count": 3,
         "outputs": [{"output_type": "stream", "name": "stdout", "text": ["6\n"]}]},
        {"cell_type": "code", "metadata": {}, "source": loose, "execution_count": None, "outputs": []}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    text, names = student_copy.strip_notebook(json.dumps(notebook), "notebooks/03_ppo.ipynb")
    cells = json.loads(text)["cells"]
    assert names == ["f", "03_ppo cell 2"]
    assert "".join(cells[0]["source"]) == markdown
    assert "".join(cells[1]["source"]) == 'def f(x):\n    raise NotImplementedError("Exercise: f — see the docstring")\n'
    assert cells[1]["outputs"] == [] and cells[1]["execution_count"] is None
    assert "".join(cells[2]["source"]) == 'raise NotImplementedError("Exercise: 03_ppo cell 2")\n'


# ---------------------------------------------------------------------------------------
# The student copy


def test_student_copy_has_no_solution_text_and_no_markers(kit):
    # Solution lines, found by a scan independent of the generator's, that occur nowhere
    # else in the repository: none of them may be anywhere in the student copy.
    solution, elsewhere = set(), set()
    for rel, text in texts(REPO, student_copy.source_files(REPO)).items():
        if rel in student_copy.INSTRUCTOR_ONLY:
            continue
        inside = False
        for line in text.splitlines():
            stripped = line.strip()
            if stripped in student_copy.SOLUTION + student_copy.INSTRUCTOR:
                inside = stripped in (student_copy.SOLUTION[0], student_copy.INSTRUCTOR[0])
            elif len(stripped) >= 12 and not stripped.startswith("#"):
                (solution if inside else elsewhere).add(stripped)
    secret = solution - elsewhere
    assert len(secret) > 40, "the scan found too few solution lines to mean anything"
    kit_texts = texts(kit)
    for rel, text in kit_texts.items():
        lines = {line.strip() for line in text.splitlines()}
        assert not secret & lines, f"{rel}"   # whole lines: "return rewards" must not match "return rewards.view(...)"
        assert not [line for line in text.splitlines() if line.strip() in MARKERS], f"{rel}"
        assert "def test_hidden_" not in text, f"{rel}"
    files = set(kit_texts)
    assert not set(student_copy.INSTRUCTOR_ONLY) & files
    assert not [f for f in files if {".git", "runs", "__pycache__", ".venv"} & set(f.split("/"))]
    assert {"minirlhf/losses.py", "tests/test_losses.py", "data/sft_train.jsonl", "pyproject.toml",
            "requirements.txt", "README.md", "docs/metrics.md"} <= files
    for rel in files:
        if rel.endswith(".py"):
            compile(kit_texts[rel], rel, "exec")
    readme = kit_texts["README.md"]
    assert student_copy.exercise_table() in readme and "python -m pytest --exercise" in readme
    for e in EXERCISES:
        assert kit_texts[e.file].count(student_copy.stub_line("", e.name, "").strip()) == 1, f"{e.name}"


def test_make_student_refuses_non_empty_folders_and_student_copies(kit, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(exercises.ExerciseError, match="--overwrite"):
        student_copy.make_student(tmp_path)
    with pytest.raises(exercises.ExerciseError, match="not a student copy"):
        student_copy.make_student(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(exercises.ExerciseError, match="student copy already"):
        student_copy.make_student(tmp_path / "again", source=kit)
    assert not (tmp_path / "again").exists()


def test_student_pytest_fails_exactly_the_exercise_tests(kit, tmp_path):
    files = RUN_FILES + ["tests/test_sft.py"]
    run = run_pytest(kit, *files, "-rs", report=tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    outcomes, messages = report["outcomes"], report["messages"]
    assert not report["collection_errors"]
    exercise_tests = {n for n in outcomes if exercises.exercises_of(n)}
    assert {n for n, o in outcomes.items() if o == "failed"} == exercise_tests, f"pytest output:\n{run.stdout[-3000:]}"
    for nodeid in exercise_tests:
        assert "NotImplementedError: Exercise: " in messages[nodeid], f"{nodeid}"
    skipped = [n for n, o in outcomes.items() if o == "skipped"]
    assert any(n.startswith("tests/test_sft.py") for n in skipped)
    for nodeid in skipped:
        assert "needs exercise " in messages[nodeid], f"{nodeid}"
    assert sum(o == "passed" for o in outcomes.values()) > 20


def test_stage_command_names_the_unfinished_exercise(monkeypatch, tmp_path, capsys):
    from minirlhf import __main__ as cli
    from minirlhf import sft

    def stub(*args, **kwargs):
        raise NotImplementedError("Exercise: sft_loss — see the docstring")

    monkeypatch.setattr(sft, "sft_loss", stub)
    assert cli.main(["sft", "--fast", "--quiet", "--out", str(tmp_path / "sft")]) == 2
    assert "error: exercise sft_loss is not done yet (minirlhf/losses.py)" in capsys.readouterr().err


def test_round_trip_solutions_pass_the_tests_in_the_student_copy(kit, tmp_path):
    copy = tmp_path / "kit"
    shutil.copytree(kit, copy)
    restore(copy, {e.name for e in EXERCISES})
    run = run_pytest(copy, "-x", *RUN_FILES)
    assert run.returncode == 0, f"pytest output:\n{run.stdout[-3000:]}"


def test_no_working_reference_ships(kit):
    losses_text = (kit / "minirlhf" / "losses.py").read_text()
    tests_text = (kit / "tests" / "test_losses.py").read_text()
    assert "def gae_reference" not in losses_text and "gae_reference(" not in tests_text
    assert "log_softmax(logits, dim=-1).gather" not in tests_text
    assert "def test_token_logprobs_matches_log_softmax_gather" in tests_text, "the property part stays"
    assert not (kit / "minirlhf" / "course" / "cases.py").exists() and not (kit / "minirlhf" / "course" / "grade.py").exists()


def test_pytest_exercise_option_selects_one_exercise():
    run = run_pytest(REPO, "--exercise", "gae", "tests/test_losses.py")
    assert run.returncode == 0 and "8 passed" in run.stdout and "deselected" in run.stdout, f"pytest output:\n{run.stdout}"


# ---------------------------------------------------------------------------------------
# Inline checks: the solution passes, a deliberately wrong function fails.


class NoClipController(losses.AdaptiveKLController):
    def update(self, current_kl, n_steps):
        self.value *= 1.0 + (current_kl / self.target - 1.0) * n_steps / self.horizon
        return self.value


def _wrong_kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    rewards = -kl_coef * losses.kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards[:, -1] += scores  # the last column, not the last response token
    return rewards


def _wrong_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    advantages = (rewards - values) * mask  # forgets the future
    return advantages, advantages + values * mask


def _wrong_dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
               loss_type="sigmoid", label_smoothing=0.0):
    # Ignores loss_type and label_smoothing: plain DPO for everything.
    return losses.dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


WRONG = {
    "check_token_logprobs": (losses.token_logprobs, lambda logits, targets: logits.gather(
        -1, targets.unsqueeze(-1)).squeeze(-1)),
    "check_sft_loss": (losses.sft_loss, lambda logits, targets, mask: losses.sft_loss(logits, targets, mask * 0 + 1)),
    "check_bradley_terry_loss": (losses.bradley_terry_loss, lambda chosen_rewards, rejected_rewards: (
        -torch.log(torch.sigmoid(chosen_rewards - rejected_rewards)).mean(),
        {"accuracy": float((chosen_rewards >= rejected_rewards).float().mean())})),
    "check_ranking_loss": (losses.ranking_loss, lambda rewards: losses.bradley_terry_loss(rewards[:, :-1].flatten(),
                                                                                         rewards[:, 1:].flatten())),
    "check_kl_penalty": (losses.kl_penalty, lambda logprobs, ref_logprobs, estimator="k1": (
        torch.exp(ref_logprobs - logprobs) - 1 + logprobs - ref_logprobs
        if estimator == "k3" else losses.kl_penalty(logprobs, ref_logprobs, estimator))),
    "check_kl_penalized_rewards": (losses.kl_penalized_rewards, _wrong_kl_penalized_rewards),
    "check_gae": (losses.gae, _wrong_gae),
    "check_ppo_policy_loss": (losses.ppo_policy_loss, lambda logprobs, old_logprobs, advantages, mask, clip_eps=0.2:
                              losses.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=1e9)),
    "check_ppo_value_loss": (losses.ppo_value_loss, lambda values, old_values, returns, mask, clip_eps=0.2:
                             losses.ppo_value_loss(values, old_values, returns, mask, clip_eps=1e9)),
    "check_ppo_ptx_loss": (losses.ppo_ptx_loss, lambda rl_loss, ptx_logits, ptx_targets, ptx_mask, ptx_coef: (
        losses.ppo_ptx_loss(rl_loss, ptx_logits, ptx_targets, ptx_mask, -ptx_coef))),  # subtracts the NLL
    "check_dpo_loss": (losses.dpo_loss, _wrong_dpo),
    "check_adaptive_kl": (losses.AdaptiveKLController, NoClipController),
    "check_group_advantages": (losses.group_advantages, lambda rewards, scale_std=True, eps=1e-6, unbiased=False: (
        rewards - rewards.mean(1, keepdim=True)) / ((rewards.std(1, keepdim=True) + eps) if scale_std else 1)),  # always G−1
    "check_rloo_advantages": (losses.rloo_advantages, lambda rewards: rewards - rewards.mean(1, keepdim=True)),  # r_i kept
    "check_masked_aggregate": (losses.masked_aggregate, lambda x, mask, aggregation="token", max_tokens=None:
                               losses.masked_mean(x, mask)),  # token mean whatever the name
    "check_attention": (model.attention_reference, lambda q, k, v, mask: F.softmax(
        q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v),  # forgets the mask
}


def test_every_exercise_has_a_check_tested_here():
    assert set(WRONG) == {e.check for e in GRADED}


@pytest.mark.parametrize("check", sorted(WRONG))
def test_check_passes_the_solution_and_fails_a_wrong_function(check, capsys):
    solution, wrong = WRONG[check]
    assert getattr(checks, check)(solution) is True
    assert capsys.readouterr().out.startswith("✓ ")
    assert getattr(checks, check)(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("✗ ") and "expected:" in out and "got:" in out, f"check printed: {out}"


def test_check_reports_an_unfinished_exercise(capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError("Exercise: gae — see the docstring")

    assert checks.check_gae(stub) is False
    assert "not implemented yet (Exercise: gae" in capsys.readouterr().out


def test_checks_do_not_use_the_solutions():
    source = (REPO / "minirlhf" / "course" / "checks.py").read_text()
    assert "import minirlhf" not in source and "from minirlhf" not in source
