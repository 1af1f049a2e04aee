"""Grade a class: a folder of submissions (folders or .zip files) into one CSV gradebook.

Each entry of the folder is one student: a folder holding a student copy (or holding one
folder that does), or a .zip of one. Archives are unpacked here with limits (count, size)
and refused when a member would land outside its folder (an absolute path, `..`, a
symlink). Every entry gets a row, a broken one with the reason in `notes`, and a feedback
file; one broken submission never stops the others. Several submissions are graded at
once (one child process each), as many as there are cores.
"""
import csv
import io
import json
import os
import re
import stat
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from minirlhf.course import grade
from minirlhf.course.sandbox import SubmissionError

MAX_MEMBERS = 5000
MAX_UNPACKED_BYTES = 200 << 20


# ---------------------------------------------------------------------------------------
# Finding and unpacking submissions.


def find_kit(folder):
    """The folder that holds minirlhf/: `folder` itself, or its only subfolder (two levels at most)."""
    folder = Path(folder)
    for _ in range(3):
        if (folder / "minirlhf").is_dir() and not (folder / "minirlhf").is_symlink():
            return folder
        subs = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(subs) != 1 or not subs[0].is_dir() or subs[0].is_symlink():
            break
        folder = subs[0]
    raise SubmissionError("empty submission" if not any(Path(folder).iterdir()) else
                          "not a kit: no minirlhf/ package found")


def unpack(archive, dest):
    """Unpack the .zip `archive` into `dest` (regular files only); SubmissionError says why not."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if not members:
                raise SubmissionError("empty archive")
            if len(members) > MAX_MEMBERS or sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
                raise SubmissionError(f"archive too large (over {MAX_MEMBERS} files or {MAX_UNPACKED_BYTES >> 20} MB)")
            for m in members:
                parts = Path(m.filename.replace("\\", "/")).parts
                if (m.filename.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", m.filename)
                        or stat.S_ISLNK(m.external_attr >> 16)):
                    raise SubmissionError(f"archive writes outside its folder ({m.filename[:80]!r}): refused")
            for m in members:
                if m.is_dir():
                    continue
                target = dest / Path(m.filename.replace("\\", "/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "xb") as out:  # x: never through an existing name
                    out.write(src.read(MAX_UNPACKED_BYTES))
    except SubmissionError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise SubmissionError(f"unreadable archive ({type(e).__name__}: {str(e)[:120]})") from None
    return find_kit(dest)


def submissions(root):
    """[(student name, path)] for every entry of `root` but hidden files, sorted by name."""
    return [(p.stem if p.suffix == ".zip" else p.name, p) for p in sorted(Path(root).iterdir())
            if not p.name.startswith(".")]


# ---------------------------------------------------------------------------------------
# The class.


def grade_class(root, out, seed=0, jobs=None, isolate=True, only=None, limit_s=None, progress=True):
    """Grade every submission in `root`; write out/gradebook.csv and out/<student>.txt/.json.
    Returns the gradebook rows."""
    from tqdm import tqdm
    root, out = Path(root).resolve(), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = grade.make_plan(seed, only, limit_s)
    hidden = [grade.REPO, root, out]
    entries = submissions(root)
    jobs = jobs or max(1, os.cpu_count() or 1)
    rows = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_grade_one, name, path, plan, seed, hidden, isolate): name for name, path in entries}
        bar = tqdm(total=len(futures), desc="grading", unit="student", disable=not progress)
        for future in as_completed(futures):
            name = futures[future]
            record = future.result()
            rows[name] = _row(name, record)
            stem = _safe(name)
            grade.write_private(out / f"{stem}.json", json.dumps(record, indent=1) + "\n")
            grade.write_private(out / f"{stem}.txt", feedback_text(name, record))
            bar.update(1)
        bar.close()
    ordered = [rows[name] for name, _ in entries]
    grade.write_private(out / "gradebook.csv", gradebook_csv(ordered, [g.name for g, _ in plan]))
    return ordered


def _grade_one(name, path, plan, seed, hidden, isolate):
    started = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="minirlhf-unpack-") as tmp:
            if path.is_symlink():
                raise SubmissionError("a symlink, not a submission")
            if path.is_dir():
                kit = find_kit(path)
            elif path.suffix == ".zip":
                kit = unpack(path, Path(tmp))
            else:
                raise SubmissionError("neither a folder nor a .zip file")
            record = grade.grade_submission(kit, plan=plan, seed=seed, hidden=hidden, isolate=isolate)
    except SubmissionError as e:
        record = {"student_dir": str(path), "exercises": [], "error": str(e), "notes": [str(e)],
                  "total": {"points": 0.0, "max_points": len(plan), "score": 0.0}}
    except Exception as e:  # a bug of the grader on one submission must not stop the class
        record = {"student_dir": str(path), "exercises": [], "error": f"grader error: {type(e).__name__}: {e}",
                  "notes": [f"grader error: {type(e).__name__}: {e}"],
                  "total": {"points": 0.0, "max_points": len(plan), "score": 0.0}}
    record["student"] = name
    record["seconds"] = round(time.time() - started, 1)
    return record


def _safe(name):
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80] or "student"


def _cell(text):
    """A CSV cell that a spreadsheet will not run as a formula."""
    text = str(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _row(name, record):
    scores = {r["name"]: r["score"] for r in record.get("exercises", [])}
    rows = [r for r in record.get("exercises", []) if not r["passed"]]
    todo = [r["name"] for r in rows if r["feedback"].startswith("not done yet")]
    failed = ([f"not done: {', '.join(todo)}"] if todo else []) + [
        f"{r['name']}: {r['feedback']}" for r in rows if r["name"] not in todo]
    return {"student": name, "scores": scores, "points": record["total"]["points"],
            "max_points": record["total"]["max_points"], "seconds": record.get("seconds", 0.0),
            "notes": " | ".join(record.get("notes", []) + failed)}


def gradebook_csv(rows, names):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["student", *names, "total", "percent", "seconds", "notes"])
    for row in rows:
        writer.writerow([_cell(row["student"]), *[f"{row['scores'][n]:g}" if n in row["scores"] else "" for n in names],
                         f"{row['points']:g}", f"{100 * row['points'] / max(row['max_points'], 1):.1f}",
                         row["seconds"], _cell(row["notes"][:2000])])
    return buffer.getvalue()


def feedback_text(name, record):
    """The per-student feedback file: the score, and per exercise what failed and a hint."""
    lines = [f"Feedback for {name}", ""]
    if record.get("error"):
        return "\n".join(lines + [f"Not graded: {record['error']}", ""])
    t = record["total"]
    lines.append(f"Score: {t['points']:g} of {t['max_points']} exercises ({100 * t['score']:.1f} %)")
    lines.append("An exercise scores 1 when all its checks pass: hand-computed values, properties, and the "
                 "reference on random inputs.")
    lines.append("")
    for r in record["exercises"]:
        mark = "✓" if r["passed"] else "✗"
        lines.append(f"{mark} {r['name']} ({r['file']}): {r['feedback']}")
    lines += [f"note: {n}" for n in record.get("notes", [])]
    return "\n".join(lines) + "\n"
