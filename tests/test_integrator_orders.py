"""Integrator accuracy: measured convergence orders of the fixed-step methods, the exponential
integrator, and the SciPy integrator (accuracy, stiff methods, refusals).

Every error is |θ_h(T) − θ_ref(T)| / |θ_ref(T)| against scipy's DOP853 at rtol = atol = 1e-13
(torchdiffeq's dopri8 at rtol 1e-12 is off by 1e-9 here, which would floor rk4's errors), on a
tanh MLP (smooth, so the theoretical orders hold) in float64; orders are least-squares slopes
of log(error) against log(step size)."""

import numpy as np
import pytest
import torch

import flowsim as fs
from flowsim.integrators import ODE, Exponential, SaveGrid, SciPy

from conftest import build_problem, roundoff, slope

T = 1.0
STEPS = [1 / 16, 1 / 32, 1 / 64, 1 / 128]  # exact in binary: every grid lands on T; h = 1/4 is not yet asymptotic


@pytest.fixture(scope="module")
def problem():
    return build_problem("mlp", n=16, depth=1, width=4, activation="tanh").to(dtype=torch.float64)


def final_theta(integrator, dynamics, problem, t1=T):
    *_, end = integrator.solve(dynamics.term(problem, problem.initial_theta()), SaveGrid((0.0, t1)), seed=0)
    return end.theta.clone(), end.nfe


@pytest.fixture(scope="module")
def reference(problem):
    return final_theta(SciPy("DOP853", rtol=1e-13, atol=1e-13), fs.GradientFlow(), problem)[0]


@pytest.mark.parametrize(
    "make, order",
    [
        (lambda h: ODE("euler", step_size=h), 1),
        (lambda h: ODE("midpoint", step_size=h), 2),
        (lambda h: ODE("rk4", step_size=h), 4),
        (lambda h: Exponential(step_size=h), 4),  # M = 0 on gradient flow: Krogstad's scheme is RK4
    ],
    ids=["euler", "midpoint", "rk4", "exponential"],
)
def test_fixed_step_orders_on_gradient_flow(problem, reference, make, order):
    """Measured slopes: euler 1.00, midpoint 2.04, rk4 4.09, exponential 4.00 (all within 0.3)."""
    errors = []
    for h in STEPS:
        theta, nfe = final_theta(make(h), fs.GradientFlow(), problem)
        errors.append(float((theta - reference).norm() / reference.norm()))
    measured = slope(STEPS, errors)
    print(f"order {order}: slope {measured:.3f}, errors {np.array(errors)}")
    assert abs(measured - order) < 0.3
    # the slope is the method's, not noise: the finest error is ≥ 100× the floor under it, the
    # reference's error (≲ its tolerance, 1e-13) plus the run's round-off, roundoff(6 n) after
    # n = 128 steps (as test_fast_rk's fixed-step bound); measured ≥ 1.1e-10 against 2.7e-13
    floor = 1e-13 + roundoff(n_ops=6 * round(T / STEPS[-1]))
    assert errors[-1] > 100 * floor


def test_scipy_matches_torchdiffeq(problem, reference):
    """scipy's DOP853 at rtol 1e-13 (the reference) and torchdiffeq's dopri8 at 1e-13 agree to
    1e-9 (measured 2e-10; at rtol 1e-12 dopri8 is off by 1.0e-9); RK45 and LSODA at rtol 1e-8
    to 1e-6."""
    theta, nfe = final_theta(ODE("dopri8", rtol=1e-13, atol=1e-13), fs.GradientFlow(), problem)
    assert float((theta - reference).norm() / reference.norm()) < 1e-9
    for method in ("RK45", "LSODA"):
        theta, nfe = final_theta(SciPy(method, rtol=1e-8, atol=1e-8), fs.GradientFlow(), problem)
        assert float((theta - reference).norm() / reference.norm()) < 1e-6, method


def test_scipy_implicit_methods_on_a_stiff_momentum_flow():
    """η = 0.002, β = 0.9 (τ = 526): Radau and BDF (finite-difference Jacobian of the 2P = 170
    state) agree with the exponential integrator at tight tolerance, through simulate()."""
    problem = build_problem("mlp", n=16, depth=1, width=1, activation="tanh")
    flow = fs.MomentumFlow(lr=0.002, momentum=0.9, start="matched")
    run = lambda integ: fs.simulate(problem, flow, integ, t1=0.2, save_every=0.1, observe=("params",), progress=False)
    reference = run(Exponential(rtol=1e-10, atol=1e-10))
    for method in ("Radau", "BDF"):
        ds = run(SciPy(method, rtol=1e-6, atol=1e-8))
        assert ds.attrs["status"] == "completed"
        error = float(fs.compare(ds, reference).param_error.max())
        print(f"{method}: error {error:.1e} in {int(ds.nfe[-1])} evaluations")
        assert error < 1e-5, method


def test_scipy_refuses_bad_input_before_any_work(problem, tmp_path):
    with pytest.raises(fs.ConfigError, match="integrator.method"):
        SciPy("Euler")
    with pytest.raises(fs.ConfigError, match="integrator.rtol"):
        SciPy(rtol=0.0)
    with pytest.raises(fs.ConfigError, match="integrator.max_jacobian_size"):
        SciPy(max_jacobian_size=0)
    out = tmp_path / "run.zarr"
    with pytest.raises(fs.ConfigError, match="run.dtype"):
        fs.simulate(problem, fs.GradientFlow(), SciPy(), t1=1.0, save_every=0.5, dtype=torch.float32, out=out, progress=False)
    with pytest.raises(fs.ConfigError, match="integrator.method: Radau needs a dense"):
        fs.simulate(problem, fs.GradientFlow(), SciPy("Radau", max_jacobian_size=100), t1=1.0, save_every=0.5, out=out, progress=False)
    assert not out.exists()  # nothing written
    with pytest.raises(fs.ConfigError, match="integrator.method"):
        Exponential(method="rk4")
    with pytest.raises(fs.ConfigError, match="integrator.step_size"):
        Exponential(step_size=-1.0)


class PoisonedFlow(fs.GradientFlow):
    """Gradient flow whose derivative turns NaN after t = 0.3."""

    def derivative(self, problem, t, y):
        return super().derivative(problem, t, y) * (float("nan") if float(t) > 0.3 else 1.0)


def test_a_non_finite_derivative_ends_the_run_as_diverged(problem):
    for integrator in (SciPy("RK45"), Exponential()):
        ds = fs.simulate(problem, PoisonedFlow(), integrator, t1=1.0, save_every=0.25, progress=False)
        assert ds.attrs["status"] == "diverged", type(integrator).__name__
        assert ds.sizes["time"] == 2  # t = 0 and 0.25 were saved
