"""What every stage shares: configs from the command line, devices and seeds, run folders,
atomic checkpoints, metric logs and plots.

A stage is a config dataclass plus a training function that writes into a run folder:

    config.json     the stage's config (and the model's shape under "model")
    metrics.jsonl   one JSON line per logging step
    summary.json    the final evaluation
    model.pt        a state_dict, loaded with torch.load(..., weights_only=True)
    *.png           plots
"""
import dataclasses
import json
import math
import os
import pickle
import random
import signal
import typing
from pathlib import Path

import numpy as np
import torch


class ConfigError(ValueError):
    """A bad `--set key=value`, an impossible value, or an unusable run folder."""


# ---------------------------------------------------------------------------
# Configs: dataclass defaults, then --fast, then --set key=value

def apply_overrides(config, overrides):
    """Return a copy of the dataclass `config` with `overrides` applied.

    `overrides` is a dict {field: value} or a list of "key=value" strings (from `--set`);
    strings are converted to the field's type. An unknown key lists the valid ones.
    """
    if not isinstance(overrides, dict):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            key, value = item.split("=", 1)
            pairs[key.strip()] = value.strip()
        overrides = pairs
    types = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r} for {type(config).__name__}; "
                              f"valid keys: {', '.join(sorted(fields))}")
        changes[key] = _convert(value, types[key], key) if isinstance(value, str) else value
    return dataclasses.replace(config, **changes)


def _convert(text, kind, key):
    """Parse the string `text` as the annotated type `kind` (bool, int, float, str, optional)."""
    if typing.get_origin(kind) is typing.Union:                     # Optional[X]
        if text.lower() in ("none", "null", ""):
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise ConfigError(f"--set {key}={text}: expected a value of type {kind.__name__}") from None


def require(condition, message):
    """Refuse an impossible config value with a reason (used by each config's `validate`)."""
    if not condition:
        raise ConfigError(message)


def check_generation_fits(config, block_size):
    """Refuse a config whose longest prompt plus completion would not fit the model's context."""
    require(config.max_prompt_tokens + config.max_new_tokens <= block_size,
            f"max_prompt_tokens + max_new_tokens ({config.max_prompt_tokens} + {config.max_new_tokens}) "
            f"exceeds the model's block_size ({block_size}): lower one of them with --set")


def config_dict(config):
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------
# Devices and seeds

def pick_device(name="auto"):
    """`auto` picks cuda, then mps, then cpu; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (try --device cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: no Apple-silicon GPU is available (try --device cpu)")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def seed_everything(seed):
    """Seed Python, NumPy and torch; returns a torch.Generator for sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# Run folders, atomic writes, checkpoints

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


def atomic_write_text(path, text):
    """Write to a temporary file, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def save_torch(obj, path):
    """torch.save to a temporary file, then rename (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_torch(path, map_location="cpu"):
    """torch.load with weights_only=True; a missing, truncated or tampered file is a clear error."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path} is not a readable checkpoint: {_load_problem(e)}") from None


def _load_problem(error):
    """One line on why torch.load failed (its own messages run over several lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, pickle.UnpicklingError):      # weights_only=True refused an object
        refused = next((line for line in lines if "GLOBAL" in line or "global" in line), "")
        return ("it holds objects other than tensors and plain containers, which minirlhf never loads "
                f"(weights_only=True){': ' + refused.rstrip('.') if refused else ''}")
    first = lines[0].split(". ")[0] if lines else ""
    return f"truncated or corrupted ({type(error).__name__}{': ' + first[:160] if first else ''})"


# ---------------------------------------------------------------------------
# Metrics: a JSONL log, a NaN guard and plots

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


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or inf; the last good checkpoint is kept."""


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


def figure(*grid, figsize, **kwargs):
    """(fig, axes) from a standalone matplotlib Figure: saving it needs no pyplot and leaves the
    notebook's plotting backend alone (pyplot's global state is never touched)."""
    from matplotlib.figure import Figure
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


# ---------------------------------------------------------------------------
# Optimisation helpers shared by the supervised stages (SFT, reward model, DPO)

def cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr_ratio=0.1):
    """Linear warm-up to `base_lr`, then cosine decay to `min_lr_ratio * base_lr`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def fused_adam(parameters):
    """{"fused": True} where torch has a fused Adam kernel for the parameters' device, else {}.

    The fused kernel updates every parameter in one pass instead of a dozen small operations
    per tensor; with our small models those operations are a visible share of a step (SFT:
    about 14 % faster on 2 CPU cores, `benchmarks/bench_sft.py`). Same algorithm, same state."""
    return {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in parameters) else {}


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices only (not on biases, LayerNorms or gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **fused_adam(decay + no_decay))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer, loss, model, grad_clip):
    """Backpropagate `loss`, clip the global gradient norm of `model` to `grad_clip`, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def step_generator(seed, step):
    """A generator that depends only on (seed, step): batches are the same after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ---------------------------------------------------------------------------
# Checkpoints for --resume, and stopping cleanly on Ctrl-C or kill

class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; `--resume` continues it."""

    def __init__(self, step, out_dir):
        super().__init__(f"interrupted after step {step}; checkpoint saved in {out_dir}. "
                         "Run the same command with --resume to continue.")


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
    """Load checkpoint.pt into `modules`; return (step, metric rows logged up to that step)."""
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


def remove_checkpoint(out_dir):
    """A finished run needs no resume checkpoint (its model.pt is final)."""
    (Path(out_dir) / "checkpoint.pt").unlink(missing_ok=True)
