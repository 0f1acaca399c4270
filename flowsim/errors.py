"""The errors flowsim raises on purpose.

Every user mistake is a :class:`FlowsimError` raised before any work starts; its message
names the field, the value seen and what was expected.  The command line prints it on one
line and exits with status 2.
"""

from __future__ import annotations

import numbers
from typing import Any

from .models import checks

#: the largest seed: seeds are 64-bit signed integers (torch.manual_seed, numpy, the checkpoints)
MAX_SEED = 2**63 - 1


class FlowsimError(Exception):
    """Base class of every error flowsim raises on purpose."""


class ConfigError(FlowsimError, ValueError):
    """A run setting (keyword argument or TOML key) is missing, mistyped or out of range."""


class ModelError(FlowsimError, ValueError):
    """The model cannot be built, evaluated or analysed as asked."""


class DataError(FlowsimError, ValueError):
    """The data are malformed: shapes, dtypes, label ranges, sizes."""


class RecordError(FlowsimError, ValueError):
    """An output store cannot be written or read as asked (exists, damaged, wrong schema)."""


def bad_value(field: str, value: Any, expected: str, cls: type[FlowsimError] = ConfigError) -> FlowsimError:
    """Build the standard message: ``field: got value; expected ...``."""
    return cls(f"{field}: got {value!r}; expected {expected}")


def check_number(
    field: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    cls: type[FlowsimError] = ConfigError,
) -> Any:
    """Return `value` as a plain int or float if it is a finite number in range (Python's or
    numpy's: any ``numbers.Integral`` or ``numbers.Real`` but a bool), else raise `cls`: the
    zoo's check (``flowsim.models.checks.number``) with its error raised as `cls`."""
    try:
        return checks.number(field, value, integer=integer, minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum)
    except (TypeError, ValueError) as exc:
        raise cls(str(exc)) from None


def check_field(obj: Any, section: str, name: str, **limits: Any) -> None:
    """check_number on the field `name` of a (frozen) dataclass, which then holds the plain
    int or float (so a numpy scalar never reaches its description, coords or TOML)."""
    object.__setattr__(obj, name, check_number(f"{section}.{name}", getattr(obj, name), **limits))


def check_seed(field: str, value: Any, cls: type[FlowsimError] = ConfigError) -> int:
    """Return `value` as a plain int if it is a seed, an integer in 0 … 2**63 − 1, else raise `cls`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_SEED:
        raise bad_value(field, value, "an integer in 0 … 2**63 − 1", cls)
    return int(value)


class IntegrationError(FlowsimError, RuntimeError):
    """An integration could not go on (step-size underflow, non-finite state, too many steps).

    ``simulate`` turns it into ``status="diverged"``, keeping every point saved before."""


def check_flag(field: str, value: Any, cls: type[FlowsimError] = ConfigError) -> bool:
    """Return `value` if it is a bool (true or false), else raise `cls` (the zoo's check,
    ``flowsim.models.checks.flag``)."""
    try:
        return checks.flag(field, value)
    except TypeError as exc:
        raise cls(str(exc)) from None


def check_fits_memory(field: str, needed: int, what: str, expected: str) -> None:
    """Raise ConfigError naming `field` if `needed` bytes (of `what`) exceed half of the host's
    memory; `expected` says what to ask for instead."""
    import os

    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX host: nothing to compare with
        return
    if needed > memory / 2:
        raise ConfigError(
            f"{field}: {what} would take {needed / 2**30:.3g} GiB, more than half of the {memory / 2**30:.3g} GiB "
            f"of host memory; expected {expected}"
        )
