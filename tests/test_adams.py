"""AdamsBashforth (integrators/adams.py): its coefficients, its order on a linear ODE with a known
solution, its cost, members, resume bit for bit, the config round trip, refusals, divergence.
Its order on the tanh MLP is measured with every other integrator's in test_integrator_orders."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import flowsim as fs
from flowsim.integrators import INTEGRATORS, AdamsBashforth, SaveGrid
from flowsim.integrators.adams import COEFFICIENTS
from flowsim.integrators.tableaus import TABLEAUS
from flowsim.terms import VectorField

from conftest import build_problem, roundoff, slope
from test_integrator_orders import PoisonedFlow
from test_resume import CountingFlow, interrupt_at, same

#: the rates of the linear ODE y' = λ y + cos t (one per entry)
RATES = torch.tensor([-1.0, -0.5, 0.3], dtype=torch.float64)


def linear_term(y0: torch.Tensor) -> VectorField:
    """y' = λ y + cos t: time enters, so a step evaluated at the wrong time loses the order."""
    return VectorField(f=lambda t, y: RATES * y + torch.cos(t), y0=y0, split=lambda y: (y, None))


def exact(y0: torch.Tensor, t: float) -> torch.Tensor:
    """y(t) = (y0 − a) e^{λt} + a cos t + b sin t, with the particular solution's a = −λ/(1 + λ²),
    b = 1/(1 + λ²)."""
    a, b = -RATES / (1 + RATES**2), 1 / (1 + RATES**2)
    return (y0 - a) * torch.exp(RATES * t) + a * math.cos(t) + b * math.sin(t)


def final(integrator, term, t1: float = 1.0):
    *_, end = integrator.solve(term, SaveGrid((0.0, t1 / 2, t1)), seed=0)
    return end


def test_coefficients_integrate_polynomials_of_degree_below_k_exactly():
    """b_j are the weights of ∫_0^1 p(s) ds with p through the nodes s = 0, −1, …, −(k−1), so
    Σ_j b_j (−j)^q = 1/(q + 1) for q < k (the order conditions, HNW I §III.1), in exact
    fractions of the stated floats (each a ratio of small integers); and not for q = k."""
    for k, b in COEFFICIENTS.items():
        fractions = [Fraction(x).limit_denominator(100) for x in b]
        assert [float(x) for x in fractions] == list(b)
        moments = [sum(x * (-j) ** q for j, x in enumerate(fractions)) for q in range(k + 1)]
        assert moments[:k] == [Fraction(1, q + 1) for q in range(k)], k
        assert moments[k] != Fraction(1, k + 1), k


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_order_k_on_a_linear_ode_with_time_in_it(k):
    """The log-log slope of the error at t = 1 between h = 1/64 and 1/128 is k within 0.1
    (measured 1.00, 1.99, 2.99, 3.96); one evaluation per step after the start-up's
    (k − 1)·s (s the starter's stages) and its k − 1 history values."""
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    steps = [1 / 32, 1 / 64, 1 / 128]
    reference = exact(y0, 1.0)
    errors = []
    for h in steps:
        integrator = AdamsBashforth(order=k, dt=h)
        end = final(integrator, linear_term(y0))
        errors.append(float((end.theta - reference).norm() / reference.norm()))
        n = round(1 / h)
        assert end.step == n
        assert end.nfe == n + (k - 1) * TABLEAUS[integrator.starter].stages
    measured = slope(steps[-2:], errors[-2:])
    print(f"AdamsBashforth-{k}: slope {measured:.2f}, errors {np.array(errors)}")
    # the finest error far above the run's round-off: one rounding per operation of a step
    assert errors[-1] > 100 * roundoff(n_ops=(k + 2) * 128)
    assert abs(measured - k) <= 0.1


def test_the_starter_is_the_cheapest_fixed_rk_of_order_k():
    assert [AdamsBashforth(order=k, dt=0.1).starter for k in (2, 3, 4)] == ["midpoint", "heun3", "rk4"]


def test_members_are_the_solo_runs_bit_for_bit():
    """A (K, P) state moves as K separate runs: every operation is elementwise."""
    rows = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], dtype=torch.float64)
    together = final(AdamsBashforth(order=4, dt=1 / 16), linear_term(rows)).theta
    assert together.shape == rows.shape
    for row, alone in zip(together, rows):
        assert torch.equal(row, final(AdamsBashforth(order=4, dt=1 / 16), linear_term(alone)).theta)


@pytest.mark.parametrize("stop", [2, 6], ids=["in-the-start-up", "after-it"])
def test_resume_is_the_uninterrupted_run_bit_for_bit(stop, tmp_path, monkeypatch):
    """Stopped while recording save point `stop` (the 2nd: the start-up of 3 steps, one per save
    interval, not yet over; the 6th: the history in use) and resumed through simulate, the run is
    the uninterrupted one bit for bit, and the resumed part evaluates only after the checkpoint."""
    problem = build_problem("mlp", n=32, depth=1, width=8)
    integrator, kwargs = AdamsBashforth(order=4, dt=0.05), {"t1": 0.5, "save_every": 0.05, "progress": False}
    CountingFlow.calls = 0
    reference = fs.simulate(problem, CountingFlow(), integrator, **kwargs)
    whole = CountingFlow.calls
    assert reference.attrs["status"] == "completed" and int(reference.step[-1]) == 10
    interrupt_at(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        fs.simulate(problem, CountingFlow(), integrator, out=tmp_path / "r.zarr", **kwargs)
    monkeypatch.undo()
    CountingFlow.calls = 0
    same(fs.simulate(problem, CountingFlow(), integrator, out=tmp_path / "r.zarr", resume=True, **kwargs), reference)
    assert 0 < CountingFlow.calls < whole


def test_config_round_trip():
    """A TOML config names it "AdamsBashforth"; the record's integrator attr describes it."""
    config = """
[model]
name = "mlp.mlp"
width = 4
[data]
name = "digits"
n_train = 16
[dynamics]
name = "GradientFlow"
[integrator]
name = "AdamsBashforth"
order = 3
dt = 0.025
[run]
t1 = 0.1
save_every = 0.05
progress = false
"""
    loaded = fs.load_config(config)
    assert INTEGRATORS["AdamsBashforth"] is AdamsBashforth is fs.AdamsBashforth
    assert loaded.integrator == AdamsBashforth(order=3, dt=0.025)
    ds = loaded.simulate()
    assert ds.attrs["status"] == "completed"
    assert json.loads(ds.attrs["integrator"]) == {"name": "AdamsBashforth", "order": 3, "dt": 0.025}
    assert int(ds.step[-1]) == 4


def test_bad_order_or_dt_is_refused_naming_the_field(tmp_path):
    for order in (0, 5, 2.5, True, "4"):
        with pytest.raises(fs.ConfigError, match="integrator.order"):
            AdamsBashforth(order=order, dt=0.1)
    for dt in (0.0, -0.1, math.nan, math.inf, "0.1"):
        with pytest.raises(fs.ConfigError, match="integrator.dt"):
            AdamsBashforth(dt=dt)
    with pytest.raises(TypeError):  # dt has no default
        AdamsBashforth(order=2)
    problem, out = build_problem("mlp", n=16, depth=1, width=4), tmp_path / "run.zarr"
    # 0.03 does not divide 0.1; 0.1 does not divide the last interval 0.2 → 0.25; 0.2 > the interval
    for dt, t1, why in ((0.03, 0.2, "3.33333 steps"), (0.1, 0.25, "0.5 steps"), (0.2, 0.2, "at most the save interval")):
        with pytest.raises(fs.ConfigError, match=f"integrator.dt: got {dt:g}.*{why}"):
            fs.simulate(problem, fs.GradientFlow(), AdamsBashforth(dt=dt), t1=t1, save_every=0.1, out=out, progress=False)
    with pytest.raises(fs.ConfigError, match="integrator: AdamsBashforth integrates VectorField terms"):
        fs.simulate(problem, fs.DiscreteSGD(lr=0.1), AdamsBashforth(dt=0.1), t1=0.2, save_every=0.1, out=out, progress=False)
    assert not out.exists()  # refused before any work
    # decimal steps that divide decimal intervals in real numbers pass despite their binary rounding
    AdamsBashforth(dt=0.01).check_grid(SaveGrid(tuple(k * 0.1 for k in range(31))))


def test_a_non_finite_state_ends_the_run_as_diverged_keeping_the_rows_before():
    """The derivative turns NaN after t = 0.3: the step from the save time 3·0.1 > 0.3 fails."""
    problem = build_problem("mlp", n=16, depth=1, width=4)
    ds = fs.simulate(problem, PoisonedFlow(), AdamsBashforth(order=2, dt=0.05), t1=1.0, save_every=0.1, progress=False, throw=False)
    assert ds.attrs["status"] == "diverged"
    assert "AdamsBashforth: the state or its derivative became non-finite" in ds.attrs["status_message"]
    assert ds.sizes["time"] == 4 and np.isfinite(ds.loss).all()  # t = 0 … 0.3 kept


def test_an_unstable_step_overflows_to_a_non_finite_state():
    """y' = −100 y at h = 0.1 (hλ = −10, outside AB2's stability interval [−1, 0]: a root of
    ζ² + 14ζ − 5 = 0 of modulus 14.3) overflows within 1000 steps: IntegrationError, not Inf."""
    term = VectorField(f=lambda t, y: -100 * y, y0=torch.ones(2, dtype=torch.float64), split=lambda y: (y, None))
    with pytest.raises(fs.IntegrationError, match="AdamsBashforth: the state or its derivative became non-finite"):
        final(AdamsBashforth(order=2, dt=0.1), term, t1=100.0)
