"""Test hooks for the exercises (the list is minirlhf/exercises.py's EXERCISES).

  - `python -m pytest --exercise NAME` runs only the tests of that exercise (repeatable).
  - A test that runs into an unfinished exercise (a stub's `NotImplementedError("Exercise:
    NAME …")`) fails if it is one of NAME's tests, and is skipped otherwise, with a reason
    naming NAME: in a student copy, `python -m pytest` fails exactly the tests of the
    unfinished exercises; whole-stage smoke runs wait, skipped, until their exercises are done.
  - With MINIRLHF_GRADE_REPORT=PATH set (tests/test_exercises.py reads it), every test's
    outcome is written to PATH as JSON when the session ends. The grader does not use it:
    it runs student code only in its sandbox (minirlhf/course/grade.py).
  - `python -m pytest -n 2` (pytest-xdist, requirements-test.txt) runs the tests in two
    processes of one thread each, one per core of a 2-core laptop. Tests that share a
    module- or session-scoped fixture run in one process, so it is built once, and the
    notebooks of each kit run in order in one process (tests/test_notebooks.py marks them).
    Without -n, nothing here changes how the tests run.
"""
import json
import os

import pytest
import torch

from minirlhf.course import exercises


def pytest_addoption(parser):
    parser.addoption("--exercise", action="append", default=[], metavar="NAME",
                     help="run only the tests of this exercise (see the exercise list in README.md)")


@pytest.hookimpl(tryfirst=True)   # before xdist's worker reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = _shared_fixture_group(item)
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))
    if config.getoption("loadgroup", False):   # an xdist worker under --dist loadgroup
        items.sort(key=_start_order)
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


# ---------------------------------------------------------------------------
# Running in parallel (pytest-xdist)

def pytest_configure(config):
    # `-n 2` alone means `--dist load`, which sends each test anywhere and ignores the
    # xdist_group marks; the groups below are what keeps shared work from being done twice.
    if config.getoption("dist", "no") == "load":
        config.option.dist = "loadgroup"
        config.option.loadscopereorder = False   # keep _start_order's order, not "most tests first"
    if hasattr(config, "workerinput") and config.workerinput.get("minirlhf_dist") == "loadgroup":
        config.option.loadgroup = True           # what xdist sets itself for an explicit --dist loadgroup
    # A worker is one of two processes on two cores: one thread each, or they oversubscribe
    # the cores. Its subprocesses (CLI runs, notebook kernels) inherit the setting; a
    # user's own OMP_NUM_THREADS wins.
    if hasattr(config, "workerinput") and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)   # an xdist hook: unknown, and never called, without xdist
def pytest_configure_node(node):
    # A worker parses the command line again, where `-n 2` alone still means --dist load:
    # tell it the mode decided above, so that it labels its tests with their groups.
    node.workerinput["minirlhf_dist"] = node.config.getoption("dist")


def _start_order(item):
    """Longest work first, so the two processes finish together: the two kits' notebook runs
    (one per process from the start), then the other groups, then single tests to fill in."""
    mark = item.get_closest_marker("xdist_group")
    return 2 if mark is None else 0 if mark.args[0].startswith("notebooks-") else 1


def _shared_fixture_group(item):
    """The test's file, when the test uses a module- or session-scoped fixture of ours
    (not pytest's own, like tmp_path_factory): built once per process, so its users
    belong in one process."""
    for defs in item._fixtureinfo.name2fixturedefs.values():
        if defs[-1].scope != "function" and defs[-1].baseid:
            return item.nodeid.split("::")[0]
    return None


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
    # Under xdist the workers' reports reach the main process's hooks above: it alone writes.
    if path and not hasattr(session.config, "workerinput"):
        with open(path, "w") as f:
            json.dump(_report, f, indent=1)
