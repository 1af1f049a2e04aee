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
"""
import dataclasses
import json
import math
import signal
import statistics
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minirlhf.checkpoints import save_model
from minirlhf.config import ConfigError
from minirlhf.files import atomic_write_text, load_torch, save_torch, write_json


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
        """Prepare `out_dir` (refusing a finished or interrupted run without --overwrite / --resume).
        `inputs` (the folders and files the stage read) are recorded in config.json."""
        self.out_dir = prepare_run_dir(out_dir, overwrite=overwrite, resume=resume)
        self.stage, self.config, self.inputs = stage, config, inputs
        self.resume, self.progress = resume, progress
        self.modules, self.state, self.extra_state = {}, {}, dict
        self.rows, self.window, self.step, self._steps, self._bar = [], [], 0, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._steps is not None:
            self._steps.close()           # leaves the training loop: signal handlers restored
        return False

    def start(self, modules, model_config=None, extra_state=dict):
        """Write config.json; with --resume, load checkpoint.pt into `modules` (models and
        optimizers by name). Returns the step to start from. `extra_state()` -> dict of more
        values a checkpoint keeps (PPO's adaptive KL coefficient); after a resume they are in
        `run.state`."""
        self.modules, self.extra_state = modules, extra_state
        start, rows = 0, []
        if self.resume:
            start, rows, self.state = resume_training(self.out_dir, modules)
        model = {"model": dataclasses.asdict(model_config)} if model_config is not None else {}
        inputs = {k: (str(v) if v is not None else None) for k, v in self.inputs.items()}
        write_json(self.out_dir / "config.json",
                   {**dataclasses.asdict(self.config), **model, "stage": self.stage, **inputs})
        self.log_file = MetricsLog(self.out_dir / "metrics.jsonl", rows)
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
        self.window.append(metrics)

    def log(self, row):
        """Append a line to metrics.jsonl: the mean of the averaged metrics, then `row`."""
        means = {k: statistics.mean(m[k] for m in self.window) for k in self.window[0]} if self.window else {}
        self.window = []
        self.log_file.log({**means, **row})

    def checkpoint(self, step):
        save_checkpoint(self.out_dir, step, self.modules, self.extra_state())

    def plot(self, keys, name, title):
        """One panel per metric of metrics.jsonl against the step, saved as `name`."""
        plot_metrics(self.rows, keys, self.out_dir / name, title)

    def finish(self, summary, model=None):
        """Save the final model and summary.json; the run is then finished (no checkpoint.pt)."""
        if model is not None:
            save_model(model, self.out_dir)
        write_json(self.out_dir / "summary.json", summary)
        (self.out_dir / "checkpoint.pt").unlink(missing_ok=True)
        return summary


def prepare_run_dir(out_dir, overwrite=False, resume=False):
    """Create the run folder; refuse to write into a finished one without --overwrite."""
    out_dir = Path(out_dir)
    if (out_dir / "summary.json").exists() and not (overwrite or resume):
        raise ConfigError(f"{out_dir} already holds a finished run; pass --overwrite to replace it "
                          "or choose another --out")
    if (out_dir / "checkpoint.pt").exists() and not (overwrite or resume):
        raise ConfigError(f"{out_dir} holds an interrupted run; pass --resume to continue it, --overwrite "
                          "to start again, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        for name in ("metrics.jsonl", "summary.json", "checkpoint.pt"):
            (out_dir / name).unlink(missing_ok=True)
    return out_dir


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
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


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
    for name, module in modules.items():
        if not isinstance(state, dict) or name not in state:
            raise ConfigError(f"{path} has no {name!r}: it is not a checkpoint of this stage")
        try:
            module.load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: the saved {name} does not fit this run's config "
                              f"({str(e).splitlines()[0][:160]}); resume with the same settings") from None
    rows = []
    log_path = Path(out_dir) / "metrics.jsonl"
    if log_path.exists():
        rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return state["step"], [r for r in rows if r.get("step", 0) <= state["step"]], state


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
