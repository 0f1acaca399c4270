"""Property-based fuzz of the config layer: whatever TOML a user writes, `flowsim.run_config`
either runs (a Dataset) or raises a `FlowsimError`, and nothing outside the run's own output
changes on disk.

Documents are built from a few small valid configs (so that a good share of the examples run)
and one to three mutations: any key a section accepts (`config.SECTIONS`, `PROBLEM_KEYS`,
`RUN_KEYS`, and the keyword arguments of the zoo factories, data functions, dynamics and
integrators, read from their signatures), unknown keys and sections, deleted keys and sections,
sections that are not tables, nested tables and arrays, and values of every TOML type: zero,
negative, huge (beyond int64 and float64 too), NaN and infinities, dates, odd strings (control
characters, non-ASCII, 300 characters, paths that leave the folder). Some documents are broken
as text (cut short, a comment before the first table, a table twice, random text), and some
sources are paths to files that are not configs.

Every example runs in a folder (the working directory, copied afresh after an example that
changed it) that holds a user's files: a zarr store and a netCDF file that are not flowsim
records, a read-only folder (not read-only to root), a text file, a valid config, and flowsim
records (zarr and netCDF) that overwrite may replace; a file beside the folder catches writes
to ``..``. After the example every path outside the run's declared output (``[run] out``, and
the files flowsim keeps beside it, ``<out>.*``) is byte-identical, no file that is not a
flowsim record has changed even when it is the declared output, a FlowsimError leaves
everything as it was, and a run's output opens as a record with nothing left beside it.

Runs that are valid but long (many steps or save points, big models, many paths or members) are
not drawn: flowsim runs what it is asked to, and the fuzz must end in seconds. Bugs found by the
fuzz are pinned by `KNOWN_BUGS`: each is a minimal reproduction under
``xfail(strict=True)``, and the fuzz lets that exact failure pass (and nothing else) until the
bug is fixed and its entry removed.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import inspect
import math
import os
import shutil
import stat
import tempfile
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import flowsim as fs
from flowsim import config as fs_config
from flowsim import data as fs_data
from flowsim import zoo
from flowsim.dynamics import DYNAMICS
from flowsim.integrators import INTEGRATORS

# ------------------------------------------------------------------ what a config accepts


def _parameters(fn) -> dict[str, object]:
    """name -> default (inspect.Parameter.empty if none) of a constructor or function."""
    if dataclasses.is_dataclass(fn):
        return {
            f.name: (f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty)
            for f in dataclasses.fields(fn)
            if f.init
        }
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _zoo() -> dict[str, object]:
    import importlib

    return {
        f"{module}.{name}": getattr(importlib.import_module(f"flowsim.models.{module}"), name)
        for module, names in zoo.ZOO.items()
        for name in names
    }


ZOO = _zoo()
#: the names a [section] name key may take
NAMES = {"model": list(ZOO), "data": list(fs_data.NAMES), "dynamics": list(DYNAMICS), "integrator": list(INTEGRATORS)}
#: every key each section accepts (for some name), with the defaults seen for it
KEYS: dict[str, dict[str, list]] = {section: {} for section in fs_config.SECTIONS}
for _section, _functions in (
    ("model", ZOO.values()),
    ("data", [getattr(fs_data, n) for n in fs_data.NAMES]),
    ("dynamics", DYNAMICS.values()),
    ("integrator", INTEGRATORS.values()),
):
    KEYS[_section]["name"] = []
    for _fn in _functions:
        for _key, _default in _parameters(_fn).items():
            KEYS[_section].setdefault(_key, []).append(_default)
for _key in fs_config.PROBLEM_KEYS:
    KEYS["problem"][_key] = []
for _key in fs_config.RUN_KEYS:
    KEYS["run"][_key] = []
UNKNOWN_KEYS = ["colour", "Name", "lr ", "", "é", "run.t1", "name.sub", "1", "t1", "__class__", "overwrite"]
UNKNOWN_SECTIONS = ["weather", "Run", "models", "run.sub", ""]

# ------------------------------------------------------------------ values

ODD_VALUES = [
    0, 1, -1, 2, 3, 17, 2**31, 2**62, 2**63 - 1, 2**63, 10**30, -(2**63) - 1,
    0.0, -0.0, 0.5, 1.5, -0.1, 1e-300, 5e-324, 1e300, 1.7976931348623157e308, math.nan, math.inf, -math.inf,
    True, False,
    "", " ", "0.1", "nan", "true", "None", "ünï©ødé", "😀", "a\nb", "tab\there", "nul\x00byte", "x" * 300,
    "../escape.zarr", "/", ".", "~", "run.zarr",
    [], [1, 2], ["loss"], [[1]], [1, "a"], [{}],
    {}, {"a": 1}, {"name": "dopri5"}, {"a": {"b": []}},
    datetime.date(1979, 5, 27), datetime.datetime(1979, 5, 27, 7, 32, tzinfo=datetime.timezone.utc), datetime.time(7, 32),
]  # fmt: skip

#: values a user might well write for a key (beside its defaults)
PLAUSIBLE = {
    "method": ["dopri5", "rk4", "euler", "midpoint", "bosh3", "adaptive_heun", "implicit_adams", "DOP853", "RK45", "LSODA",
               "krogstad", "cox_matthews", "milstein", "srk", "heun", "rk45"],
    "loss": ["cross_entropy", "mse", "hinge"],
    "observe": [["loss"], ["loss", "grad_norm"], ["sharpness"], ["params"], [], ["loss", "loss"], ["energy"]],
    "dtype": ["float32", "float64", "float16", "int64", "torch.float64"],
    "device": ["cpu", "cpu:0", "cuda", "mps", "meta", "tpu", ""],
    "out": ["run.zarr", "run.nc", "sub/run.zarr", "ro/run.zarr", "data.zarr", "keep.nc", "user.txt", "old.zarr", "old.nc",
            "data.zarr/inner.zarr", "../up.zarr", "@ROOT@/abs.zarr", "run.csv", "", ".zarr", "run.zarr/", " run.zarr",
            "run.ZARR", "~/run.zarr", "old.zarr/.zarr", "x" * 300 + ".zarr", "nul\x00.zarr"],
    "overwrite": [True, False],
    "progress": [True, False],
    "drift": ["gradient", "modified"],
    "noise": ["exact", "diagonal"],
    "sampling": ["epoch", "independent"],
    "task": ["regression", "classification"],
    "norm": ["pre", "post", "none"],
    "activation": ["relu", "leaky_relu", "identity", "tanh", "gelu"],
    "start": ["rest", "gradient"],
    "form": ["second_order", "first_order"],
    "seed": [0, 1, 7, 2**32, 2**63 - 1, 2**63, -1],
    "t1": [0.1, 0.2, 0.3, 0.25, 1.0],
    "save_every": [0.1, 0.05, 0.15, 0.3, 0.2],
    "checkpoint_every": [0, 0.0, 60, 1e-9],
    "lr": [0.05, 0.1, 0.2, 0.3],
    "dt": [0.05, 0.1, 0.03],
    "step_size": [0.05, 0.1, 0.03],
    "batch_size": [1, 4, 8, 16, 17],
    "paths": [1, 2, 3],
    "ensemble": [1, 2, 3],
    "momentum": [0.0, 0.5, 0.9, 1.0],
    "dampening": [0.0, 0.5, 1.0],
    "weight_decay": [0.0, 1e-3, 0.1],
    "chunk_size": [1, 4, 1000],
    "n_train": [8, 16, 1797, 1798],
    "n": [8, 16, 32],
    "width": [1, 2, 4, 8],
    "depth": [0, 1, 2],
    "hidden": [2, 4, 8],
    "heads": [1, 2, 3],
    "head_dim": [1, 2, 4],
    "options": [{}, {"max_num_steps": 10}, {"first_step": 0.01}, {"foo": 1}],
    "max_steps": [1, 5, 10**6],
    "rtol": [1e-3, 1e-6, 1e-16],
    "atol": [1e-6, 1e-9, 0.0],
}  # fmt: skip
for _section in NAMES:
    PLAUSIBLE.setdefault(f"{_section}.name", NAMES[_section] + ["nope", "mlp", "cnn.resnet"])


def values_for(section: str, key: str):
    """A strategy for the value of `section.key`: its defaults, plausible values, or odd ones."""
    seen = [d for d in KEYS.get(section, {}).get(key, []) if d is not inspect.Parameter.empty and d is not None]
    seen = [d for d in seen if isinstance(d, (bool, int, float, str, list))]
    plausible = PLAUSIBLE.get(f"{section}.{key}", PLAUSIBLE.get(key, [])) + seen
    choices = [st.sampled_from(ODD_VALUES)]
    if plausible:
        choices = [st.sampled_from(plausible)] * 3 + choices
    return st.one_of(*choices)


# ------------------------------------------------------------------ documents

#: small valid configs; each runs in well under a second
BASES = {
    "sgd": {
        "model": {"name": "mlp.mlp", "depth": 1, "width": 4},
        "data": {"name": "digits", "n_train": 16},
        "problem": {"weight_decay": 1e-3},
        "dynamics": {"name": "DiscreteSGD", "lr": 0.1, "batch_size": 8, "momentum": 0.5},
        "run": {"t1": 0.3, "save_every": 0.1, "progress": False},
    },
    "ode": {
        "model": {"name": "mlp.mlp", "depth": 1, "width": 4},
        "data": {"name": "digits", "n_train": 16},
        "dynamics": {"name": "GradientFlow"},
        "integrator": {"name": "ODE", "method": "dopri5", "rtol": 1e-4, "atol": 1e-6},
        "run": {"t1": 0.2, "save_every": 0.1, "progress": False},
    },
    "sde": {
        "model": {"name": "mlp.mlp", "depth": 1, "width": 4},
        "data": {"name": "digits", "n_train": 16},
        "dynamics": {"name": "SGDNoise", "lr": 0.1, "batch_size": 4, "paths": 2},
        "integrator": {"name": "FusedEulerMaruyama", "dt": 0.05},
        "run": {"t1": 0.2, "save_every": 0.1, "progress": False},
    },
    "teacher": {
        "model": {"name": "mlp.mlp", "depth": 1, "width": 4},
        "data": {"name": "teacher_student", "n": 16, "in_features": 4, "hidden": 4},
        "problem": {"loss": "mse"},
        "dynamics": {"name": "MomentumFlow", "lr": 0.1, "momentum": 0.5},
        "integrator": {"name": "ODE", "method": "rk4", "step_size": 0.05},
        "run": {"t1": 0.2, "save_every": 0.1, "progress": False, "dtype": "float32"},
    },
    "attention": {
        "model": {"name": "attention.transformer", "width": 4, "hidden": 4, "heads": 1},
        "data": {"name": "sequences", "n": 8, "length": 4, "vocab": 4},
        "dynamics": {"name": "DiscreteSGD", "lr": 0.1},
        "run": {"t1": 0.2, "save_every": 0.1, "progress": False},
    },
    "vgg": {
        "model": {"name": "cnn.vgg", "depth": 1, "width": 2, "batch_norm": True},
        "data": {"name": "digits", "n_train": 8},
        "dynamics": {"name": "ModifiedFlow", "lr": 0.1},
        "run": {"t1": 0.1, "save_every": 0.1, "progress": False},
    },
}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value) -> str:
    """TOML for a value of any type tomllib reads (inline tables and arrays nest)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(doc: dict) -> str:
    """Top-level keys whose value is not a table first, then the tables."""
    lines = [f"{_toml_string(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{_toml_string(name)}]")
            lines += [f"{_toml_string(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


#: values that keep a base config valid, mostly (section, key -> values)
BENIGN = {
    ("run", "t1"): [0.1, 0.2, 0.3],
    ("run", "save_every"): [0.1, 0.2],
    ("run", "seed"): [0, 1, 7, 123456789],
    ("run", "observe"): [["loss"], ["loss", "grad_norm"], ["sharpness"], ["params"], []],
    ("run", "dtype"): ["float32", "float64"],
    ("run", "device"): ["cpu"],
    ("run", "checkpoint_every"): [0, 0.5, 60],
    ("run", "progress"): [True, False],
    ("run", "ensemble"): [1, 2],
    ("problem", "weight_decay"): [0.0, 1e-3, 0.01],
    ("problem", "chunk_size"): [4, 16],
    ("model", "width"): [2, 3],
    ("model", "bias"): [True, False],
    ("data", "seed"): [0, 1, 2],
    ("dynamics", "lr"): [0.05, 0.1],
    ("dynamics", "momentum"): [0.0, 0.9],
    ("dynamics", "batch_size"): [2, 4],
    ("integrator", "rtol"): [1e-3, 1e-5],
}


@st.composite
def mutation(draw, doc: dict) -> None:
    """Change `doc` in place: set (a plausible, a valid or an odd value), delete or nest a key,
    name an output, drop or replace a section."""
    kinds = ["benign"] * 4 + ["set"] * 4 + ["output"] * 2 + ["unknown key", "delete key", "delete section", "not a table", "nested", "new section"]
    kind = draw(st.sampled_from(kinds))
    sections = list(fs_config.SECTIONS)

    def table(section: str) -> dict:
        if not isinstance(doc.get(section, {}), dict):
            return {}  # a section made a non-table stays one
        return doc.setdefault(section, {})

    if kind == "benign":
        section, key = draw(st.sampled_from(sorted(BENIGN)))
        table(section)[key] = draw(st.sampled_from(BENIGN[section, key]))
    elif kind == "set":
        section = draw(st.sampled_from(sections))
        key = draw(st.sampled_from(sorted(KEYS[section]) or ["name"]))
        table(section)[key] = draw(values_for(section, key))
    elif kind == "output":
        table("run")["out"] = draw(st.sampled_from(PLAUSIBLE["out"]))
        if draw(st.booleans()):
            table("run")["overwrite"] = True
    elif kind == "unknown key":
        table(draw(st.sampled_from(sections)))[draw(st.sampled_from(UNKNOWN_KEYS))] = draw(st.sampled_from(ODD_VALUES))
    elif kind == "delete key":
        tables = [s for s in doc if isinstance(doc[s], dict) and doc[s]]
        if tables:
            section = draw(st.sampled_from(tables))
            del doc[section][draw(st.sampled_from(sorted(doc[section])))]
    elif kind == "delete section":
        doc.pop(draw(st.sampled_from(sections)), None)
    elif kind == "not a table":
        doc[draw(st.sampled_from(sections))] = draw(st.sampled_from([1, "run", [], [{"t1": 1}], True, math.nan]))
    elif kind == "nested":
        section = draw(st.sampled_from(sections))
        key = draw(st.sampled_from(sorted(KEYS[section]) + UNKNOWN_KEYS[:2]))
        table(section)[key] = {draw(st.sampled_from(["name", "value", "t1"])): draw(st.sampled_from(ODD_VALUES))}
    else:
        doc[draw(st.sampled_from(UNKNOWN_SECTIONS))] = {"sunny": True}


#: sources that are paths to files in the example's folder
PATH_SOURCES = ["good.toml", "keep.nc", "user.txt", "data.zarr", "missing.toml", "ro", "data.zarr/.zattrs"]


@st.composite
def sources(draw) -> str:
    """A config source: mostly the TOML text of a mutated base config."""
    if draw(st.integers(0, 24)) == 0:
        return draw(st.sampled_from(PATH_SOURCES))
    if draw(st.integers(0, 49)) == 0:
        return "[" + draw(st.text(max_size=40))
    doc = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 2, 3]))):
        draw(mutation(doc))
    text = toml_document(doc)
    broken = draw(st.sampled_from(["none"] * 40 + ["cut", "comment", "table twice", "garbage line", "bom"]))
    if broken == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif broken == "comment":
        text = "# my run\n" + text
    elif broken == "table twice":
        text = text + "[run]\nt1 = 1.0\n"
    elif broken == "garbage line":
        text = text + "???\n"
    elif broken == "bom":
        text = "\ufeff" + text
    return text


# ------------------------------------------------------------------ what must not happen


#: flowsim refuses runs longer than these (t1, steps, save points, zoo depth): beyond them the
#: fuzz draws anything, since flowsim must say no at once
LIMITS = {"t1": 1e9, "steps": 1e10, "save points": 1e7, "depth": 10_000, "members": 2**31, "size": 2**31}


def too_long(source: str) -> bool:
    """Whether the config may be a valid run that takes long: up to flowsim's limits, many steps
    or save points, a long time, a big model or data set, many paths or members (flowsim runs
    these as asked; the fuzz skips them)."""
    try:
        raw = tomllib.loads(source)
    except (tomllib.TOMLDecodeError, ValueError):
        return False
    tables = {k: v for k, v in raw.items() if isinstance(v, dict)}

    def number(table: str, key: str, value=None) -> float | None:
        v = tables.get(table, {}).get(key) if value is None else value
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 else None

    def count(table: str, key: str) -> int | None:
        v = tables.get(table, {}).get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    t1, save_every = number("run", "t1"), number("run", "save_every")
    if t1 is not None:
        if 5 < t1 <= LIMITS["t1"]:
            return True
        if save_every is not None and 100 < t1 / save_every <= LIMITS["save points"]:
            return True
        steps = [number("integrator", key) for key in ("dt", "step_size", "max_step", "dt_min", "first_step")]
        lr, damp = number("dynamics", "lr"), tables.get("dynamics", {}).get("dampening", 0)
        if lr is not None and isinstance(damp, (int, float)) and 0 <= damp < 1:
            steps.append(lr * (1 - damp))
        options = tables.get("integrator", {}).get("options")
        if isinstance(options, dict):
            steps += [number("", "", options.get(key)) for key in ("max_step", "step_size", "first_step", "min_step")]
        if any(step is not None and 400 < t1 / step <= LIMITS["steps"] for step in steps):
            return True
    if any(number("integrator", key) is not None and number("integrator", key) < 1e-12 for key in ("rtol", "atol")):
        return True
    for table, key, limit in (("model", "depth", LIMITS["depth"]), ("model", "stages", LIMITS["depth"]),
                              ("model", "blocks_per_stage", LIMITS["depth"]), ("model", "heads", LIMITS["members"]),
                              ("dynamics", "paths", LIMITS["members"]), ("run", "ensemble", LIMITS["members"])):  # fmt: skip
        v = count(table, key)
        if v is not None and 4 < v <= limit:
            return True  # a loop of that many
    for table, key in (("model", "width"), ("model", "hidden"), ("model", "d_model"), ("model", "head_dim"), ("model", "vocab"),
                       ("model", "length"), ("model", "in_features"), ("model", "out_features"), ("model", "num_classes"),
                       ("model", "image_size"), ("model", "in_channels"), ("data", "n"), ("data", "n_train"), ("data", "in_features"),
                       ("data", "hidden"), ("data", "out_features"), ("data", "length"), ("data", "vocab")):  # fmt: skip
        v = count(table, key)
        if v is not None and 64 < v < LIMITS["size"] and not (key == "n_train" and v <= 1797):
            return True  # allocates what it is asked for (far more fails at once)
    return False


def declared_output(source: str, work: Path) -> Path | None:
    """The absolute path of ``[run] out``, if the source is TOML text that names one."""
    try:
        raw = tomllib.loads(source)
    except (tomllib.TOMLDecodeError, ValueError):
        return None
    out = raw.get("run", {}).get("out") if isinstance(raw.get("run"), dict) else None
    if not isinstance(out, str) or "\x00" in out:
        return None
    return Path(os.path.normpath(work / out))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`: a folder's mode, a file's mode and sha256, a link's target."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                seen[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                seen[rel] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                seen[rel] = ("file", stat.S_IMODE(info.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
    return seen


def under(rel: str, top: str) -> bool:
    return rel == top or rel.startswith(top + os.sep)


# ------------------------------------------------------------------ known bugs

def _with(base: str, section: str, **values) -> str:
    """The TOML of a base config with `values` set in `section`."""
    doc = copy.deepcopy(BASES[base])
    doc.setdefault(section, {}).update(values)
    return toml_document(doc)


#: bugs the fuzz found, fixed since: each source must run or raise a FlowsimError, touching nothing
FOUND = {
    "run.out with a NUL character": _with("sgd", "run", out="nul\x00.zarr"),
    "run.seed beyond int64": _with("sgd", "run", seed=2**63),
    "a config path to a binary file": "keep.nc",
    "TOML text opening with a long comment": "#" + "x" * 300 + "\n" + _with("sgd", "run"),
    "integrator.step_size far below t1": _with("teacher", "integrator", step_size=1e-300),
    "run.out naming a folder of the user's": _with("sgd", "run", out="data.zarr", overwrite=True),
    "run.device an integer beyond int64": _with("sgd", "run", device=2**63),
}


#: bugs found by the fuzz and not fixed yet: name -> (a minimal source, whether an exception of
#: an example is this bug). Each is reproduced under xfail(strict=True) by
#: test_known_bug_is_still_there, and the fuzz lets exactly that failure through; remove the
#: entry once the bug is fixed (and add its source to FOUND).
KNOWN_BUGS: dict = {}


def known_bug(source: str, exc: BaseException) -> str | None:
    """The name of the known bug that `exc`, raised by `source`, is (None: not a known one)."""
    for name, (_, matches) in KNOWN_BUGS.items():
        if matches(source, exc):
            return name
    return None


# ------------------------------------------------------------------ the sandbox


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The user's files every example starts from (copied for each)."""
    root = tmp_path_factory.mktemp("fuzz-template")
    work = root / "work"
    work.mkdir()
    (root / "outside.txt").write_text("beside the working folder\n")
    xr.Dataset({"temperature": ("x", [1.0, 2.0, 3.0])}, attrs={"owner": "me"}).to_zarr(work / "data.zarr", zarr_format=2)
    (work / "data.zarr" / "notes.txt").write_text("my notes\n")
    xr.Dataset({"pressure": ("y", [4.0, 5.0])}).to_netcdf(work / "keep.nc")
    (work / "user.txt").write_text("not a config\n")
    (work / "ro").mkdir()
    (work / "ro" / "inside.txt").write_text("read only\n")
    good = toml_document(BASES["sgd"])
    (work / "good.toml").write_text(good)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fs.run_config(good, out=str(work / "old.zarr"))
        fs.run_config(good, out=str(work / "old.nc"))
    (work / "ro").chmod(0o555)
    return root


class Sandbox:
    """A copy of the template to run examples in, copied again only after an example changed it."""

    def __init__(self, template: Path) -> None:
        self.template = template
        self.parent = Path(tempfile.mkdtemp(dir=template.parent, prefix="examples-"))
        self.root = self.parent / "root"
        self.pristine = snapshot(template)
        self._fresh()

    def _fresh(self) -> None:
        if self.root.exists():
            (self.root / "work" / "ro").chmod(0o755)
            shutil.rmtree(self.root)
        shutil.copytree(self.template, self.root, symlinks=True)
        (self.root / "work" / "ro").chmod(0o555)

    def run(self, source: str) -> str:
        """Run one source with the sandbox's work folder as working directory; check what must
        hold. Returns the outcome ("run", "error", or "known: <bug>")."""
        root, work = self.root, self.root / "work"
        source = source.replace("@ROOT@", str(root))
        out = declared_output(source, work)
        before = self.pristine
        cwd, dtype, grad = os.getcwd(), torch.get_default_dtype(), torch.is_grad_enabled()
        outcome, error, result = "run", None, None
        os.chdir(work)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "run diverged": its status says it
                warnings.simplefilter("ignore", UserWarning)
                result = fs.run_config(source)
        except fs.FlowsimError as exc:
            outcome, error = "error", exc
        except Exception as exc:  # noqa: BLE001 - the property: no other exception
            bug = known_bug(source, exc)
            if bug is None:
                self._fresh()
                raise AssertionError(f"run_config raised {type(exc).__name__}, not a FlowsimError: {exc}\nsource: {source!r}") from exc
            outcome, error = f"known: {bug}", exc
        finally:
            os.chdir(cwd)
        after = snapshot(root)
        try:
            self._check(source, out, outcome, error, result, after)
            assert torch.get_default_dtype() == dtype and torch.is_grad_enabled() == grad, "the run changed torch's global state"
        finally:
            if after != before:
                self._fresh()
        return outcome

    def _check(self, source: str, out: Path | None, outcome: str, error, result, after: dict) -> None:
        """What must hold after an example: see the module docstring."""
        before, root = self.pristine, self.root
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        if outcome != "run":
            assert not changed, f"{outcome} ({type(error).__name__}: {error}) but these paths changed: {changed}\nsource: {source!r}"
            return
        assert isinstance(result, xr.Dataset), type(result)
        assert result.attrs.get("status") in ("completed", "diverged"), result.attrs.get("status")
        if out is None:
            assert not changed, f"a run without an output changed {changed}\nsource: {source!r}"
            return
        rel = os.path.relpath(out, root)
        beside = [
            p for p in before.keys() | after.keys()
            if os.path.dirname(p) == os.path.dirname(rel) and os.path.basename(p).startswith(os.path.basename(rel) + ".")
        ]  # fmt: skip
        users = [p for p in before if not under(p, "work/old.zarr") and not under(p, "work/old.nc")]
        touched = [p for p in changed if p in users]
        assert not touched, f"a run to {rel} changed the user's {touched}\nsource: {source!r}"
        outside = [p for p in changed if not under(p, rel) and not any(under(p, b) for b in beside)]
        assert not outside, f"a run to {rel} changed {outside}, outside its output\nsource: {source!r}"
        left = sorted(p for p in beside if p in after and p not in before)
        assert not left, f"a run to {rel} left {left} beside it\nsource: {source!r}"
        record = fs.open_record(out)
        assert record.attrs["status"] == result.attrs["status"], f"{rel} does not hold the run\nsource: {source!r}"

    def close(self) -> None:
        (self.root / "work" / "ro").chmod(0o755)
        shutil.rmtree(self.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def sandbox(template):
    box = Sandbox(template)
    yield box
    box.close()


# ------------------------------------------------------------------ the tests

OUTCOMES: dict[str, int] = {}


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
@given(source=sources())
def test_any_config_runs_or_raises_a_flowsim_error_and_touches_only_its_output(source, sandbox):
    assume(not too_long(source))
    outcome = sandbox.run(source)
    OUTCOMES[outcome.split(":")[0]] = OUTCOMES.get(outcome.split(":")[0], 0) + 1


def test_the_fuzz_runs_a_good_share_of_its_examples():
    """The strategy is biased towards valid configs: at least a fifth of the examples ran."""
    total = sum(OUTCOMES.values())
    if total == 0:
        pytest.skip("the fuzz did not run in this session")
    assert OUTCOMES.get("run", 0) >= total / 5, OUTCOMES
    assert OUTCOMES.get("error", 0) >= total / 5, OUTCOMES


@pytest.mark.parametrize("name", sorted(FOUND))
def test_bugs_the_fuzz_found_stay_fixed(name, sandbox):
    assert sandbox.run(FOUND[name]) in ("run", "error")


if KNOWN_BUGS:

    @pytest.mark.parametrize(
        "name", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"flowsim bug: {name}")) for name in KNOWN_BUGS]
    )
    def test_known_bug_is_still_there(name, sandbox):
        """Each known bug, reproduced: xfail (strict) until fixed; then remove its KNOWN_BUGS
        entry, and the fuzz checks that case again."""
        source, _ = KNOWN_BUGS[name]
        assert sandbox.run(source) in ("run", "error")
