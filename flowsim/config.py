"""TOML run configs: parsing, validation (every key, before any work) and writing.

    [model]       name = "<module>.<factory>" of the zoo; other keys are its arguments
    [data]        name = "<function>" of flowsim.data; other keys are its arguments
    [problem]     loss, weight_decay, chunk_size
    [dynamics]    name = GradientFlow | DiscreteSGD | …; other keys are its hyper-parameters
    [integrator]  optional; name = ODE | Discrete | …; other keys are its arguments
    [run]         t1, save_every, observe, seed, device, dtype, out, overwrite, checkpoint_every, progress

A factory's data-shaped arguments (input size, number of outputs) come from the data when the
config leaves them out, so ``[model] name = "cnn.vgg"`` alone works on digits.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import zoo
from .errors import ConfigError, FlowsimError, bad_value, check_seed
from .toml import read_toml

SECTIONS = ("model", "data", "problem", "dynamics", "integrator", "run")
PROBLEM_KEYS = ("loss", "weight_decay", "chunk_size")
RUN_KEYS = ("t1", "save_every", "observe", "seed", "device", "dtype", "out", "overwrite", "checkpoint_every", "progress")
RUN_KEYS += ("ensemble",)  # simulate(ensemble=K): K members from seeds (seed, k)


@dataclass
class RunConfig:
    """A validated config: the objects to run and the keyword arguments of ``simulate``."""

    problem: Any
    dynamics: Any
    integrator: Any
    run: dict[str, Any]
    text: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def simulate(self, **overrides: Any):
        """Run it (``overrides`` replace [run] keys, e.g. out= or progress=)."""
        from .simulation import simulate

        return simulate(self.problem, self.dynamics, self.integrator, config=self.text, **{**self.run, **overrides})


def _call_with(fn: Callable, section: str, args: Mapping[str, Any]) -> Any:
    """fn(**args), with unknown keys and wrong types reported as ConfigError naming the key.

    A TypeError or ValueError whose message starts with one of fn's argument names, as the
    zoo's are (``depth: got 0; expected an integer >= 1``), becomes
    ``ConfigError("<section>.depth: got 0; …")``; any other error of fn names the section."""
    params = inspect.signature(fn).parameters
    accepted = [p for p in params if params[p].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for key in args:
        if key not in accepted:
            raise ConfigError(f"{section}.{key}: unknown key; {section} accepts {', '.join(accepted) or 'no keys'}")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in args]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}: missing; it has no default")
    for key, value in args.items():
        _check_like_default(f"{section}.{key}", value, params[key].default)
    try:
        return fn(**args)
    except FlowsimError:
        raise
    except (TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as exc:
        argument, colon, _ = str(exc).partition(":")
        if isinstance(exc, (TypeError, ValueError)) and colon and argument in accepted:
            raise ConfigError(f"{section}.{exc}") from exc
        why = next(iter(str(exc).strip().splitlines()), "")  # torch's messages go on with a C++ trace
        raise ConfigError(f"{section}: {fn.__name__} refused {dict(args)} ({type(exc).__name__}: {why})") from exc


def _check_like_default(field: str, value: Any, default: Any) -> None:
    """A key whose default is a bool, a number or a string takes a value of that kind (an int
    where the default is a float too; true or false too where the default is "auto", a switch
    the library decides unless told, as RK's compile); other checks are the function's own."""
    if isinstance(default, bool):
        expected, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, (int, float)):
        kind = int if isinstance(default, int) else (int, float)
        expected, ok = ("an integer" if kind is int else "a number"), isinstance(value, kind) and not isinstance(value, bool)
    elif isinstance(default, str) and default == "auto":
        expected, ok = 'true, false or a string', isinstance(value, (bool, str))
    elif isinstance(default, str):
        expected, ok = "a string", isinstance(value, str)
    else:
        return
    if not ok:
        raise bad_value(field, value, expected)


def _named(section: str, table: Mapping[str, Any], choices: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    table = dict(table)
    name = table.pop("name", None)
    if name is None:
        raise ConfigError(f"{section}.name: missing; expected one of {', '.join(choices)}")
    if not isinstance(name, str) or name not in choices:
        raise ConfigError(f"{section}.name: got {name!r}; expected one of {', '.join(choices)}")
    return choices[name], table


def _data_shaped_arguments(
    factory: Callable, model_args: dict[str, Any], X: torch.Tensor, y: torch.Tensor, loss: str
) -> dict[str, Any]:
    if loss == "cross_entropy":
        outputs = int(y.max()) + 1 if not y.is_floating_point() else None
    else:
        outputs = 1 if y.ndim == 1 else math.prod(y.shape[1:])
    read = {
        "features": math.prod(X.shape[1:]),
        "channels": X.shape[1] if X.ndim >= 3 else None,
        "size": X.shape[-1] if X.ndim >= 3 else None,
        "outputs": outputs,
    }
    filled = dict(model_args)
    for arg in zoo.parameters_of(factory):
        source = zoo.DATA_ARGUMENTS.get(arg)
        if source and arg not in filled and read[source] is not None:
            filled[arg] = read[source]
    return filled


def load_config(source: str | os.PathLike, **run_overrides: Any) -> RunConfig:
    """Parse and validate a TOML config (a path, or the TOML text itself: a string with a line
    break or starting with "[") and build its objects.

    Every key is checked before anything runs; an error names the section and key."""
    from flowsim import data as data_module
    from flowsim.dynamics import DYNAMICS
    from flowsim.integrators import INTEGRATORS
    from flowsim.problem import Problem

    text, raw = read_toml(source)
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section; expected {', '.join(SECTIONS)}")
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a [{section}] table")
    for section in ("model", "data", "dynamics", "run"):
        if section not in raw:
            raise ConfigError(f"{section}: missing section [{section}]")
    run = dict(raw["run"])
    run.update({k: v for k, v in run_overrides.items() if v is not None})
    for key in run:
        if key not in RUN_KEYS:
            raise ConfigError(f"run.{key}: unknown key; run accepts {', '.join(RUN_KEYS)}")
    for key in raw.get("problem", {}):
        if key not in PROBLEM_KEYS:
            raise ConfigError(f"problem.{key}: unknown key; problem accepts {', '.join(PROBLEM_KEYS)}")
    for key in ("t1", "save_every"):
        if key not in run:
            raise ConfigError(f"run.{key}: missing")
    if "seed" in run:
        run["seed"] = check_seed("run.seed", run["seed"])

    # objects that are cheap and checked by their own constructors come first
    dynamics_cls, dynamics_args = _named("dynamics", raw["dynamics"], DYNAMICS)
    dynamics = _call_with(dynamics_cls, "dynamics", dynamics_args)
    integrator = None
    if "integrator" in raw:
        integrator_cls, integrator_args = _named("integrator", raw["integrator"], INTEGRATORS)
        integrator = _call_with(integrator_cls, "integrator", integrator_args)
    data_args = dict(raw["data"])
    data_name = data_args.pop("name", None)
    if data_name not in data_module.NAMES:
        raise ConfigError(f"data.name: got {data_name!r}; expected one of {', '.join(data_module.NAMES)}")
    X, y = _call_with(getattr(data_module, data_name), "data", data_args)
    problem_args = dict(raw.get("problem", {}))
    loss = problem_args.get("loss", "cross_entropy")
    model_args = dict(raw["model"])
    factory = zoo.factory(model_args.pop("name", None))
    model_args = _data_shaped_arguments(factory, model_args, X, y, loss)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.get("seed", 0))
        model = _call_with(factory, "model", model_args)

    def problem_from(loss: str = "cross_entropy", weight_decay: float = 0.0, chunk_size: int | None = None) -> Problem:
        return Problem(model, (X, y), loss=loss, weight_decay=weight_decay, chunk_size=chunk_size)

    problem = _call_with(problem_from, "problem", problem_args)
    if "dtype" in run and not isinstance(run["dtype"], str):
        raise ConfigError(f'run.dtype: got {run["dtype"]!r}; expected "float32" or "float64"')
    sections = {s: dict(raw.get(s, {})) for s in SECTIONS}
    sections["model"].update({k: v for k, v in model_args.items()})
    return RunConfig(problem, dynamics, integrator, run, text, sections)


def run_config(source: str | os.PathLike, **run_overrides: Any):
    """Load, validate and run a TOML config; returns its Dataset."""
    return load_config(source, **run_overrides).simulate()
