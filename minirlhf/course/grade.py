"""Grade one submission: run its functions in the sandbox, compare here, explain.

The parent builds a plan once (minirlhf/course/cases.py: the calls of every check and the
expected answers: hand-computed values, and the instructor's solution run here on the
same calls), sends only the calls to the child (minirlhf/course/sandbox.py), and scores
what comes back. An exercise scores 1 when every one of its checks passes and 0
otherwise; its feedback names the first check that failed and gives that check's hint.
Where the exercise is writing something by hand (attention), the student's source is
read here, never run here, and the library shortcut is refused.
"""
import ast
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minirlhf.course import cases, checks, child, sandbox
from minirlhf.course.exercises import EXERCISES, ExerciseError

REPO = Path(__file__).resolve().parent.parent.parent
DYNAMIC = {"getattr", "eval", "exec", "compile", "__import__", "importlib", "globals", "vars", "__dict__",
           "__getattribute__", "import_module"}


# ---------------------------------------------------------------------------------------
# The plan: calls to send, answers to expect (computed once per grading run).


def make_plan(seed=0, only=None, limit_s=None):
    """[(grading, expected answers per check)] for the exercises in `only` (all if None);
    `limit_s` replaces every exercise's time limit."""
    plan, gradings = [], cases.grading(seed)
    for e in EXERCISES:
        if only and e.name not in only:
            continue
        if e.name not in gradings:
            raise ExerciseError(f"no grading cases for exercise {e.name} in minirlhf/course/cases.py")
        grading, solution = gradings[e.name], None
        if limit_s is not None:
            grading.limit_s = limit_s
        expected = []
        for check in grading.checks:
            if check.kind == "hand":
                expected.append(check.expected)
            elif check.kind == "reference":
                solution = solution or _solution(grading)
                expected.append([_named(grading.style, child.decode(child.run_call(solution, call)), keys=check.keys)
                                 for call in check.calls])
            else:
                expected.append(None)
        plan.append((grading, expected))
    return plan


def _solution(grading):
    if grading.notebook:
        return child.notebook_function(REPO / grading.notebook, grading.attr)
    module = __import__(grading.module, fromlist=["_"])
    return getattr(module, grading.attr)


def jobs_of(plan):
    """What the child is told: per exercise, every call of every check, encoded."""
    jobs = []
    for grading, _ in plan:
        calls = [{**{k: v for k, v in call.items() if k not in ("args", "init")},
                  "args": {k: child.encode(v) for k, v in call.get("args", {}).items()},
                  **({"init": child.encode(call["init"])} if "init" in call else {})}
                 for check in grading.checks for call in check.calls]
        jobs.append({"name": grading.name, "module": grading.module, "attr": grading.attr,
                     "notebook": grading.notebook, "calls": calls, "limit_s": grading.limit_s})
    return jobs


# ---------------------------------------------------------------------------------------
# Naming and comparing outputs.


def _named(style, decoded, keys=None):
    """{output name: value} of one call's decoded result, or {"error": reason}."""
    if not isinstance(decoded, dict) or "error" in decoded or "value" not in decoded:
        return {"error": str(decoded.get("error", "no value")) if isinstance(decoded, dict) else "no value"}
    value, named = decoded["value"], {}
    if style == "loss":
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)):
            return {"error": f"expected a (loss, metrics) pair, got {_kind(value)}"}
        named = {"loss": value[0], **value[1]}
    elif style == "pair":
        if not (isinstance(value, tuple) and len(value) == 2):
            return {"error": f"expected (advantages, returns), got {_kind(value)}"}
        named = {"advantages": value[0], "returns": value[1]}
    elif style == "controller":
        for i, pair in enumerate(value if isinstance(value, tuple) else ()):
            if isinstance(pair, tuple) and len(pair) == 2:
                named[f"update {i + 1} returns"], named[f"value after {i + 1}"] = pair
    else:
        named = {"output": value}
    named = {k: _tensor(v) for k, v in named.items()}
    if keys:
        named = {k: v for k, v in named.items() if k in keys}
    for name, grad in (decoded.get("grads") or {}).items():
        named[f"gradient wrt {name}"] = _tensor(grad)
    return named


def _tensor(value):
    if isinstance(value, np.ndarray) and value.dtype != object:
        return torch.as_tensor(value.astype(np.float64))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return torch.tensor(value, dtype=torch.float64)
    return value


def _kind(value):
    return f"a {type(value).__name__}" if not isinstance(value, child.Unreadable) else repr(value)


def _compare(got, expected, tol):
    """None if every expected output matches, else a reason naming the first that does not."""
    if "error" in got:
        return got["error"]
    for key, want in expected.items():
        if key not in got:
            return f"returned no {key!r}"
        have = got[key]
        if isinstance(have, child.Unreadable):
            return f"{key}: got {have!r}, not numbers"
        want = _tensor(want)
        problem = checks._differs(have, want, tol)
        if problem:
            if problem == "values differ" and _small(want):
                problem += f": expected {checks._show(want)}, got {checks._show(have)}"
            return f"{key}: {problem}"
    return None


def _small(value):
    return not isinstance(value, torch.Tensor) or value.numel() <= 8


# ---------------------------------------------------------------------------------------
# The shortcut: hand-written attention must not call the library's.


def refused_shortcut(student, grading, exercise_file):
    """A reason when the student's function uses a forbidden name or a dynamic lookup, else None."""
    if not grading.forbidden:
        return None
    path = Path(student) / exercise_file
    try:
        if path.is_symlink() or path.stat().st_size > sandbox.MAX_FILE_BYTES:
            return None
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return None  # the child reports what is wrong with the file
    functions = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    todo, seen, words = [grading.attr], set(), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        body = functions[name].body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring may name the library function it is the reference of
        for node in (n for stmt in body for n in ast.walk(stmt)):
            word = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                    else node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None)
            if word is not None:
                words.add(word)
            if isinstance(node, ast.Name):
                todo.append(node.id)  # a helper it calls is read too
    used = sorted({w for w in words for f in grading.forbidden if f in w})
    if used:
        return (f"refused: {grading.attr} calls the library's attention ({', '.join(used)}); the exercise is to "
                "write it by hand with matrix products, a mask and a softmax")
    dynamic = sorted(words & DYNAMIC)
    if dynamic:
        return (f"refused: {grading.attr} looks names up at run time ({', '.join(dynamic)}); write the attention "
                "with plain tensor operations")
    return None


# ---------------------------------------------------------------------------------------
# One submission.


def grade_submission(student, plan=None, seed=0, hidden=(), isolate=True, echo=None):
    """Grade the submission in folder `student`; returns its record (no file is written)."""
    started = time.time()
    student = Path(student)
    plan = plan or make_plan(seed)
    by_name = {e.name: e for e in EXERCISES}
    results, info = sandbox.run_exercises(student, jobs_of(plan), hidden=hidden, isolate=isolate)
    rows = []
    for grading, expected in plan:
        e = by_name[grading.name]
        row = {"name": e.name, "file": e.file, "difficulty": e.difficulty, "notebook": e.notebook}
        result = results.get(e.name, {"error": "not run"})
        refused = refused_shortcut(student, grading, e.file)
        if grading.forbidden and not refused and result.get("sdpa_calls"):  # the child's counter, a second look
            refused = (f"refused: {grading.attr} called F.scaled_dot_product_attention while it ran; the exercise "
                       "is to write the attention by hand")
        row.update(_score(grading, expected, result, info, refused))
        rows.append(row)
    points = sum(r["score"] for r in rows)
    record = {
        "student_dir": str(student), "graded_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seed": seed,
        "exercises": rows,
        "total": {"points": points, "max_points": len(rows), "score": points / max(len(rows), 1),
                  "checks_passed": sum(r["checks_passed"] for r in rows), "checks": sum(r["checks"] for r in rows)},
        "sandbox": info["sandbox"], "notes": info["notes"] + _syntax_notes(info), "children": info["children"],
        "seconds": round(time.time() - started, 1), "log_tail": info["log_tail"][-1500:],
    }
    if echo:
        echo(format_grade(record))
    return record


def _score(grading, expected, result, info, refused):
    """The exercise's score, feedback and per-check results (text from the child made printable)."""
    row = _scored(grading, expected, result, info, refused)
    row["feedback"] = printable(row["feedback"])
    for r in row["results"]:
        r.update({k: printable(r[k]) for k in ("reason", "title") if k in r})
    return row


def printable(text):
    """`text` without control characters: a student's error message cannot drive the terminal."""
    return "".join(c if c.isprintable() else " " for c in str(text))


def _scored(grading, expected, result, info, refused):
    n = len(grading.checks)
    failed = {"score": 0.0, "passed": False, "checks_passed": 0, "checks": n}
    reason = refused or _error_reason(grading, result, info)
    if reason:
        return {**failed, "feedback": reason, "results": []}
    outputs, i, results = result["calls"], 0, []
    for check, want in zip(grading.checks, expected):
        answers, i = outputs[i:i + len(check.calls)], i + len(check.calls)
        crashed = problem = None
        try:  # the answers came from the student's process: anything unreadable fails the check
            got = [_named(grading.style, child.decode(o)) for o in answers]
            crashed = next((g["error"] for g in got if "error" in g), None)
            if len(got) < len(check.calls):
                problem = "no answer"
            elif crashed:
                problem = crashed
            elif check.kind == "property":
                problem = check.verify(got, [{"args": call["args"]} for call in check.calls])
            else:
                problem = next((p for g, w in zip(got, want) if (p := _compare(g, w, check.tol))), None)
        except Exception as e:
            problem = f"an answer that cannot be read as numbers ({type(e).__name__})"
        results.append({"kind": check.kind, "title": check.title, "passed": problem is None,
                        **({"reason": problem, "hint": check.hint, "raised": bool(crashed)} if problem else {})})
    passed = sum(r["passed"] for r in results)
    if passed == n:
        return {"score": 1.0, "passed": True, "checks_passed": n, "checks": n,
                "feedback": f"all {n} checks pass (hand-computed, properties, reference)", "results": results}
    first = next(r for r in results if not r["passed"])
    if first["reason"].startswith("not done yet"):
        return {**failed, "feedback": "not done yet (the stub still raises NotImplementedError)", "results": results}
    if first["raised"]:  # the function raised: the error and where, not a hint about the maths
        return {**failed, "checks_passed": passed, "feedback": f"{first['reason']} (on {first['kind']} check "
                f"'{first['title']}')", "results": results}
    feedback = f"{first['kind']} check '{first['title']}' fails: {first['reason']}. Hint: {first['hint']}"
    return {**failed, "checks_passed": passed, "feedback": feedback, "results": results}


def score_in_process(grading, expected, fn):
    """Score `fn` as the child would, but here: for the instructor's own checks and tests
    (never for a student's code, which runs only in the sandbox)."""
    result = {"calls": [child.run_call(fn, call) for call in jobs_of([(grading, expected)])[0]["calls"]]}
    return _score(grading, expected, result, {"syntax": [], "imports": {}}, None)


def _error_reason(grading, result, info):
    """Why the exercise has no outputs to compare (syntax, import, timeout, crash), or None."""
    top = grading.attr.split(".")[0]
    for event in info["syntax"]:
        if top in event.get("names", []) or (not event.get("names") and _same_module(grading, event)):
            return _syntax_line(event)
    if grading.module in info["imports"]:
        return f"the package does not import: {info['imports'][grading.module]}"
    if "error" in result:
        return result["error"]
    if not isinstance(result.get("calls"), list):
        return "no answer from the child"
    return None


def _same_module(grading, event):
    return grading.module and str(event.get("file", "")).replace("/", ".").removesuffix(".py") == grading.module


def _syntax_line(event):
    return (f"{event.get('kind', 'SyntaxError')} in {Path(str(event.get('file'))).name} line {event.get('line')}: "
            f"{str(event.get('message'))[:200]}")


def _syntax_notes(info):
    return [_syntax_line(e) for e in info["syntax"]]


def format_grade(record):
    """The record as a table for the terminal, with the feedback of each failed exercise."""
    lines = [f"grade of {record['student_dir']} ({record['seconds']} s)",
             f"  {'exercise':<29} {'difficulty':<10} {'notebook':<20} {'checks':>7} {'score':>5}"]
    for r in record["exercises"]:
        lines.append(f"  {r['name']:<29} {'★' * r['difficulty']:<10} {Path(r['notebook']).stem[:20]:<20} "
                     f"{r['checks_passed']:>3}/{r['checks']:<3} {r['score']:>5.0f}")
        if not r["passed"]:
            lines.append(f"      {r['feedback']}")
    t = record["total"]
    lines.append(f"  total: {t['points']:.0f} of {t['max_points']} exercises = {100 * t['score']:.1f} %")
    for note in record["notes"]:
        lines.append(f"  note: {note}")
    weak = {k: v for k, v in record["sandbox"].items() if "not isolated" in v or "partly" in v or "kept" in v}
    for k, v in weak.items():
        lines.append(f"  sandbox: {k} {v}")
    return "\n".join(lines)


def write_private(path, text):
    """Write `text` to `path` atomically, never through a symlink planted at either name."""
    path = Path(path)
    if path.is_symlink():
        raise ExerciseError(f"{path} is a symlink: refusing to write a grade through it")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
