"""Configs (minirlhf/config.py): the order in which a config is built, and the per-field checks.

Hand examples: `build` applies defaults → the task's → variant → --fast → the task's --fast →
seed → --set, the last word winning; a field's rule names the field, the rule and, where given, the reason; a
two-field rule (`check_together`) runs after the field rules.
"""
import dataclasses

import pytest

from minirlhf.config import (NON_NEGATIVE, POSITIVE, ConfigError, at_least, between, build, checked, one_of,
                             require, validate)


@dataclasses.dataclass
class Toy:
    steps: int = checked(10, POSITIVE)
    lr: float = checked(1e-3, POSITIVE, "a step needs a size")
    dropout: float = checked(0.0, between(0, 1, high_open=True))
    decay: float = checked(0.0, NON_NEGATIVE)
    k: int = checked(4, at_least(2))
    kind: str = checked("a", one_of("a", "b"))
    warmup: int = 0
    seed: int = 0

    validate = validate

    def check_together(self):
        require(self.warmup <= self.steps, "warmup must not exceed steps")


def test_build_applies_variant_fast_seed_then_overrides_last_word_wins():
    config = build(Toy(), variant={"steps": 20, "lr": 0.5}, fast={"steps": 3, "k": 3}, seed=7,
                   overrides=[{"k": 5}, ["lr=0.25", "seed=9"]])
    assert (config.steps, config.lr, config.k, config.seed) == (3, 0.25, 5, 9)
    assert build(Toy(), fast=None, seed=None) == Toy(), "nothing given: the defaults"


def test_the_task_layer_comes_after_the_defaults_and_before_fast_and_set():
    config = build(Toy(), task={"steps": 50, "lr": 0.5, "k": 6, "decay": 0.1}, fast={"steps": 3, "lr": 0.2},
                   task_fast={"lr": 0.1}, overrides=[["k=7"]])
    # steps: the stage's --fast beats the task; lr: the task's --fast beats the stage's; k: --set beats all
    assert (config.steps, config.lr, config.k, config.decay) == (3, 0.1, 7, 0.1)
    assert build(Toy(), task={"steps": 50}, task_fast={"steps": 5}).steps == 5


@pytest.mark.parametrize("setting, message", [
    ({"steps": 0}, "steps must be positive"),
    ({"lr": -1.0}, "lr must be positive (a step needs a size)"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"decay": -0.1}, "decay must be >= 0"),
    ({"k": 1}, "k must be at least 2"),
    ({"kind": "c"}, "kind must be one of a, b, got 'c'"),
    ({"warmup": 11}, "warmup must not exceed steps"),
])
def test_each_rule_names_the_field_and_the_reason(setting, message):
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(Toy(), **setting).validate()
    assert str(error.value) == message


def test_the_defaults_pass_and_validate_returns_the_config():
    assert Toy().validate() == Toy()
    assert dataclasses.replace(Toy(), dropout=0.0, decay=0.0, k=2, warmup=10).validate().k == 2   # the closed ends
