"""Stage configs: range checks declared beside each field, `--set key=value`, and the one way a
config is built, used by the command line, `run` and `frontier` alike:

    the dataclass's defaults → the task's → a variant (Preferred-FT, plain DPO…) → --fast
        → the task's --fast → --seed → --set

(A task's settings for a stage are `tasks.stage_defaults(name, stage)`: its data files, sizes
and step counts; they come as dicts, since the tasks' modules import this one.)

A stage's config is a dataclass whose fields carry their own range check:

    steps: int = checked(350, POSITIVE)    # optimiser steps

`validate(config)` runs every field's check, then the config's `check_together()` (the few
rules that involve two fields), and raises a ConfigError naming the field.
"""
import dataclasses
import typing

import torch


class ConfigError(ValueError):
    """A bad `--set key=value`, an impossible value, or an unusable run folder."""


def require(condition, message):
    """Refuse an impossible value with a reason."""
    if not condition:
        raise ConfigError(message)


# ---------------------------------------------------------------------------
# Range checks, declared per field

@dataclasses.dataclass(frozen=True)
class Rule:
    """A check of one field's value, and what the error says when the value fails it."""
    ok: typing.Callable
    text: str


POSITIVE = Rule(lambda v: v > 0, "must be positive")
NON_NEGATIVE = Rule(lambda v: v >= 0, "must be >= 0")


def at_least(low):
    return Rule(lambda v: v >= low, f"must be at least {low}")


def between(low, high, low_open=False, high_open=False):
    """low ≤ v ≤ high; an open end excludes it. The message writes the interval: [0, 1)."""
    ok = lambda v: (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    return Rule(ok, f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def one_of(*choices):
    return Rule(lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}")


def checked(default, rule, why=""):
    """A dataclass field with a default and a range check; `why` is added to the error message."""
    return dataclasses.field(default=default, metadata={"rule": rule, "why": why})


SEED_RANGE = (0, 2**32)   # numpy's and most generators' seeds: 0 <= seed < 2**32


def check_seed(seed, name="seed"):
    require(seed is None or (isinstance(seed, int) and SEED_RANGE[0] <= seed < SEED_RANGE[1]),
            f"{name} must be an integer in [0, 2**32), got {seed!r}")


def validate(config):
    """Check every field that declares a rule, then `config.check_together()` if it has one.
    The seed that every stage has is checked here: in [0, 2**32). (The task's name is checked by the
    command line's `build_config`, before any training: the tasks' modules import this one.)"""
    names = {f.name for f in dataclasses.fields(config)}
    if "seed" in names:
        check_seed(config.seed)
    for field in dataclasses.fields(config):
        rule, value = field.metadata.get("rule"), getattr(config, field.name)
        if rule is not None and value is not None and not rule.ok(value):
            why = f" ({field.metadata['why']})" if field.metadata["why"] else ""
            shown = f", got {value!r}" if isinstance(value, str) else ""
            raise ConfigError(f"{field.name} {rule.text}{shown}{why}")
    if hasattr(config, "check_together"):
        config.check_together()
    return config


def check_generation_fits(config, block_size):
    """Refuse a config whose longest prompt plus completion would not fit the model's context."""
    require(config.max_prompt_tokens + config.max_new_tokens <= block_size,
            f"max_prompt_tokens + max_new_tokens ({config.max_prompt_tokens} + {config.max_new_tokens}) "
            f"exceeds the model's block_size ({block_size}): lower one of them with --set")


# ---------------------------------------------------------------------------
# Building a config: defaults → task → variant → --fast → task's --fast → seed → --set

def build(config, *, task=None, variant=None, fast=None, task_fast=None, seed=None, overrides=()):
    """`config` (a stage's defaults) with, in order, `task` (the task's settings for this stage),
    `variant`, `fast` (the stage's FAST dict, or None), `task_fast` (the task's own --fast
    settings, or None), `seed` (None: keep), then each of `overrides` (dicts or `--set` lists);
    last word wins."""
    for layer in (task, variant, fast, task_fast, None if seed is None else {"seed": seed}, *overrides):
        if layer:
            config = apply_overrides(config, layer)
    return config


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


# ---------------------------------------------------------------------------
# --device

def pick_device(name="auto"):
    """`auto` picks cuda, then mps, then cpu; an unavailable device is a clear error."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (try --device cpu)")
    if name == "mps" and not mps:
        raise ConfigError("--device mps: no Apple-silicon GPU is available (try --device cpu)")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)
