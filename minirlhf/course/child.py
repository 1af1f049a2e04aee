"""The grading child: runs a student's functions on the instructor's inputs, nothing else.

`grade` starts this file as a script (`python -I child.py JOB`) in a fresh temporary copy of
the student's package. Before any student code is imported it closes what it can: resource
limits; on Linux as root, new network, mount and PID namespaces, every mount read-only but
the copy, the instructor's folders hidden under empty ones, and every capability dropped
(each step is best effort and reported in the `sandbox` event). Then it repairs syntax
errors function by function (the broken function raises, the rest of the file still
imports), imports the student's modules and calls each exercise's function on the inputs
in JOB.

It writes one JSON line per event to the protocol pipe (the fd given after JOB): `sandbox`, `syntax`,
`imported`, then `start` and `result` per exercise. Outputs are plain JSON: tensors as
flat lists with shape and dtype, never pickle. Nothing it says is trusted: the student's
code runs in this process and could write any line; it could only ever claim outputs,
and the parent compares outputs with the solution's, so a forged line is worth no more
than a function that returns the same numbers.

Stdlib and torch only, and no minirlhf import: this file must not run the student's
package before the sandbox is up. `run_call` and the codec are also used by the parent
to run the instructor's solutions on the same calls.
"""
import ctypes
import json
import math
import os
import resource
import sys
import time

# ---------------------------------------------------------------------------------------
# Values to and from JSON (the only format between the processes: it carries no code).


def encode(value, depth=0):
    import numpy as np
    import torch
    if depth > 8:
        return {"__repr__": "nested too deeply"}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.numel() > 100_000:
            return {"__repr__": f"a tensor of {value.numel()} elements"}
        flat = value.reshape(-1).tolist() if value.dtype != torch.bfloat16 else value.float().reshape(-1).tolist()
        return {"__tensor__": flat, "shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, np.ndarray):
        if value.size > 100_000 or value.dtype == object:
            return {"__repr__": f"an array of {value.size} elements"}
        return {"__ndarray__": value.reshape(-1).tolist(), "shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, (bool, int, str)) or value is None:
        return value if not isinstance(value, str) else value[:2000]
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, np.generic):
        return encode(value.item(), depth + 1)
    if isinstance(value, (tuple, list)):
        return {"__tuple__": [encode(v, depth + 1) for v in value[:64]]}
    if isinstance(value, dict):
        return {"__dict__": [[str(k)[:200], encode(v, depth + 1)] for k, v in list(value.items())[:64]]}
    return {"__repr__": type(value).__name__[:100]}


def decode(value):
    import numpy as np
    import torch
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        dtype = getattr(torch, str(value.get("dtype", "float32")), None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float64
        return torch.tensor([_number(v) for v in value["__tensor__"]], dtype=dtype).reshape(value["shape"])
    if "__ndarray__" in value:
        return np.array([_number(v) for v in value["__ndarray__"]], dtype=value["dtype"]).reshape(value["shape"])
    if "__float__" in value:
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {str(k): decode(v) for k, v in value["__dict__"]}
    if "__repr__" in value:
        return Unreadable(str(value["__repr__"]))
    return {k: decode(v) for k, v in value.items()}


def _number(v):
    return float(v["__float__"]) if isinstance(v, dict) else v


class Unreadable:
    """A value the child could not send back as numbers (an object, a huge tensor)."""

    def __init__(self, what):
        self.what = what

    def __repr__(self):
        return f"<{self.what}>"


# ---------------------------------------------------------------------------------------
# One call of an exercise's function: the same code for the student (here) and the
# solution (in the parent).


def run_call(fn, call):
    """Call `fn` as `call` says; returns the encoded {"value", "grads"} or {"error"}.

    call: {"args": encoded kwargs, "grad": names of inputs to differentiate (float64),
    "style": "call" | "controller" (construct with "init", then .update(*u) per "updates")}.
    With "grad", the gradient is of the loss (first element of a tuple) or of the output's sum.
    """
    import torch
    try:
        args = {k: decode(v) for k, v in call.get("args", {}).items()}
        if call.get("style") == "controller":
            controller = fn(**decode(call["init"]))
            value = [(controller.update(*update), controller.value) for update in call["updates"]]
            return {"value": encode(value)}
        wrt = call.get("grad", [])
        for name in wrt:
            args[name] = args[name].detach().double().requires_grad_(True)
        value = fn(**args)
        result = {"value": encode(value)}
        if wrt:
            out = value[0] if isinstance(value, tuple) else value
            out = out.sum() if isinstance(out, torch.Tensor) else out
            grads = torch.autograd.grad(out, [args[n] for n in wrt], allow_unused=True)
            result["grads"] = {n: encode(g if g is not None else torch.zeros_like(args[n])) for n, g in zip(wrt, grads)}
        return result
    except NotImplementedError as e:
        return {"error": f"not done yet (NotImplementedError: {str(e)[:200]})"}
    except RecursionError:
        return {"error": "RecursionError (infinite recursion?)"}
    except Exception as e:  # the student's bug, reported as the row's reason
        where = _student_frame(e)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}{where}"}


def _student_frame(exc):
    """' (losses.py line 12)' for the innermost frame of the student's package, or ''."""
    tb, found = exc.__traceback__, ""
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if "/minirlhf/" in name:
            found = f" ({os.path.basename(name)} line {tb.tb_lineno})"
        tb = tb.tb_next
    return found


def notebook_function(path, name):
    """The function `name` defined by a code cell of the notebook at `path`, with numpy, torch,
    math and F in scope (the exercise cells use only those)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    with open(path, encoding="utf-8") as f:
        notebook = json.load(f)
    for cell in notebook.get("cells", []):
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        if cell.get("cell_type") == "code" and f"def {name}(" in source:
            scope = {"np": np, "torch": torch, "math": math, "F": F, "__name__": "notebook_exercise"}
            exec(compile(source, f"{os.path.basename(path)}:{name}", "exec"), scope)
            return scope[name]
    raise LookupError(f"no code cell defines {name}() in {os.path.basename(path)}")


# ---------------------------------------------------------------------------------------
# The sandbox (Linux, as root; every step best effort, each result reported).

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 32, 4096, 16384, 1 << 18


def set_limits(limits):
    for name, value in (("RLIMIT_CPU", limits["cpu_s"]), ("RLIMIT_AS", limits["memory_mb"] << 20),
                        ("RLIMIT_FSIZE", limits["file_mb"] << 20), ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", 256)):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass


def isolate(writable, hidden):
    """Namespaces, read-only mounts, hidden folders, no capabilities. Returns notes."""
    notes = {}
    if not sys.platform.startswith("linux"):
        return {"network": "not isolated (not Linux)", "filesystem": "not isolated (not Linux)"}
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID) != 0:
        err = os.strerror(ctypes.get_errno())
        network = ("isolated (new network namespace)" if libc.unshare(CLONE_NEWNET) == 0
                   else f"not isolated (unshare: {err}; run as root or in a container)")
        return {"network": network, "filesystem": f"not isolated (unshare: {err})"}
    notes["network"] = "isolated (new network namespace)"
    pid = os.fork()  # the child is PID 1 of a new PID namespace: it cannot see or signal the grader
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    libc.prctl(1, 9)  # PR_SET_PDEATHSIG: SIGKILL when the waiting process is killed

    def mount(source, target, fstype, flags, data=None):
        ok = libc.mount(source, target.encode() if target else None, fstype, flags, data) == 0
        return ok or os.strerror(ctypes.get_errno())

    problems = []
    if mount(b"none", "/", None, MS_REC | MS_PRIVATE) is not True:
        problems.append("mounts stay shared")
    for path in writable:
        mount(path.encode(), path, None, MS_BIND | MS_REC)
    with open("/proc/self/mountinfo") as f:
        points = sorted({line.split()[4] for line in f}, key=len, reverse=True)
    for point in points:
        if point.startswith(("/proc", "/sys", "/dev")) or any(point == w or point.startswith(w + "/") for w in writable):
            continue
        result = mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
        if result is not True and point == "/":
            problems.append(f"/ stays writable ({result})")
    for path in hidden:
        if os.path.isdir(path) and mount(b"tmpfs", path, b"tmpfs", MS_RDONLY, b"size=4k,mode=000") is not True:
            problems.append(f"{path} stays readable")
    for cap in range(64):  # drop every capability: the mounts above cannot be undone
        libc.prctl(24, cap)  # PR_CAPBSET_DROP
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    capped = libc.capset(header, data) == 0
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    notes["filesystem"] = ("read-only except the copy; instructor folders hidden" if not problems
                           else "partly isolated: " + "; ".join(problems))
    notes["capabilities"] = "dropped" if capped else "kept (capset failed)"
    notes["processes"] = "new PID namespace"
    return notes


# ---------------------------------------------------------------------------------------
# Syntax errors: stub the broken top-level definition so the rest of the file imports.


def repair_syntax(path, rel, emit, attempts=20):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    for _ in range(attempts):
        try:
            compile(text, rel, "exec")
            break
        except SyntaxError as e:
            lines = text.splitlines()
            line = max(1, min(e.lineno or 1, len(lines)))
            block = _enclosing_block(lines, line - 1)
            emit({"event": "syntax", "file": rel, "line": e.lineno, "kind": type(e).__name__, "message": str(e.msg),
                  "names": [block[2]] if block else []})
            if block is None:
                return
            first, last, name = block
            message = json.dumps(f"{type(e).__name__} in {os.path.basename(rel)} line {e.lineno}: {e.msg}")
            stub = [f"def {name}(*args, **kwargs):", f"    raise SyntaxError({message})"]
            text = "\n".join(lines[:first] + stub + lines[last + 1:]) + "\n"
        except (ValueError, RecursionError, MemoryError) as e:
            emit({"event": "syntax", "file": rel, "line": None, "kind": type(e).__name__, "message": "the file cannot be "
                  "compiled", "names": []})
            return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _enclosing_block(lines, index):
    """(first, last, name) of the top-level def/class holding line `index`, or None."""
    first = index
    while first >= 0 and not lines[first].startswith(("def ", "class ", "async def ", "@")):
        first -= 1
    if first < 0:
        return None
    start = first
    while start < len(lines) and lines[start].startswith("@"):
        start += 1
    words = lines[start].replace("async def ", "def ").replace("(", " ").replace(":", " ").split()
    if len(words) < 2 or not words[1].isidentifier():
        return None
    last = index
    for j in range(index + 1, len(lines)):
        if lines[j].strip() and not lines[j][0].isspace() and not lines[j].lstrip().startswith("#"):
            break
        last = j
    return first, last, words[1]


# ---------------------------------------------------------------------------------------
# Main: set up, import, run each exercise.


def main(job_path, fd):
    with open(job_path) as f:
        job = json.load(f)
    out = os.fdopen(fd, "w", buffering=1)

    def emit(event):
        out.write(json.dumps(event) + "\n")
        out.flush()

    set_limits(job["limits"])
    kit = job["kit"]
    notes = isolate([kit], job.get("hidden", [])) if job.get("isolate", True) else {"network": "not isolated (off)"}
    os.environ.update(HOME=os.path.join(kit, "home"), TMPDIR=os.path.join(kit, "tmp"))
    os.chdir(kit)
    import numpy  # noqa: F401  (the instructor's libraries load before any student code)
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    calls = {"sdpa": 0}
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return real_sdpa(*args, **kwargs)
    F.scaled_dot_product_attention = counting_sdpa
    emit({"event": "sandbox", **notes})

    package = os.path.join(kit, "minirlhf")
    for root, _, files in os.walk(package):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                repair_syntax(path, os.path.relpath(path, kit), emit)
    sys.path.insert(0, kit)
    sys.dont_write_bytecode = True
    os.dup2(2, 1)  # the student's prints go to the log, not to the protocol pipe
    started = time.time()
    modules = {}
    for module in sorted({e["module"] for e in job["exercises"] if e["module"] and not e.get("notebook")}):
        try:
            modules[module] = __import__(module, fromlist=["_"])
            if not os.path.realpath(modules[module].__file__).startswith(os.path.realpath(kit) + os.sep):
                raise ImportError(f"{module} was not imported from the submission")
            emit({"event": "imported", "module": module})
        except BaseException as e:  # SystemExit and KeyboardInterrupt included: a student's import ran it
            emit({"event": "imported", "module": module, "error": f"{type(e).__name__}: {str(e)[:300]}{_student_frame(e)}"})
    emit({"event": "imports_done", "seconds": round(time.time() - started, 2)})

    for exercise in job["exercises"]:
        emit({"event": "start", "name": exercise["name"]})
        calls["sdpa"] = 0
        try:
            if exercise.get("notebook"):
                fn = notebook_function(os.path.join(kit, exercise["notebook"]), exercise["attr"])
                results = [run_call(fn, call) for call in exercise["calls"]]
            elif exercise["module"] in modules:
                fn = getattr(modules[exercise["module"]], exercise["attr"])
                results = [run_call(fn, call) for call in exercise["calls"]]
            else:
                results = None  # its module did not import: the `imported` event said why
        except BaseException as e:  # SystemExit included: it fails this exercise only
            results = [{"error": f"{type(e).__name__}: {str(e)[:300]}{_student_frame(e)}"}] * len(exercise["calls"])
        emit({"event": "result", "name": exercise["name"], "calls": results, "sdpa_calls": calls["sdpa"]})
    emit({"event": "done"})
    out.close()
    os._exit(0)  # no exit handlers: they are the student's


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
