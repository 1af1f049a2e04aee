"""The harness every stage runs in: its run folder, written once so that a `train_*` function
reads as its algorithm. Machinery: a student may skip this file.

    with Run(out_dir, "sft", config, resume=resume, overwrite=overwrite) as run:
        start = run.start({"model": model, "optimizer": optimizer}, model.config)
        for step in run.steps(config.steps):
            ...                                   # the algorithm: one optimiser step
            run.log({"step": step + 1, ...})      # a line of metrics.jsonl
            run.checkpoint(step + 1)
        run.finish(summary, model)

A run folder holds

    config.json     the stage's config (and the model's shape under "model")
    metrics.jsonl   one JSON line per logging step
    summary.json    the final evaluation
    model.pt        a state_dict, loaded with torch.load(..., weights_only=True)
    checkpoint.pt   while training: everything --resume needs (removed when the run finishes)
    *.png           plots

Ctrl-C or kill (SIGTERM) during `run.steps` finishes the current step, saves a checkpoint and
raises `Interrupted`; `--resume` continues from it with the same batches (each batch depends
only on the seed and the step). A NaN or inf loss stops the run, keeping the last good checkpoint.

Nothing on disk changes before `run.start`: `Run(...)` only checks the folder's state, so a
command refused while it loads its inputs leaves a finished run as it was (--overwrite deletes
the old files in `start`, once the new run can begin). `start` locks the folder (one writer per
run folder; the system drops the lock when the process dies) and, with --resume, refuses
settings that differ from the ones the run was started with.
"""
import dataclasses
import json
import math
import os
import signal
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minirlhf.checkpoints import save_model
from minirlhf.config import ConfigError
from minirlhf.files import WriteError, atomic_write_text, load_torch, read_json, save_torch, write_json
from minirlhf.tasks import TASKS, same_data
from minirlhf.tokenizer import DEFAULT_RANKS_PATH, fingerprint

try:
    import fcntl
except ImportError:                # Windows: no advisory locks; one writer per folder is then up to the user
    fcntl = None


# Set by a parent process that watches this run (minirlhf/parallel.py): called as
# on_step(stage, steps_done, total) after every step.
on_step = None


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; `--resume` continues it."""

    def __init__(self, step, out_dir):
        super().__init__(f"interrupted after step {step}; checkpoint saved in {out_dir}. "
                         "Run the same command with --resume to continue.")


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------
# The harness

class Run:
    """One stage's run folder, from an empty folder (or a checkpoint) to summary.json."""

    def __init__(self, out_dir, stage, config, *, resume=False, overwrite=False, progress=True, **inputs):
        """Check that `out_dir` may take this run (refusing a finished or interrupted run without
        --overwrite / --resume); nothing is written yet. `inputs` (the folders and files the stage
        read) are recorded in config.json."""
        self.out_dir = check_run_dir(out_dir, overwrite=overwrite, resume=resume)
        self.stage, self.config, self.inputs = stage, config, inputs
        self.resume, self.overwrite, self.progress = resume, overwrite, progress
        self.modules, self.state, self.extra_state = {}, {}, dict
        self.rows, self.window, self.step, self._steps, self._bar, self._lock = [], [], 0, None, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._steps is not None:
            self._steps.close()           # leaves the training loop: signal handlers restored
        self.release()
        return False

    def release(self):
        """Give up the folder's lock (the system also drops it when the process ends)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def settings(self, model_config=None):
        """What config.json records: the stage's config, the model's shape and tokenizer, the inputs."""
        model = {"model": dataclasses.asdict(model_config),
                 "tokenizer": fingerprint(DEFAULT_RANKS_PATH)} if model_config is not None else {}
        inputs = {k: (str(v) if v is not None else None) for k, v in self.inputs.items()}
        return {**dataclasses.asdict(self.config), **model, "stage": self.stage, **inputs}

    def start(self, modules, model_config=None, extra_state=dict):
        """The run begins: lock the folder, then delete the old run's files (--overwrite) or load
        checkpoint.pt into `modules`, models and optimizers by name (--resume), and write
        config.json. Returns the step to start from. `extra_state()` -> dict of more values a
        checkpoint keeps (PPO's adaptive KL coefficient); after a resume they are in `run.state`."""
        self.modules, self.extra_state = modules, extra_state
        settings = self.settings(model_config)
        self._lock = lock_run_dir(self.out_dir)
        try:
            check_run_dir(self.out_dir, overwrite=self.overwrite, resume=self.resume)   # again, under the lock
            start, rows = 0, []
            if self.resume:
                check_same_settings(self.out_dir, settings)
                start, rows, self.state = resume_training(self.out_dir, modules)
                self.window = list(self.state.get("metrics_window", []))
            elif self.overwrite:
                for name in RUN_FILES:
                    (self.out_dir / name).unlink(missing_ok=True)
            write_json(self.out_dir / "config.json", settings)
            self.log_file = MetricsLog(self.out_dir / "metrics.jsonl", rows)
        except BaseException:
            self.release()
            raise
        self.rows, self.step = self.log_file.rows, start
        return start

    def steps(self, total, desc=None):
        """The steps start..total-1, with a progress bar; a Ctrl-C or kill stops after a whole step."""
        self._steps = self._loop(total, desc or self.stage)
        return self._steps

    def _loop(self, total, desc):
        self._bar = tqdm(range(self.step, total), desc=desc, disable=not self.progress, initial=self.step,
                         total=total)
        with GracefulStop() as stop:
            for step in self._bar:
                self.step = step
                yield step
                if on_step is not None:
                    on_step(self.stage, step + 1, total)
                if stop.requested:
                    self.checkpoint(step + 1)
                    raise Interrupted(step + 1, self.out_dir)

    def show(self, **values):
        """Numbers on the progress bar."""
        self._bar.set_postfix(values, refresh=False)

    def check_finite(self, loss):
        """Stop with a message naming the step (counted from 1) if the loss is NaN or inf."""
        check_finite(loss, self.step + 1, self.out_dir)

    def average(self, metrics):
        """Keep a step's metrics; the next `log` writes their mean over the steps since the last log."""
        self.window.append(dict(metrics))

    def log(self, row):
        """Append a line to metrics.jsonl: the mean of the averaged metrics, then `row`."""
        means = {k: statistics.mean(m[k] for m in self.window) for k in self.window[0]} if self.window else {}
        self.window = []
        self.log_file.log({**means, **row})

    def checkpoint(self, step):
        """Save what --resume needs after `step` steps, with the metrics averaged since the last log
        line: a resumed metrics.jsonl then equals an uninterrupted one."""
        save_checkpoint(self.out_dir, step, self.modules, {**self.extra_state(), "metrics_window": self.window})

    def plot(self, keys, name, title):
        """One panel per metric of metrics.jsonl against the step, saved as `name`."""
        plot_metrics(self.rows, keys, self.out_dir / name, title)

    def finish(self, summary, model=None):
        """Save the final model and summary.json; the run is then finished (no checkpoint.pt)."""
        if model is not None:
            save_model(model, self.out_dir)
        write_json(self.out_dir / "summary.json", summary)
        (self.out_dir / "checkpoint.pt").unlink(missing_ok=True)
        self.release()
        return summary


RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoint.pt", "model.pt")   # what --overwrite deletes


# ---------------------------------------------------------------------------
# The run folder's state, its lock, and --resume's settings

def check_run_dir(out_dir, overwrite=False, resume=False):
    """Refuse an --out that cannot take this run, before anything is written: a file (or a path
    below one), a finished run without --overwrite, an interrupted one without --resume or
    --overwrite, --resume without a checkpoint. Returns the folder as a Path."""
    out_dir = Path(out_dir)
    for parent in (out_dir, *out_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out {out_dir}: {parent} is a file, not a folder")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: choose one")
    if resume and not (out_dir / "checkpoint.pt").exists():
        why = "the run there finished" if (out_dir / "summary.json").exists() else "nothing to resume"
        raise ConfigError(f"--resume: no checkpoint in {out_dir} ({why}); nothing was changed")
    if (out_dir / "summary.json").exists() and not (overwrite or resume):
        raise ConfigError(f"{out_dir} already holds a finished run; pass --overwrite to replace it "
                          "or choose another --out")
    if (out_dir / "checkpoint.pt").exists() and not (overwrite or resume):
        raise ConfigError(f"{out_dir} holds an interrupted run; pass --resume to continue it, --overwrite "
                          "to start again, or choose another --out")
    return out_dir


def folder_task(run_dir):
    """The task a stage folder was trained on (its config.json's "task"); None if it does not say."""
    path = Path(run_dir) / "config.json"
    return read_json(path).get("task") if path.is_file() else None


def check_same_task(task, **folders):
    """Refuse an input folder (sft=DIR, rm=DIR…) trained on another task's data: its model has
    never seen this task's prompts. Arithmetic and its lenient twin share data and pass."""
    for name, folder in folders.items():
        trained = folder_task(folder) if folder else None
        if trained in TASKS and task in TASKS and not same_data(trained, task):
            raise ConfigError(f"{folder} was trained on task {trained}; this command asks for {task} "
                              f"(leave out --task to follow --{name}, or pass a --{name} folder trained on {task})")


def prepare_run_dir(out_dir, overwrite=False, resume=False):
    """Check the folder, create it and, with --overwrite, delete the previous run's files: for
    code that writes at once. Stages use `Run`, which deletes only when the new run starts."""
    out_dir = check_run_dir(out_dir, overwrite=overwrite, resume=resume)
    make_dir(out_dir)
    if overwrite:
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
    return out_dir


def make_dir(out_dir):
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create the run folder {out_dir}: {e.strerror}") from None


def lock_run_dir(out_dir):
    """Create the folder and hold an exclusive lock on it: a second writer is refused at once.
    Returns the file descriptor holding the lock; closing it (or the process ending) releases it."""
    make_dir(out_dir)
    fd = os.open(out_dir, os.O_RDONLY)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"{out_dir} is in use by another minirlhf command (one writer per run folder); "
                              "wait for it to end or choose another --out") from None
    return fd


def check_same_settings(out_dir, settings):
    """--resume continues the run it finds: refuse settings that differ from its config.json,
    naming the keys. A folder from before the tokenizer was recorded resumes without that check."""
    path = Path(out_dir) / "config.json"
    if not path.exists():
        return
    recorded = read_json(path)
    if not isinstance(recorded, dict):
        raise ConfigError(f"{path}: expected a JSON object; start again with --overwrite")
    if "tokenizer" not in recorded:
        settings = {k: v for k, v in settings.items() if k != "tokenizer"}
    differ = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
    if differ:
        shown = ", ".join(f"{k} {recorded.get(k)!r} -> {settings.get(k)!r}" for k in differ[:6])
        raise ConfigError(f"--resume with other settings than the run in {out_dir} ({shown}): resume with "
                          "the same --fast/--seed/--set, or start again with --overwrite")


# ---------------------------------------------------------------------------
# The metrics log and the NaN guard

class MetricsLog:
    """Appends one JSON line per logging step to metrics.jsonl and keeps the rows in memory."""

    def __init__(self, path, resume_rows=None):
        self.path = Path(path)
        self.rows = list(resume_rows or [])
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row):
        row = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) and k != "step" else v)
               for k, v in row.items()}
        line = (json.dumps(row) + "\n").encode()
        with open(self.path, "ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError as e:       # a full disk: cut the half-written line, so the file stays readable
                f.truncate(size)
                raise WriteError(f"cannot append to {self.path}: {e.strerror}; the last checkpoint is kept "
                                 "(free some space, then --resume)") from None
        self.rows.append(row)


def read_metrics(path, up_to_step):
    """The rows of metrics.jsonl up to `up_to_step`. A last line cut mid-way (a crash or a full
    disk while appending) is dropped with a notice; any other damage is a one-line error."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise ConfigError(f"{path} is not a file; remove it, or start again with --overwrite")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; remove it, or start again with --overwrite") from None
    lines = text.split("\n")
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):          # the last line, without its newline: it was cut
                print(f"note: {path}:{lineno}: dropped a metrics line that was cut mid-way", file=sys.stderr)
                break
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg}); remove that line to resume") from None
        step = row.get("step", 0) if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ConfigError(f"{path}:{lineno}: expected a JSON object with an integer 'step'; remove that "
                              "line to resume")
        rows.append(row)
    return [r for r in rows if r.get("step", 0) <= up_to_step]


def check_finite(loss, step, out_dir=None):
    """Stop training with a message naming the step when the loss is NaN or inf."""
    value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(f"loss is {value} at step {step}: training stopped{_kept(out_dir)}. "
                                 "Try a lower learning rate or check the data.")


def _kept(out_dir):
    if out_dir is None:
        return ""
    if (Path(out_dir) / "checkpoint.pt").exists():
        return f"; the last good checkpoint, {Path(out_dir) / 'checkpoint.pt'}, is kept (--resume continues from it)"
    return "; no checkpoint had been saved yet"


# ---------------------------------------------------------------------------
# Checkpoints for --resume, and stopping cleanly on Ctrl-C or kill

class GracefulStop:
    """Turns SIGINT (Ctrl-C) and SIGTERM (kill) into a flag the training loop checks after each
    step, so a checkpoint is only ever written between two whole optimiser steps. A second
    Ctrl-C stops at once, keeping the last periodic checkpoint."""

    def __enter__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:          # not the main thread (e.g. some notebook kernels)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:   # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def save_checkpoint(out_dir, step, modules, extra=None):
    """Atomically save everything needed to resume after `step` completed steps.

    `modules` maps names to objects with state_dict() (models, optimizers). Weights that
    are no longer finite are never saved: the last good checkpoint stays."""
    for name, module in modules.items():
        if isinstance(module, torch.nn.Module) and not all(torch.isfinite(p).all() for p in module.parameters()):
            raise NonFiniteLossError(f"the {name}'s weights are NaN or inf after step {step}: training "
                                     f"stopped{_kept(out_dir)}. Try a lower learning rate.")
    state = {"step": step, **{name: m.state_dict() for name, m in modules.items()}, **(extra or {})}
    save_torch(state, Path(out_dir) / "checkpoint.pt")


def resume_training(out_dir, modules):
    """Load checkpoint.pt into `modules`; return (step, metric rows logged up to that step, state)."""
    path = Path(out_dir) / "checkpoint.pt"
    if not path.exists():
        raise ConfigError(f"--resume: no checkpoint in {out_dir} (nothing to resume, or the run finished)")
    state = load_torch(path)
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a checkpoint")
    for name, module in modules.items():
        if name not in state:
            raise ConfigError(f"{path} has no {name!r}: it is not a checkpoint of this stage")
        try:
            module.load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: the saved {name} does not fit this run's config "
                              f"({str(e).splitlines()[0][:160]}); resume with the same settings") from None
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"{path} holds no step count: not a whole checkpoint; start again with --overwrite")
    return step, read_metrics(Path(out_dir) / "metrics.jsonl", step), state


# ---------------------------------------------------------------------------
# Plots

def figure(*grid, figsize, **kwargs):
    """(fig, axes) from a standalone matplotlib Figure: saving it needs no pyplot and leaves the
    notebook's plotting backend alone (pyplot's global state is never touched)."""
    from matplotlib.figure import Figure      # matplotlib loads only when a stage draws
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def plot_metrics(rows, keys, path, title, xkey="step"):
    """One panel per metric key against `xkey`, saved as a PNG."""
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = figure(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r[xkey] for r in rows if key in r]
        ax.plot(xs, [r[key] for r in rows if key in r], marker="." if len(xs) < 40 else None)
        ax.set_xlabel(xkey)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
