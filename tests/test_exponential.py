"""The exponential integrator on an ensemble: its (K, P) state, and the term's error norm."""

from __future__ import annotations

import dataclasses

import torch
from conftest import build_problem, gradient_condition, relative, roundoff, sum_lengths

import flowsim as fs
from flowsim.ensemble import Ensemble, initial_members
from flowsim.integrators import Exponential, SaveGrid
from flowsim.terms import VectorField

#: the decay rates of the two members of the toy ensemble: member 0's error sets every step
RATES = (10.0, 0.1)


def _decay(rates: torch.Tensor, ensemble: Ensemble | None) -> VectorField:
    """y' = −λ y from y0 = 1 on rows of P numbers, one row per rate (a single (P,) row when
    `ensemble` is None), with the ensemble's error norm (its worst member's RMS)."""
    size = ensemble.n_params if ensemble is not None else 8
    y0 = torch.ones(len(rates), size, dtype=torch.float64) if ensemble is not None else torch.ones(size, dtype=torch.float64)
    scale = rates[:, None] if ensemble is not None else rates
    return VectorField(
        f=lambda t, y: -scale * y,
        y0=y0,
        split=lambda y: (y, None),
        members=None if ensemble is None else ("member", len(rates)),
        error_norm=None if ensemble is None else ensemble.error_norm,
    )


def _steps(integrator: Exponential, term: VectorField) -> list[tuple[int, int, float]]:
    grid = SaveGrid((0.0, 0.5, 1.0, 2.0))
    return [(p.step, p.nfe, p.stats["rejected_steps"]) for p in integrator.solve(term, grid, seed=0)]


def test_the_worst_member_controls_the_step():
    """Two members decaying at rates 10 and 0.1: the fast one's local error is 10⁵–10¹⁰ times
    the slow one's at every step (RK4's error ∝ (λh)⁵), so under the worst-member norm the
    ensemble takes exactly the steps the fast member takes alone (first step included: Hairer's
    guess is taken in the same norm). The plain RMS over both members would halve that error
    (√2) and take fewer steps."""
    ensemble = Ensemble(build_problem(n=16, width=4), len(RATES))
    integrator = Exponential(rtol=1e-6, atol=1e-6)
    together = _steps(integrator, _decay(torch.tensor(RATES, dtype=torch.float64), ensemble))
    fast = _steps(integrator, _decay(torch.tensor(RATES[0], dtype=torch.float64), None))
    slow = _steps(integrator, _decay(torch.tensor(RATES[1], dtype=torch.float64), None))
    assert together == fast and fast[-1][0] > 2 * slow[-1][0], (together, fast, slow)
    diluted = _steps(integrator, dataclasses.replace(_decay(torch.tensor(RATES, dtype=torch.float64), ensemble), error_norm=None))
    assert diluted[-1][0] < fast[-1][0], (diluted, fast)


def test_an_ensemble_equals_its_members_run_alone():
    """GradientFlow on an ensemble of 2 (its (K, P) state through the φ-function products) at a
    fixed step equals each member's run alone: the same steps, and θ within the batched
    gradient's round-off against the single one, roundoff(sum_lengths, gradient_condition) of
    |g| per evaluation (test_ensemble), 4 evaluations a step over 10 steps adding up linearly
    (h|g| < |θ| here). A member moved with another's θ0 is off by O(1)."""
    problem = build_problem(n=16, width=4)
    run = dict(t1=0.2, save_every=0.1, observe=("params",), progress=False)
    integrator = Exponential(step_size=0.02)
    ds = fs.simulate(problem, fs.GradientFlow(), integrator, ensemble=2, **run)
    assert ds.attrs["status"] == "completed"
    theta0 = initial_members(problem.to(dtype=torch.float64), 2, seed=0)
    for k in range(2):
        alone = problem.to(dtype=torch.float64)
        alone.load_into_model(theta0[k])
        one = fs.simulate(alone, fs.GradientFlow(), integrator, **run)
        assert (one.step.values == ds.step.values).all()
        bound = roundoff(n_ops=4 * 10 * sum_lengths(alone), cond=gradient_condition(alone, theta0[k]))
        assert relative(ds.params.isel(member=k).values, one.params.values) < bound, k
        assert relative(one.params.values[-1], one.params.values[0]) > 1e-3  # it moved
