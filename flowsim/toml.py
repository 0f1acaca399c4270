"""TOML in and out: one reader of run configs (a path or the text itself) and one writer."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, bad_value


def read_toml(source: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(text, tables) of a TOML config: `source` is a path, or the TOML text itself (a string
    with a line break or starting with "["). ConfigError, naming `config`, when it cannot be
    read or parsed."""
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
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: not valid TOML ({exc})") from exc


def toml_value(value: Any) -> str:
    """One value (bool, number, string, list of these) as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dumps(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Tables of strings, numbers, booleans and lists as TOML text (None values are left out)."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None and not isinstance(v, dict)]
        lines.append("")
    return "\n".join(lines)


def run_toml(problem, dynamics, integrator, t1: float, save_every: float, seed: int, device, dtype) -> str:
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


__all__ = ["read_toml", "toml_value", "dumps", "run_toml"]
