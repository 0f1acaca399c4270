"""The zoo's argument checks, in plain Python: a wrong kind of value is a TypeError, a value out
of range a ValueError, with the message ``name: got value; expected what``, e.g.
``depth: got 0; expected an integer >= 1``."""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Any

#: the most layers (or blocks) a zoo model may have: beyond it a factory would build layers
#: until memory runs out
MAX_DEPTH = 10_000


def refusal(name: str, value: Any, expected: str, cls: type[Exception] = ValueError) -> Exception:
    """The error ``cls("name: got value; expected ...")``."""
    return cls(f"{name}: got {value!r}; expected {expected}")


def number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> Any:
    """`value` as a plain int (`integer`) or float if it is a finite number in range, Python's or
    numpy's (any ``numbers.Integral`` or ``numbers.Real`` but a bool); else TypeError (not a
    number of that kind) or ValueError (NaN, infinite, beyond a float, or out of range)."""
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise refusal(name, value, kind, TypeError)
    try:
        value = int(value) if integer else float(value)
    except OverflowError:  # an int too large for a float
        raise refusal(name, value, kind) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise refusal(name, value, kind)
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        raise refusal(name, value, f"{kind} {'>' if exclusive_minimum else '>='} {minimum}")
    if maximum is not None and value > maximum:
        raise refusal(name, value, f"{kind} <= {maximum}")
    return value


def flag(name: str, value: Any) -> bool:
    """`value` if it is a bool (true or false), else TypeError."""
    if not isinstance(value, bool):
        raise refusal(name, value, "true or false", TypeError)
    return value


def one_of(name: str, value: Any, choices: Collection[str]) -> Any:
    """`value` if it is one of `choices`, else ValueError listing them."""
    try:
        known = value in choices
    except (TypeError, ValueError):  # unhashable, or an array compared elementwise
        known = False
    if not known:
        raise refusal(name, value, f"one of {', '.join(choices)}")
    return value
