"""Run a submission's functions in a child process and collect what they return.

The parent (this module) never imports student code. It copies the submission's package
and notebooks (regular files only: a symlink could point at the instructor's files) into
a fresh temporary folder with its own HOME and TMPDIR, starts minirlhf/course/child.py
there with a stripped environment, and reads the child's events from a pipe, one JSON line
each. Every exercise has its own deadline: when one runs past it, the child is killed, the
exercise is marked "timed out after N s", and a fresh child runs the exercises after it.
A child that dies mid-exercise (os._exit, a crash, the CPU or memory limit) fails that
exercise and no other.
"""
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minirlhf.course.exercises import ExerciseError

CHILD = Path(__file__).with_name("child.py")
MAX_FILE_BYTES = 2 << 20  # a package or notebook file larger than this is not copied
MAX_EVENT_BYTES = 8 << 20  # the child may send this much in all
IMPORT_LIMIT_S = 60.0  # starting python, torch and the student's package (a contended machine is slow)


class SubmissionError(ExerciseError):
    """A submission that cannot be graded at all (not a kit, unreadable)."""


# ---------------------------------------------------------------------------------------
# The temporary copy.


def copy_submission(student, kit):
    """Copy student/minirlhf/**.py and student/notebooks/*.ipynb into kit (regular files
    only, never through a symlink). Returns the notes about what was left out."""
    student, notes = Path(student), []
    package = student / "minirlhf"
    if package.is_symlink() or not (package / "__init__.py").is_file() or (package / "__init__.py").is_symlink():
        raise SubmissionError("not a kit: no minirlhf/ package with an __init__.py")
    for top, pattern in (("minirlhf", ".py"), ("notebooks", ".ipynb")):
        root = student / top
        if root.is_symlink() or not root.is_dir():
            continue
        for folder, dirs, files in os.walk(root, followlinks=False):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not (Path(folder) / d).is_symlink()]
            for name in files:
                src = Path(folder) / name
                if not name.endswith(pattern):
                    continue
                info = os.lstat(src)
                if not stat.S_ISREG(info.st_mode):
                    notes.append(f"{src.relative_to(student)} is not a regular file: left out")
                    continue
                if info.st_size > MAX_FILE_BYTES:
                    notes.append(f"{src.relative_to(student)} is over {MAX_FILE_BYTES >> 20} MB: left out")
                    continue
                dst = kit / src.relative_to(student)
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as f:
                    data = f.read(MAX_FILE_BYTES + 1)
                dst.write_bytes(data)
    return notes


# ---------------------------------------------------------------------------------------
# The child, its events and the deadlines.


def run_exercises(student, jobs, hidden=(), isolate=True, cpu_s=None, memory_mb=4096):
    """Run `jobs` ([{"name", "module", "attr", "notebook", "calls", "limit_s"}]) on the
    submission in `student`. Returns (results, info): results {name: {"calls": [...],
    "sdpa_calls": n} or {"error": reason}}, info {"sandbox", "syntax", "imports", "notes",
    "log_tail", "children"}."""
    results, info = {}, {"sandbox": {}, "syntax": [], "imports": {}, "notes": [], "log_tail": "", "children": 0}
    with tempfile.TemporaryDirectory(prefix="minirlhf-grade-") as tmp:
        tmp = Path(tmp)
        kit = tmp / "kit"
        kit.mkdir()
        info["notes"] += copy_submission(student, kit)
        for sub in ("home", "tmp"):
            (kit / sub).mkdir()
        runner = tmp / "runner"
        runner.mkdir()
        shutil.copy2(CHILD, runner / "child.py")
        os.chmod(tmp, 0o755)
        remaining = list(jobs)
        hidden = [str(Path(h).resolve()) for h in hidden if _may_hide(Path(h), tmp)]
        while remaining:
            info["children"] += 1
            done = _one_child(kit, runner, tmp, remaining, hidden, isolate,
                              cpu_s or int(sum(j["limit_s"] for j in remaining) + IMPORT_LIMIT_S), memory_mb,
                              results, info)
            remaining = [j for j in remaining if j["name"] not in results]
            if not done:
                break
        for job in remaining:
            results.setdefault(job["name"], {"error": "no result from the child"})
    return results, info


def _may_hide(path, tmp):
    """A folder may be hidden from the child unless python, the copy or the runner live in it."""
    path = path.resolve()
    keep = [Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(tmp).resolve()]
    return path.is_dir() and not any(k == path or path in k.parents for k in keep)


def _one_child(kit, runner, tmp, jobs, hidden, isolate, cpu_s, memory_mb, results, info):
    """Run one child on `jobs` until it finishes, dies or overruns. Returns True when the
    remaining exercises are worth a fresh child (one of them timed out or crashed it)."""
    job_path = tmp / "job.json"
    job = {"kit": str(kit), "hidden": hidden, "isolate": isolate, "exercises": jobs,
           "limits": {"cpu_s": cpu_s, "memory_mb": memory_mb, "file_mb": 64}}
    job_path.write_text(json.dumps(job))
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(kit), "HOME": str(kit / "home"),
           "TMPDIR": str(kit / "tmp")}
    read_fd, write_fd = os.pipe()
    log_path = tmp / f"child-{info['children']}.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen([sys.executable, "-I", str(runner / "child.py"), str(job_path), str(write_fd)],
                                 cwd=kit, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    current, deadline, imported = None, time.monotonic() + IMPORT_LIMIT_S, False
    buffer, received, retry = b"", 0, False
    limits = {j["name"]: j["limit_s"] for j in jobs}
    try:
        while True:
            wait = deadline - time.monotonic()
            if wait <= 0:
                if current is None:
                    reason = f"importing the package timed out after {IMPORT_LIMIT_S:.0f} s"
                    for j in jobs:
                        results.setdefault(j["name"], {"error": reason})
                else:
                    results[current] = {"error": f"timed out after {limits[current]:g} s"}
                    retry = True
                break
            ready, _, _ = select.select([read_fd], [], [], min(wait, 1.0))
            if not ready:
                continue
            chunk = os.read(read_fd, 1 << 16)
            received += len(chunk)
            if not chunk or received > MAX_EVENT_BYTES:
                child_died = _ended(child)
                if current is not None and current not in results:
                    results[current] = {"error": f"the process {child_died} while running it" if chunk == b""
                                        else "sent more output than allowed"}
                    retry = True
                elif not imported:
                    reason = f"could not import the package: the process {child_died} ({_last_line(log_path)})"
                    for j in jobs:
                        results.setdefault(j["name"], {"error": reason})
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = _parse(line)
                kind = event.get("event")
                if kind == "sandbox" and info["children"] == 1 and not info["sandbox"]:  # the first: before student code
                    info["sandbox"] = {str(k): str(v)[:200] for k, v in event.items() if k != "event"}
                elif kind == "syntax" and info["children"] == 1:
                    info["syntax"].append(event)
                elif kind == "imported" and event.get("error"):
                    info["imports"][str(event.get("module"))] = str(event["error"])[:400]
                elif kind == "imports_done":
                    imported = True
                elif kind == "start" and event.get("name") in limits and imported:
                    current = event["name"]
                    deadline = time.monotonic() + limits[current]
                elif kind == "result" and event.get("name") == current:
                    results[current] = {"calls": event.get("calls"), "sdpa_calls": event.get("sdpa_calls", 0)}
                    current = None
                    deadline = time.monotonic() + 30.0  # until the next start
                elif kind == "done":
                    return False
    finally:
        _kill(child)
        os.close(read_fd)
        info["log_tail"] = _tail(log_path)
    return retry


def _parse(line):
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return {}
    return event if isinstance(event, dict) else {}


def _ended(child):
    try:
        code = child.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        return "stopped answering"
    if code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _kill(child):
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        child.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass


def _tail(path, n=2000):
    try:
        data = path.read_bytes()[-n:]
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _last_line(path):
    lines = [line for line in _tail(path).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"
