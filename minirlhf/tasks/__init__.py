"""Toy tasks. Each task module offers `make_datasets`, `write_datasets` and
`gold_reward(texts) -> list[float]` in [0, 1]. A task may also offer

    DATA_SUBDIR      its files live in data/<DATA_SUBDIR>/ (the reviews task: data/ itself)
    STAGE_DEFAULTS   {stage: {field: value}}: data paths, sizes and steps that suit it, applied
                     after a stage's own defaults (config.build); "<stage>_fast" for --fast
    format_reward    a verifier task's format check, logged beside (never mixed into) gold
"""
from minirlhf.config import build
from minirlhf.data import DATA_DIR
from minirlhf.tasks import arithmetic, reviews

TASKS = {"reviews": reviews, "arithmetic": arithmetic, "arithmetic_lenient": arithmetic.LENIENT}


def get_task(name="reviews"):
    """The task module called `name`; an unknown name lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def is_verifiable(name):
    """A task whose gold judge is a verifier (rewards 0/1): it has a format check."""
    return hasattr(get_task(name), "format_reward")


def format_fn(name):
    """The task's format check (texts -> list of 0/1), or None for a task without one."""
    return getattr(get_task(name), "format_reward", None)


def task_path(name, split):
    """data/[<subdir>/]<split>.jsonl of the task `name`."""
    return DATA_DIR / getattr(get_task(name), "DATA_SUBDIR", "") / f"{split}.jsonl"


def same_data(a, b):
    """Tasks on the same data (arithmetic and its lenient twin): a model of one serves the other."""
    return getattr(get_task(a), "DATA_SUBDIR", "") == getattr(get_task(b), "DATA_SUBDIR", "")


def stage_defaults(name, stage, fast=False):
    """The task's settings for `stage`, or with `fast` its --fast settings: a dict, maybe empty."""
    return getattr(get_task(name), "STAGE_DEFAULTS", {}).get(f"{stage}_fast" if fast else stage, {})


def task_config(defaults, stage, task, *, fast=False, stage_fast=None, seed=None, overrides=()):
    """A stage's config for `task`: the stage's `defaults`, the task's settings for `stage`, the
    stage's own --fast dict `stage_fast` and the task's (when `fast`), `seed`, then `overrides`."""
    return build(defaults, task={"task": task, **stage_defaults(task, stage)}, fast=stage_fast if fast else None,
                 task_fast=stage_defaults(task, stage, fast=True) if fast else None, seed=seed, overrides=overrides)
