"""Independent runs side by side: one process each, one thread per process.

Machinery, not course material. `run` (stages that do not depend on each other) and
`frontier` (its sweep of independent training runs) both call `run_jobs`.

Why processes, one thread each: at the kit's model sizes a second torch thread buys
little, while two processes on two cores do twice the work (benchmarks/bench_threads.py
measures both on your machine). Each job is seeded on its own, so running jobs side by
side gives the same numbers as running them one after another.

What a user relies on:
- progress: one bar per running job, fed by the harness's step counter (`runs.on_step`);
- a failing job is named with its error, and the others run to their end (nothing hangs,
  nothing is lost among parallel output);
- Ctrl-C (or SIGTERM to the parent) stops every job at a step boundary with a checkpoint,
  as for a single stage, so the same command with --resume finishes them.
"""
import dataclasses
import importlib
import multiprocessing
import os
import queue
import signal
import time
import traceback

from tqdm.auto import tqdm

from minirlhf import runs


@dataclasses.dataclass
class Job:
    """One run: `target` is "module:function", called with `kwargs` in a fresh process."""
    name: str
    target: str
    kwargs: dict


@dataclasses.dataclass
class Outcome:
    name: str
    status: str = "running"     # "done", "failed", "interrupted"
    seconds: float = 0.0
    error: str = ""             # one line
    details: str = ""           # the child's traceback, for --debug
    result: object = None


def default_workers():
    """As many jobs at once as there are cores (at least one)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_jobs(jobs, workers=None, progress=True):
    """Run `jobs`, `workers` at a time; returns {name: Outcome} in the order of `jobs`.

    With one worker the jobs still run in child processes, so the behaviour (and the
    numbers) do not depend on how many run at once.
    """
    workers = workers or default_workers()
    context = multiprocessing.get_context("spawn")     # never fork a process that has torch threads
    messages = context.Queue()
    pending, running = list(jobs), {}
    outcomes = {job.name: Outcome(job.name) for job in jobs}
    bars, started = {}, {}
    stopping = False
    previous = _sigterm_as_interrupt()
    try:
        while pending or running:
            while pending and len(running) < workers and not stopping:
                job = pending.pop(0)
                process = context.Process(target=_child, args=(job, messages), name=f"minirlhf-{job.name}")
                with _one_thread_children():
                    process.start()
                running[job.name], started[job.name] = process, time.perf_counter()
                if progress:
                    bars[job.name] = tqdm(desc=job.name, total=None, position=len(bars), leave=True, unit="step")
            _drain(messages, outcomes, bars, block=True)
            for name, process in list(running.items()):
                if process.exitcode is None:
                    continue
                _drain(messages, outcomes, bars, block=False)
                outcome = outcomes[name]
                outcome.seconds = time.perf_counter() - started[name]
                if outcome.status == "running":               # died without a word: killed, out of memory
                    outcome.status, outcome.error = "failed", f"the process ended with exit code {process.exitcode}"
                del running[name]
                if name in bars:
                    bars[name].set_postfix_str(outcome.status if outcome.status != "done" else
                                               f"done in {outcome.seconds:.0f} s")
                    bars[name].close()
    except KeyboardInterrupt:
        stopping = True
        for process in running.values():   # SIGTERM, not SIGINT: a terminal's Ctrl-C may have reached them
            if process.is_alive():         # already, and a second SIGINT means "stop without saving"
                os.kill(process.pid, signal.SIGTERM)
        for name, process in running.items():
            process.join()
            _drain(messages, outcomes, bars, block=False)
            if outcomes[name].status == "running":
                outcomes[name].status = "interrupted"
        for job in pending:
            outcomes[job.name].status = "not started"
        for bar in bars.values():
            bar.close()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return outcomes


# ---------------------------------------------------------------------------
# Parent-side helpers

def _sigterm_as_interrupt():
    """In the main thread, make SIGTERM (kill) stop the jobs as Ctrl-C does; the old handler."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:                     # not the main thread: leave signals alone
        return None


class _one_thread_children:
    """Spawned children read OMP_NUM_THREADS when they import torch: set it while starting one."""

    def __enter__(self):
        self.previous = os.environ.get("OMP_NUM_THREADS")
        if self.previous is None:                          # a user's own setting wins
            os.environ["OMP_NUM_THREADS"] = "1"

    def __exit__(self, *exc):
        if self.previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        return False


def _drain(messages, outcomes, bars, block):
    try:
        kind, name, *payload = messages.get(timeout=0.2) if block else messages.get_nowait()
    except queue.Empty:
        return
    while True:
        if kind == "step" and name in bars:
            step, total = payload
            bars[name].total = total
            bars[name].n = step
            bars[name].refresh()
        elif kind in ("done", "failed", "interrupted"):
            outcome = outcomes[name]
            outcome.status = kind
            if kind == "done":
                outcome.result = payload[0]
            else:
                outcome.error, outcome.details = payload
        try:
            kind, name, *payload = messages.get_nowait()
        except queue.Empty:
            return


# ---------------------------------------------------------------------------
# The child

def _child(job, messages):
    last = [0.0]

    def on_step(stage, step, total):                       # at most a few messages a second
        now = time.perf_counter()
        if now - last[0] > 0.25 or step == total:
            last[0] = now
            messages.put(("step", job.name, step, total))

    runs.on_step = on_step
    try:
        module, function = job.target.split(":")
        result = getattr(importlib.import_module(module), function)(**job.kwargs)
        messages.put(("done", job.name, result if _plain(result) else None))
    except (runs.Interrupted, KeyboardInterrupt) as error:
        messages.put(("interrupted", job.name, str(error) or "interrupted", ""))
    except BaseException as error:                         # reported to the parent, never lost
        line = f"{type(error).__name__}: {error}".splitlines()[0]
        messages.put(("failed", job.name, line, traceback.format_exc()))


def _plain(value):
    """Whether `value` can travel back as plain data (dicts, lists, numbers, strings)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))
