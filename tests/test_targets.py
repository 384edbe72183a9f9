"""A _target_'s parameters, including those its **kwargs pass on to a base class."""

from __future__ import annotations

from typing import Any

import pytest

from lifelong_moe.errors import ConfigError
from lifelong_moe.targets import parameters


class Base:
    def __init__(self, model: Any, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        pass


class Child(Base):
    def __init__(self, model: Any, strength: int = 1, **base: Any) -> None:
        super().__init__(model, **base)


class Open:
    def __init__(self, **anything: Any) -> None:
        pass


def test_kwargs_passed_to_the_base_bring_its_parameters() -> None:
    found = parameters(f"{__name__}.Child")
    assert found == {"model": Any, "strength": int, "lr": float, "weight_decay": float}


def test_kwargs_that_end_nowhere_stay_open() -> None:
    assert parameters(f"{__name__}.Open") == {"**": Any}


def test_every_method_keeps_the_common_arguments_checked() -> None:
    for method in ("ewc.EWC", "lwf.LwF", "replay.Replay", "lifelong_moe.LifelongMoE"):
        found = parameters(f"lifelong_moe.methods.{method}")
        assert {"lr", "weight_decay", "replay_fraction"} <= set(found), method
        assert "**" not in found, method


def test_an_unimportable_target_is_one_line() -> None:
    with pytest.raises(ConfigError, match="expected an importable class"):
        parameters("lifelong_moe.methods.nothing.Here")
