"""The checkpoint contract of integrators.base, on every integrator that checkpoints, in memory:
a yielded checkpoint is never changed afterwards, and solving from it gives the points after it
bit for bit. The RK loops hand out their state by reference, not as a copy."""

from __future__ import annotations

import copy

import pytest
import torch

from flowsim.integrators import ODE, RK, SDE, Exponential, FusedEulerMaruyama, GaussLegendre, SaveGrid
from flowsim.terms import Noise, Semilinear, VectorField

GRID = SaveGrid(tuple(0.1 * k for k in range(11)))
Y0 = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)


def _pendulum(t, y):
    """A nonlinear, undamped field: y'' = −sin(y) on (position, velocity) halves."""
    q, p = y.view(2, -1)
    return torch.cat([p, -torch.sin(q)])


def _vector_field() -> VectorField:
    return VectorField(f=_pendulum, y0=Y0.clone(), split=lambda y: (y, None))


def _semilinear() -> Semilinear:
    """y' = M y + N(y) with a damped M (MomentumFlow's kind of term)."""
    linear = torch.tensor([[0.0, 1.0], [0.0, -3.0]], dtype=torch.float64)
    nonlinear = lambda t, y: torch.cat([torch.zeros(3, dtype=y.dtype), -torch.sin(y[:3])])  # noqa: E731
    f = lambda t, y: (linear.to(y) @ y.view(2, -1)).view(-1) + nonlinear(t, y)  # noqa: E731
    return Semilinear(f=f, y0=Y0.clone(), split=lambda y: (y, None), linear=linear, nonlinear=nonlinear)


def _noise() -> Noise:
    """dθ = −sin θ dt + 0.3 θ dW (per path; W of dimension 2 mixed into the 6 numbers)."""
    mix = torch.linspace(0.5, 1.5, 12, dtype=torch.float64).view(6, 2)
    drift = lambda theta: -torch.sin(theta)  # noqa: E731
    diffusion = lambda theta, w: 0.3 * theta * (mix @ w)  # noqa: E731
    return Noise(
        y0=Y0.clone(), paths=2, noise_size=2, drift=drift, diffusion=diffusion,
        increment=lambda theta, dt, dw: theta + drift(theta) * dt + diffusion(theta, dw),
    )  # fmt: skip


CASES = {
    "rk-dopri5": (RK("dopri5", rtol=1e-8, atol=1e-8, compile=False), _vector_field),
    "rk-bosh3": (RK("bosh3", rtol=1e-6, atol=1e-6, compile=False), _vector_field),  # FSAL, f1 row apart
    "rk-fehlberg2": (RK("fehlberg2", rtol=1e-6, atol=1e-6, compile=False), _vector_field),  # not FSAL
    "rk-rk4": (RK("rk4", step_size=0.03, compile=False), _vector_field),
    "ode-dopri5": (ODE("dopri5", rtol=1e-8, atol=1e-8), _vector_field),
    "ode-rk4": (ODE("rk4", step_size=0.03), _vector_field),
    "ode-adams": (ODE("implicit_adams", step_size=0.05), _vector_field),
    "exponential": (Exponential(rtol=1e-8, atol=1e-8), _semilinear),
    "gauss-legendre": (GaussLegendre(stages=2, rtol=1e-8, atol=1e-8), _vector_field),
    "sde": (SDE("euler", dt=0.05), _noise),
    "fused-euler-maruyama": (FusedEulerMaruyama(dt=0.05), _noise),
}


def _snapshot(checkpoint):
    return copy.deepcopy(checkpoint)


def _same(a, b) -> bool:
    """Equal bit for bit: tensors by torch.equal, containers entry by entry, the rest by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _values(points) -> list:
    return [(p.time, p.step, p.nfe, p.theta, p.velocity, p.stats) for p in points]


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_is_never_changed_and_resumes_bit_for_bit(case):
    """Each checkpoint equals its copy taken when it was yielded, after the solve has run to the
    end; solving from the one at save point 4 yields points 5 … 10 of the whole solve exactly."""
    integrator, term = CASES[case]
    points, snapshots = [], []
    for point in integrator.solve(term(), GRID, seed=3):
        points.append(point)
        snapshots.append(_snapshot(point.checkpoint))
    assert all(p.checkpoint is not None for p in points)
    for point, snapshot in zip(points, snapshots):
        assert _same(point.checkpoint, snapshot), point.time
    resumed = list(integrator.solve(term(), GRID, seed=3, start=points[4].checkpoint))
    assert _same(_values(resumed), _values(points[5:]))
    assert _same(points[4].checkpoint, snapshots[4])  # resuming left it as it was


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "fehlberg2"])
def test_rk_lends_its_state_instead_of_copying_it(method):
    """Save points inside one adaptive step (here 100 a unit of time, on a field that needs a
    few steps) carry the very tensors of the loop's state: the checkpoints of two save points
    with no step between them share y1's and the stages' storage."""
    grid = SaveGrid(tuple(0.01 * k for k in range(101)))
    points = list(RK(method, rtol=1e-6, atol=1e-6, compile=False).solve(_vector_field(), grid, seed=0))
    pairs = [(a.checkpoint, b.checkpoint) for a, b in zip(points[1:], points[2:]) if a.step == b.step]
    assert pairs and len(pairs) > len(points) / 2
    for a, b in pairs:
        assert a["y1"].data_ptr() == b["y1"].data_ptr() and a["stages"].data_ptr() == b["stages"].data_ptr()
