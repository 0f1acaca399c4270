"""One failure reads the same whichever integrator meets it: every IntegrationError comes from
the constructors of integrators/base.py, "<integrator>: <what> … t=…; <what to do>"."""

from __future__ import annotations

import math
import re

import pytest
import torch

from flowsim.errors import IntegrationError
from flowsim.integrators import ODE, RK, Exponential, GaussLegendre, SaveGrid
from flowsim.terms import VectorField


def _term(f) -> VectorField:
    """y' = f(t, y) on four numbers from y0 = 1 (float64)."""
    return VectorField(f=f, y0=torch.ones(4, dtype=torch.float64), split=lambda y: (y, None))


def _failure(integrator, f, t1: float = 4.0) -> str:
    """The message of the IntegrationError that solving y' = f on [0, t1] ends with."""
    with pytest.raises(IntegrationError) as info:
        for _ in integrator.solve(_term(f), SaveGrid((0.0, t1)), seed=0):
            pass
    return str(info.value)


def _decay(t, y):
    return -y


def _blow_up(t, y):  # y' = y²: y = 1/(1 − t) reaches infinity at t = 1
    return y * y


def _nan_after_half(t, y):
    return -y if float(t) < 0.5 else torch.full_like(y, math.nan)


@pytest.mark.parametrize(
    "integrator",
    [RK("dopri5", rtol=1e-12, atol=1e-12, max_steps=3), ODE("dopri5", rtol=1e-12, atol=1e-12, max_steps=3),
     Exponential(rtol=1e-12, atol=1e-12, max_steps=3), GaussLegendre(rtol=1e-12, atol=1e-12, max_steps=3)],
    ids=lambda i: type(i).__name__,
)  # fmt: skip
def test_max_steps_reads_the_same(integrator):
    message = _failure(integrator, _decay)
    name = type(integrator).__name__
    pattern = rf"{name}: integrator\.max_steps = 3 steps taken by t=[0-9.e+-]+; raise integrator\.max_steps or take fewer steps .*"
    assert re.fullmatch(pattern, message), message


@pytest.mark.parametrize(
    "integrator", [RK("dopri5"), Exponential(rtol=1e-6, atol=1e-6), GaussLegendre(rtol=1e-6, atol=1e-6)], ids=lambda i: type(i).__name__
)
def test_step_size_underflow_reads_the_same(integrator):
    """y' = y² from 1 blows up at t = 1: each adaptive loop shrinks its step there until it underflows."""
    message = _failure(integrator, _blow_up)
    name = type(integrator).__name__
    match = re.match(rf"{name}: step size underflow \(h=[0-9.e+-]+\) at t=([0-9.e+-]+): the flow is stiff or non-smooth there", message)
    assert match and abs(float(match[1]) - 1.0) < 1e-3, message


@pytest.mark.parametrize("integrator", [RK("bosh3"), Exponential(step_size=0.1)], ids=lambda i: type(i).__name__)
def test_non_finite_state_reads_the_same(integrator):
    """f turns NaN from t = 0.5 on: the step that meets it (from t in [0.3, 0.5]) ends the run."""
    message = _failure(integrator, _nan_after_half)
    name = type(integrator).__name__
    match = re.fullmatch(rf"{name}: the state or its derivative became non-finite \(NaN/Inf\) in the step from t=([0-9.e+-]+) \(h=[0-9.e+-]+\)", message)
    assert match and 0.3 <= float(match[1]) <= 0.5, message


def test_non_finite_stages_of_an_implicit_step_do_not_converge():
    """GaussLegendre meets the NaN inside its stage equations: at a fixed step they do not
    converge (an IntegrationError saying why, not numpy's LinAlgError from GMRES on NaN)."""
    message = _failure(GaussLegendre(stages=1, step_size=0.1), _nan_after_half)
    pattern = r"GaussLegendre: the stage equations did not converge in the step from t=([0-9.e+-]+) \(h=0\.1\): .*f is non-finite \(NaN/Inf\).*"
    match = re.fullmatch(pattern, message)
    assert match and 0.3 <= float(match[1]) <= 0.5, message
