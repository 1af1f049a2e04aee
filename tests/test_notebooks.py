"""The course notebooks: each runs top to bottom, and each is committed clean.

- test_notebook_runs[solution-…]: executes every notebook in notebooks/ headless with
  nbclient (kernel python3, working directory notebooks/), in fast mode: MINIRLHF_FAST=1 and
  OMP_NUM_THREADS=1 in the kernel's environment, run folders in one temporary folder for the
  session (MINIRLHF_NOTEBOOK_RUNS), so later notebooks reuse the earlier ones' tiny models as a
  student's do. A failing cell fails the test with the cell's source and the traceback; no
  cell may print course.SKIP_MARK (nothing is unfinished here); a cell that calls plt.show()
  must have displayed a figure.
- test_notebook_runs[student-…]: the same in a fresh student copy (`make-student`, nothing
  solved), in order 00 → 05: every notebook runs to its end; a cell may only be skipped (one
  line, course.SKIP_MARK) for an exercise of this notebook or an earlier one, or for what such
  a cell would have made — never for a later notebook's exercise; every exercise check cell
  of a notebook exercise is skipped (the copy really is unsolved).
- test_notebooks_are_committed_without_outputs: no outputs, no execution counts.
- test_first_code_cell_reads_the_fast_flag: every notebook picks its sizes from
  MINIRLHF_FAST in its first code cell.
- test_exercise_cells_are_not_needed_later: a function defined in a notebook's exercise
  cell (between solution markers) is used only by the cell right after it, so in a student
  copy every later cell still runs while the exercise is unfinished. The student copy
  itself must be generated without error.
"""
import ast
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def read(path):
    return nbformat.read(path, as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7, f"expected the course notebooks 00-06 in {NOTEBOOK_DIR}, found {NOTEBOOKS}"


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory):
    """One run folder per kit for the whole session: notebooks reuse each other's tiny models."""
    return {"solution": tmp_path_factory.mktemp("notebook-runs"), "student": tmp_path_factory.mktemp("student-runs")}


@pytest.fixture(scope="session")
def student_kit(tmp_path_factory):
    """A fresh student copy of this repository, nothing solved."""
    from minirlhf.course.student_copy import make_student
    out = tmp_path_factory.mktemp("student") / "kit"
    make_student(out)
    return out


def execute(path, runs):
    """The executed notebook, or (notebook, error) when a cell failed."""
    notebook = read(path)
    env = {**os.environ, "MINIRLHF_FAST": "1", "OMP_NUM_THREADS": "1", "MINIRLHF_NOTEBOOK_RUNS": str(runs),
           "PYTHONPATH": os.pathsep.join(p for p in (str(path.parent.parent), os.environ.get("PYTHONPATH")) if p)}
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(failure_message(path, notebook, error), pytrace=False)
    except nbclient.exceptions.CellTimeoutError as error:
        pytest.fail(f"{path.name}: a cell ran longer than {CELL_TIMEOUT_S} s in fast mode\n{error}", pytrace=False)
    return notebook


def printed(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


SKIP_MARK = "⏭ skipped:"   # notebooks/course.py SKIP_MARK


# Each kit's notebooks reuse each other's runs (notebook_runs), so under xdist (`pytest -n 2`)
# a kit's notebooks run in order in one process; the two kits run side by side.
KITS = [pytest.param(kit, marks=pytest.mark.xdist_group(f"notebooks-{kit}")) for kit in ("solution", "student")]


@pytest.mark.parametrize("kit", KITS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kit, notebook_runs, request):
    if kit == "student":
        path = request.getfixturevalue("student_kit") / "notebooks" / path.name
    notebook = execute(path, notebook_runs[kit])
    skips = {i: printed(cell) for i, cell in enumerate(notebook.cells) if SKIP_MARK in printed(cell)}
    if kit == "solution":
        assert not skips, f"{path.name}: cells {sorted(skips)} were skipped in the solution kit: {skips}"
        blank = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" and "plt.show()" in cell.source
                 and not any("image/png" in output.get("data", {}) for output in cell.outputs)]
        assert not blank, (f"{path.name}: cells {blank} call plt.show() but displayed no figure (did a stage switch "
                           "matplotlib to the Agg backend? see notebooks/course.py keep_plot_backend)")
        return
    from minirlhf.course.exercises import EXERCISES
    order = {e.name: e.notebook for e in EXERCISES}
    for i, text in skips.items():
        for line in (l for l in text.splitlines() if SKIP_MARK in l):
            named = re.search(r"the exercise `([^`]+)`", line)
            if named:
                assert named.group(1) in order, f"{path.name}: cell {i} names an unknown exercise: {line}"
                assert Path(order[named.group(1)]).name <= path.name, (
                    f"{path.name}: cell {i} needs `{named.group(1)}` from the later {order[named.group(1)]}")
            else:
                assert "unfinished:" in line, f"{path.name}: cell {i} skipped for no exercise: {line}"
    sources = [cell.source for cell in notebook.cells]
    for i, source in enumerate(sources):
        if 'raise NotImplementedError("Exercise:' in source and notebook.cells[i].cell_type == "code":
            check = next(j for j in range(i + 1, len(sources)) if notebook.cells[j].cell_type == "code")
            assert check in skips, f"{path.name}: the check after exercise cell {i} ran in an unsolved copy"


def failure_message(path, notebook, error):
    """The failing cell's number, the head of its source, and its traceback without colours."""
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                head = "\n".join(cell.source.splitlines()[:15])
                trace = ANSI.sub("", "\n".join(output.get("traceback", [])))
                return (f"{path.name}: cell {index} failed with {output.get('ename')}: {output.get('evalue')}\n"
                        f"--- cell source (first lines) ---\n{head}\n--- traceback ---\n{trace}")
    return f"{path.name}: {ANSI.sub('', str(error))}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path):
    dirty = [i for i, cell in enumerate(code_cells(read(path))) if cell.outputs or cell.execution_count is not None]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs or execution counts; clear them before "
                       "committing (Jupyter: Edit > Clear Outputs of All Cells)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_reads_the_fast_flag(path):
    first = code_cells(read(path))[0].source
    assert 'FAST = os.environ.get("MINIRLHF_FAST") == "1"' in first, f"{path.name}: the first code cell must set FAST"


def defined_functions(source):
    return {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}


def used_names(source):
    return {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercise_cells_are_not_needed_later(path):
    from minirlhf.course.student_copy import strip_notebook
    _, stubbed = strip_notebook(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    sources = [cell.source for cell in code_cells(read(path))]
    exercise_cells = [i for i, source in enumerate(sources) if "### BEGIN SOLUTION" in source]
    assert len(exercise_cells) == len(stubbed) <= 2, f"{path.name}: at most two exercise cells per notebook"
    for i in exercise_cells:
        names = defined_functions(sources[i])
        assert names, f"{path.name}: exercise cell {i} should define the function the student writes"
        for j in range(i + 2, len(sources)):
            late = names & used_names(sources[j])
            assert not late, (f"{path.name}: code cell {j} uses {sorted(late)} from exercise cell {i}; only the "
                              "check right after the exercise may, or the student copy breaks later cells")
