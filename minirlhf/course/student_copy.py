"""The student copy: the repository with every solution replaced by a stub.

Solutions live in the package itself, each between a `### BEGIN SOLUTION` line and a
`### END SOLUTION` line (nbgrader's markers, STYLE.md rule 8). `make_student` copies the
repository and replaces every such region by one line,
`raise NotImplementedError("Exercise: <name> — see the docstring")`, at the region's
indentation; in notebooks the same happens inside code cells. Two more marker pairs make
lines vanish from the copy: `### BEGIN HIDDEN TESTS` … `### END HIDDEN TESTS` (tests the
instructor keeps) and `### BEGIN INSTRUCTOR ONLY` … `### END INSTRUCTOR ONLY` (anything
else that would hand a student a working answer: a naive reference implementation, a
test's one-line expected value). The grader's own files (INSTRUCTOR_ONLY) never ship.

Deliberate simplifications: regions are found line by line (no parsing); the enclosing
function is the nearest `def` above the region with a smaller indentation.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from minirlhf.course.exercises import EXERCISES, ExerciseError

REPO = Path(__file__).resolve().parent.parent.parent
SOLUTION = ("### BEGIN SOLUTION", "### END SOLUTION")
HIDDEN = ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")
INSTRUCTOR = ("### BEGIN INSTRUCTOR ONLY", "### END INSTRUCTOR ONLY")
STAMP = ".minirlhf-student.json"  # written into every student copy; marks it as one
INSTRUCTOR_ONLY = ("tests/test_exercises.py", "docs/instructor.md", "minirlhf/course/cases.py",
                   "minirlhf/course/grade.py", "minirlhf/course/sandbox.py", "minirlhf/course/child.py",
                   "minirlhf/course/gradebook.py")  # never copied to students
IGNORED = {".git", "runs", "__pycache__", ".venv", "venv", ".pytest_cache", ".ipynb_checkpoints"}


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
    """[(kind, first, last, indent, name)] for each region: kind "solution", "hidden" or
    "instructor",
    first/last the 0-based lines of its markers, name the enclosing function (or None)."""
    lines, regions, open_region = text.splitlines(), [], None
    markers = {SOLUTION[0]: ("solution", True), SOLUTION[1]: ("solution", False),
               HIDDEN[0]: ("hidden", True), HIDDEN[1]: ("hidden", False),
               INSTRUCTOR[0]: ("instructor", True), INSTRUCTOR[1]: ("instructor", False)}
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
    if regions[-1][0] != "solution" and text.endswith("\n"):
        text = text.rstrip() + "\n"  # a vanished region at the end leaves no trailing blank lines
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
3. Check it in a notebook: `from minirlhf.course.checks import check_sft_loss; check_sft_loss(sft_loss)`
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
