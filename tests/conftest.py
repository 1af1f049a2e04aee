"""Test hooks for the exercises (the list is minirlhf/exercises.py's EXERCISES).

  - `python -m pytest --exercise NAME` runs only the tests of that exercise (repeatable).
  - A test that runs into an unfinished exercise (a stub's `NotImplementedError("Exercise:
    NAME …")`) fails if it is one of NAME's tests, and is skipped otherwise, with a reason
    naming NAME: in a student copy, `python -m pytest` fails exactly the tests of the
    unfinished exercises; whole-stage smoke runs wait, skipped, until their exercises are done.
  - With MINIRLHF_GRADE_REPORT=PATH set (tests/test_exercises.py reads it), every test's
    outcome is written to PATH as JSON when the session ends. The grader does not use it:
    it runs student code only in its sandbox (minirlhf/course/grade.py).
"""
import json
import os

import pytest

from minirlhf.course import exercises


def pytest_addoption(parser):
    parser.addoption("--exercise", action="append", default=[], metavar="NAME",
                     help="run only the tests of this exercise (see the exercise list in README.md)")


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--exercise")
    if not wanted:
        return
    for name in wanted:
        try:
            exercises.get(name)
        except exercises.ExerciseError as e:
            raise pytest.UsageError(str(e)) from None
    keep = [item for item in items if set(exercises.exercises_of(item.nodeid)) & set(wanted)]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


def _skip_if_another_exercise(item, exc):
    name = exercises.unfinished_exercise(exc)
    if name is not None and name not in exercises.exercises_of(item.nodeid):
        pytest.skip(f"needs exercise {name}, which is not done yet")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    try:
        return (yield)
    except NotImplementedError as exc:
        _skip_if_another_exercise(item, exc)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except NotImplementedError as exc:
        _skip_if_another_exercise(item, exc)
        raise


# ---------------------------------------------------------------------------
# The grading report

_report = {"outcomes": {}, "messages": {}, "collection_errors": []}


def pytest_collectreport(report):
    if report.failed:
        _report["collection_errors"].append(report.nodeid)


def pytest_runtest_logreport(report):
    outcomes = _report["outcomes"]
    if report.failed:
        outcomes[report.nodeid] = "failed"
        crash = getattr(report.longrepr, "reprcrash", None)
        _report["messages"][report.nodeid] = crash.message[:300] if crash else str(report.longrepr)[-300:]
    elif report.skipped and outcomes.get(report.nodeid) != "failed":
        outcomes[report.nodeid] = "skipped"
        if isinstance(report.longrepr, tuple):
            _report["messages"][report.nodeid] = report.longrepr[2]
    elif report.when == "call" and report.passed:
        outcomes.setdefault(report.nodeid, "passed")


def pytest_sessionfinish(session):
    path = os.environ.get("MINIRLHF_GRADE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_report, f, indent=1)
