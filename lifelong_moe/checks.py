"""The validation vocabulary: each check raises one ConfigError line naming key, value, expectation.

Every module that validates user input calls these instead of writing its own
``isinstance(value, bool) or not isinstance(value, int)`` test, so the wording is the same
everywhere: ``method.lr='abc': expected a number > 0``. ``key`` is the full dotted config key.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from lifelong_moe.errors import ConfigError


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key}={value!r}: expected {expected}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's ``true`` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bounded(
    kind: str,
    low: float | None,
    high: float | None,
    low_open: bool = False,
    high_open: bool = False,
) -> str:
    """What a value must be: ``an integer in [0, 9]``, ``a number > 0``, ``a number``."""
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"{kind} in {left}{low}, {high}{right}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


def integer(key: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """An integer in [low, high] (either bound optional)."""
    if (
        not is_int(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        positive = low == 1 and high is None
        _fail(key, value, "a positive integer" if positive else _bounded("an integer", low, high))
    return value


def positive_int(key: str, value: Any) -> int:
    return integer(key, value, low=1)


def non_negative_int(key: str, value: Any) -> int:
    return integer(key, value, low=0)


def number(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A real number in the interval given by low/high (closed unless ``*_open``)."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        _fail(key, value, _bounded("a number", low, high, low_open, high_open))
    return value


def positive(key: str, value: Any) -> float:
    return number(key, value, low=0, low_open=True)


def non_negative(key: str, value: Any) -> float:
    return number(key, value, low=0)


def fraction(key: str, value: Any, *, high_open: bool = False) -> float:
    """A number in [0, 1] (or [0, 1) with ``high_open``)."""
    return number(key, value, low=0, high=1, high_open=high_open)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(key, value, "true or false")
    return value


def choice(key: str, value: Any, valid: Collection[Any]) -> Any:
    if value not in valid:
        _fail(key, value, "one of " + ", ".join(str(v) for v in valid))
    return value


def optional(check: Any, key: str, value: Any, **kwargs: Any) -> Any:
    """``check`` unless the value is None (YAML ``null``)."""
    return None if value is None else check(key, value, **kwargs)
