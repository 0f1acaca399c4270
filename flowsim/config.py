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

import dataclasses
import inspect
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, FlowsimError, bad_value, check_seed

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
        from .simulate import simulate

        return simulate(self.problem, self.dynamics, self.integrator, config=self.text, **{**self.run, **overrides})


def _call_with(fn: Callable, section: str, args: Mapping[str, Any]) -> Any:
    """fn(**args), with unknown keys and wrong types reported as ConfigError naming the key."""
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
        why = next(iter(str(exc).strip().splitlines()), "")  # torch's messages go on with a C++ trace
        raise ConfigError(f"{section}: {fn.__name__} refused {dict(args)} ({type(exc).__name__}: {why})") from exc


def _check_like_default(field: str, value: Any, default: Any) -> None:
    """A key whose default is a bool, a number or a string takes a value of that kind (an int
    where the default is a float too); other checks are the function's own."""
    if isinstance(default, bool):
        expected, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, (int, float)):
        kind = int if isinstance(default, int) else (int, float)
        expected, ok = ("an integer" if kind is int else "a number"), isinstance(value, kind) and not isinstance(value, bool)
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
    from flowsim.models import DATA_ARGUMENTS

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
    for arg in inspect.signature(factory).parameters:
        source = DATA_ARGUMENTS.get(arg)
        if source and arg not in filled and read[source] is not None:
            filled[arg] = read[source]
    return filled


def load_config(source: str | os.PathLike, **run_overrides: Any) -> RunConfig:
    """Parse and validate a TOML config (a path, or the TOML text itself: a string with a line
    break or starting with "[") and build its objects.

    Every key is checked before anything runs; an error names the section and key."""
    from flowsim import data as data_module
    from flowsim import models
    from flowsim.dynamics import DYNAMICS
    from flowsim.integrators import INTEGRATORS
    from flowsim.problem import Problem

    if not isinstance(source, (str, os.PathLike)) or source == "":
        raise bad_value("config", source, "a path to a TOML file, or TOML text")
    if isinstance(source, str) and ("\n" in source or source.lstrip().startswith("[")):
        text = source
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8") if path.is_file() else None
        except UnicodeDecodeError as exc:
            why = f"{exc.reason} at byte {exc.start}"
            raise ConfigError(f"config: {str(path)!r} is not UTF-8 text ({why}); expected a TOML file") from exc
        except (OSError, ValueError) as exc:  # unreadable, a name too long, a NUL in it
            why = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"config: {str(path)[:200]!r} cannot be read ({why}); expected a readable TOML file") from exc
        if text is None:
            raise ConfigError(f"config: {str(path)!r} is not a file")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: not valid TOML ({exc})") from exc
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
    factory = models.factory(model_args.pop("name", None))
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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dumps(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Tables of strings, numbers, booleans and lists as TOML text (None values are left out)."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None and not isinstance(v, dict)]
        lines.append("")
    return "\n".join(lines)


def to_toml(problem, dynamics, integrator, t1: float, save_every: float, seed: int, device, dtype) -> str:
    """The TOML of a run started from Python: what a config would say, the model and data
    described in comments (they are Python objects, not zoo names)."""
    header = (
        f"# run started from Python: model {type(problem.model).__name__} with {problem.n_params} parameters, "
        f"data of {problem.n_examples} examples\n"
    )
    fields = {f.name: getattr(dynamics, f.name) for f in dataclasses.fields(dynamics)}
    integrator_fields = {k: v for k, v in integrator.describe().items() if k != "name" and not isinstance(v, dict)}
    return header + dumps(
        {
            "problem": {"loss": problem.loss_kind, "weight_decay": problem.weight_decay},
            "dynamics": {"name": dynamics.name, **fields},
            "integrator": {"name": type(integrator).__name__, **integrator_fields},
            "run": {
                "t1": t1,
                "save_every": save_every,
                "seed": seed,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
            },
        }
    )
