"""Independent runs side by side: one process each, one thread per process.

Machinery, not course material. `run` (stages that do not depend on each other) and
`frontier` (its sweep of independent training runs) both call `run_jobs`.

Why processes, one thread each: at the kit's model sizes a second torch thread buys
little, while two processes on two cores do twice the work (benchmarks/bench_threads.py
measures both on your machine). Each job is seeded on its own, so running jobs side by
side gives the same numbers as running them one after another.

Jobs may depend on others (`after`): a job starts once every job it needs is done, at most
`workers` at a time, taking the first ready job in the list's order (so list the longest
chain first: it sets the total time). A job whose dependency failed or was stopped is not
started, and says so.

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

import torch
from tqdm.auto import tqdm

from minirlhf import runs


@dataclasses.dataclass
class Job:
    """One run: `target` is "module:function", called with `kwargs` in a fresh process, once the
    jobs named in `after` are done (they must come earlier in the list: no cycles)."""
    name: str
    target: str
    kwargs: dict
    after: tuple = ()


@dataclasses.dataclass
class Outcome:
    name: str
    status: str = "waiting"     # "running", then "done", "failed", "interrupted" or "not started"
    seconds: float = 0.0
    started: float = None       # time.perf_counter() when it started and ended (None: never ran)
    ended: float = None
    error: str = ""             # one line
    error_type: str = ""        # the exception's class name ("ConfigError"), for the exit code
    details: str = ""           # the child's traceback, for --debug
    result: object = None


def default_workers():
    """As many jobs at once as there are cores (at least one)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_jobs(jobs, workers=None, progress=True):
    """Run `jobs`, `workers` at a time, each after the jobs it needs; returns {name: Outcome} in
    the order of `jobs`. Ctrl-C or SIGTERM stops the running jobs at a step boundary and raises
    `Stopped` (a KeyboardInterrupt) that carries the outcomes so far.

    With one worker the jobs still run in child processes, so the behaviour (and the
    numbers) do not depend on how many run at once.
    """
    check_order(jobs)
    workers = workers or default_workers()
    context = multiprocessing.get_context("spawn")     # never fork a process that has torch threads
    messages = context.Queue()
    pending, running = list(jobs), {}
    outcomes = {job.name: Outcome(job.name) for job in jobs}
    bars = {}
    previous = _sigterm_as_interrupt()
    try:
        while pending or running:
            if any(o.status == "interrupted" for o in outcomes.values()):   # a signal reached a job but
                raise KeyboardInterrupt                   # not this process (a kill of one child): stop all
            # a job that has reported its result frees its place while its process exits
            busy = sum(outcomes[name].status == "running" for name in running)
            for job in ready(pending, outcomes, workers - busy):
                process = context.Process(target=_child, args=(job, messages), name=f"minirlhf-{job.name}")
                with _one_thread_children():
                    process.start()
                running[job.name] = process
                outcomes[job.name].status, outcomes[job.name].started = "running", time.perf_counter()
                if progress:
                    bars[job.name] = tqdm(desc=job.name, total=None, position=len(bars), leave=True, unit="step")
            if not running:
                continue                                   # `ready` just marked the rest "not started"
            _drain(messages, outcomes, bars, block=True)
            for name, process in list(running.items()):
                if process.exitcode is None:
                    continue
                _drain(messages, outcomes, bars, block=False)
                outcome = outcomes[name]
                outcome.ended = outcome.ended or time.perf_counter()       # set when it reported
                outcome.seconds = outcome.ended - outcome.started
                if outcome.status == "running":               # died without a word: killed, out of memory
                    outcome.status, outcome.error = "failed", f"the process ended with exit code {process.exitcode}"
                del running[name]
                if name in bars:
                    bars[name].set_postfix_str(outcome.status if outcome.status != "done" else
                                               f"done in {outcome.seconds:.0f} s")
                    bars[name].close()
    except KeyboardInterrupt:
        for process in running.values():   # SIGTERM, not SIGINT: a terminal's Ctrl-C may have reached them
            if process.is_alive():         # already, and a second SIGINT means "stop without saving"
                os.kill(process.pid, signal.SIGTERM)
        for name, process in running.items():
            process.join()
            _drain(messages, outcomes, bars, block=False)
            outcome = outcomes[name]
            outcome.ended = outcome.ended or time.perf_counter()
            outcome.seconds = outcome.ended - outcome.started
            if outcome.status == "running":
                outcome.status = "interrupted"
        for job in pending:
            outcomes[job.name].status, outcomes[job.name].error = "not started", "stopped before it started"
        for bar in bars.values():
            bar.close()
        raise Stopped(outcomes) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return outcomes


def run_jobs_here(jobs):
    """The same schedule one job after another in this process, on one torch thread (as each
    child has): the reference that `run_jobs` must match number for number. Ctrl-C stops the
    running job at a step boundary and raises `Stopped` with the outcomes so far."""
    check_order(jobs)
    pending, outcomes = list(jobs), {job.name: Outcome(job.name) for job in jobs}
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:            # a user's own setting wins
        torch.set_num_threads(1)
    try:
        while pending:
            for job in ready(pending, outcomes, 1):
                outcome = outcomes[job.name]
                outcome.status, outcome.started = "running", time.perf_counter()
                try:
                    outcome.result = _call(job)
                    outcome.status = "done"
                except (runs.Interrupted, KeyboardInterrupt) as error:
                    outcome.status, outcome.error = "interrupted", str(error) or "interrupted"
                    for other in pending:
                        outcomes[other.name].status, outcomes[other.name].error = \
                            "not started", "stopped before it started"
                    raise Stopped(outcomes) from None
                except Exception as error:                 # named in the outcome; the others go on
                    outcome.status, outcome.error, outcome.details = "failed", _line(error), traceback.format_exc()
                    outcome.error_type = type(error).__name__
                finally:
                    outcome.ended = time.perf_counter()
                    outcome.seconds = outcome.ended - outcome.started
    finally:
        torch.set_num_threads(threads)
    return outcomes


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped `run_jobs`; `outcomes` says what finished, stopped, never started."""

    def __init__(self, outcomes):
        super().__init__("stopped")
        self.outcomes = outcomes


def check_order(jobs):
    """Each job may only need jobs listed before it: then the schedule has no cycle."""
    seen = set()
    for job in jobs:
        missing = [d for d in job.after if d not in seen]
        if missing:
            raise ValueError(f"job {job.name} needs {', '.join(missing)}, which is not listed before it")
        seen.add(job.name)


def ready(pending, outcomes, free):
    """Take from `pending` (in order) up to `free` jobs whose dependencies are all done; a job
    whose dependency failed, was stopped or never started is marked "not started", naming it."""
    taken = []
    for job in list(pending):
        states = {d: outcomes[d].status for d in job.after}
        blocked = [d for d, state in states.items() if state in ("failed", "interrupted", "not started")]
        if blocked:
            pending.remove(job)
            outcome = outcomes[job.name]
            outcome.status = "not started"
            outcome.error = f"needs {blocked[0]}, which {_past(outcomes[blocked[0]].status)}"
        elif len(taken) < free and all(state == "done" for state in states.values()):
            pending.remove(job)
            taken.append(job)
    return taken


def _past(status):
    return {"failed": "failed", "interrupted": "was stopped", "not started": "did not start"}[status]


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
            outcome = outcomes[name]        # its end: a job that needs it may start from now on
            outcome.status, outcome.ended = kind, time.perf_counter()
            if kind == "done":
                outcome.result = payload[0]
            else:
                outcome.error, outcome.details, outcome.error_type = payload
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
        result = _call(job)
        messages.put(("done", job.name, result if _plain(result) else None))
    except (runs.Interrupted, KeyboardInterrupt) as error:
        messages.put(("interrupted", job.name, str(error) or "interrupted", "", ""))
    except BaseException as error:                         # reported to the parent, never lost
        messages.put(("failed", job.name, _line(error), traceback.format_exc(), type(error).__name__))


def _call(job):
    module, function = job.target.split(":")
    return getattr(importlib.import_module(module), function)(**job.kwargs)


def _line(error):
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _plain(value):
    """Whether `value` can travel back as plain data (dicts, lists, numbers, strings)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))
