"""torchdiffeq's and torchsde's private internals, which flowsim drives behind one adapter each
(integrators/ode.py: Torchdiffeq, integrators/sde.py: Torchsde): the installed releases still
have them, a release that changes one fails loudly naming it, and nothing else reaches them."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from flowsim.integrators import ode, sde
from flowsim.integrators.base import upstream_names
from flowsim.integrators.ode import TORCHDIFFEQ, TORCHDIFFEQ_VERSIONS
from flowsim.integrators.sde import TORCHSDE, TORCHSDE_VERSIONS

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {"torchdiffeq": (TORCHDIFFEQ, TORCHDIFFEQ_VERSIONS, "integrators/ode.py"), "torchsde": (TORCHSDE, TORCHSDE_VERSIONS, "integrators/sde.py")}


@pytest.mark.parametrize("package", ADAPTERS)
def test_the_installed_release_has_every_internal_the_adapter_drives(package):
    """check() drives each private name once on a tiny problem; a release that renamed or
    changed one fails here with the adapter's message (what changed, which releases to use)."""
    adapter = ADAPTERS[package][0]
    problems = adapter.check()
    assert not problems, adapter.changed(problems)


@pytest.mark.parametrize("package", ADAPTERS)
def test_pyproject_asks_for_the_releases_the_adapter_is_written_against(package):
    """pyproject's requirement is the adapter's range (kept in step), bounded above (any
    release may change a private name), and the installed release is in it."""
    adapter, versions, _ = ADAPTERS[package]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirement = next(Requirement(d) for d in dependencies if Requirement(d).name == package)
    assert str(requirement.specifier) == ",".join(sorted(versions.split(","))), (requirement, versions)
    assert any(s.operator == "<" for s in requirement.specifier)
    assert Version(importlib.metadata.version(package)) in requirement.specifier


def test_a_changed_internal_fails_loudly_naming_it(monkeypatch):
    """A missing module-level name stops the import with ImportError naming it and the range; a
    changed solver attribute makes check() name every method it breaks."""
    with pytest.raises(ImportError) as info:
        upstream_names("torchdiffeq", {"torchdiffeq._impl.odeint": ("SOLVERS", "_renamed")}, TORCHDIFFEQ_VERSIONS)
    message = str(info.value)
    installed = importlib.metadata.version("torchdiffeq")
    assert f"torchdiffeq {installed} has changed them: no torchdiffeq._impl.odeint._renamed;" in message
    assert f"torchdiffeq{TORCHDIFFEQ_VERSIONS} (pyproject.toml)" in message
    solvers = importlib.import_module("torchdiffeq._impl.solvers")
    monkeypatch.delattr(solvers.FixedGridODESolver, "_linear_interp")
    problems = TORCHDIFFEQ.check()
    assert {p.split(":")[0] for p in problems} == set(TORCHDIFFEQ.fixed), problems
    assert all("_linear_interp" in p for p in problems), problems
    monkeypatch.undo()
    base = importlib.import_module("torchsde._core.base_solver")
    monkeypatch.setattr(base.BaseSDESolver, "integrate", lambda self, y0, ts: y0)  # 0.2.5's signature
    problems = TORCHSDE.check()
    assert len(problems) == 1 and problems[0].startswith("Euler–Maruyama's solver: TypeError"), problems
    assert "torchsde" in TORCHSDE.changed(problems) and TORCHSDE_VERSIONS in TORCHSDE.changed(problems)


def test_only_the_adapters_reach_private_internals():
    """No module imports a private module of torchdiffeq or torchsde (the adapters read theirs by
    name, ``upstream_names``), and no file but the adapter's names one."""
    private = re.compile(r"\b(torchdiffeq|torchsde)\._\w+")
    offenders = []
    for folder in ("flowsim", "integrators", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in getattr(node, "names", [])] if isinstance(node, ast.Import) else []
                offenders += [f"{relative}: import {n}" for n in names if private.match(n)]
            for match in private.finditer(path.read_text()):
                if relative != ADAPTERS[match[1]][2]:
                    offenders.append(f"{relative}: {match[0]}")
    assert not offenders, offenders
    assert ode.Torchdiffeq.NAMES and sde.Torchsde.NAMES
