"""Integrator accuracy: the measured convergence order of every integrator, and the SciPy
integrator (accuracy, stiff methods, refusals).

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


@pytest.fixture(scope="module")
def problem():
    return build_problem("mlp", n=16, depth=1, width=4, activation="tanh").to(dtype=torch.float64)


def final_theta(integrator, dynamics, problem, t1=T):
    *_, end = integrator.solve(dynamics.term(problem, problem.initial_theta()), SaveGrid((0.0, t1)), seed=0)
    return end.theta.clone(), end.nfe


@pytest.fixture(scope="module")
def reference(problem):
    return final_theta(SciPy("DOP853", rtol=1e-13, atol=1e-13), fs.GradientFlow(), problem)[0]


#: the step sizes an order is measured over (exact in binary: every grid lands on T): in the
#: asymptotic range, the finest error far above the round-off floor (orders 1–4 unless listed)
ORDER_STEPS = {5: [1 / 16, 1 / 32, 1 / 64], 8: [1 / 4, 1 / 8, 1 / 16]}
#: huge tolerances, a first step h and no growth (ifactor = 1): an adaptive method takes fixed steps h
FIXED_STEPS = {"rtol": 1e3, "atol": 1e3}


def _fixed_step_integrators():
    """(id, h -> integrator, dynamics) for every integrator flowsim has: adaptive methods forced
    to fixed steps; the SDE integrators on SGDNoise with full batches (no noise: the drift's ODE)."""
    from flowsim.integrators import RK, SDE, AdamsBashforth, FusedEulerMaruyama
    from flowsim.integrators.ode import ADAPTIVE, FIXED
    from flowsim.integrators.rk import TABLEAUS

    flow, noiseless = fs.GradientFlow(), fs.SGDNoise(lr=0.1, batch_size=16)
    cases = [(f"ODE-{m}", lambda h, m=m: ODE(m, step_size=h), flow) for m in FIXED]
    cases += [(f"ODE-{m}", lambda h, m=m: ODE(m, options={"first_step": h, "ifactor": 1.0}, **FIXED_STEPS), flow) for m in ADAPTIVE]
    for m, tableau in TABLEAUS.items():
        make = (lambda h, m=m: RK(m, first_step=h, ifactor=1.0, **FIXED_STEPS)) if tableau.adaptive else (lambda h, m=m: RK(m, step_size=h))
        cases.append((f"RK-{m}", make, flow))
    cases += [(f"SciPy-{m}", lambda h, m=m: SciPy(m, first_step=h, max_step=h, **FIXED_STEPS), flow) for m in ("RK45", "DOP853", "RK23")]
    cases += [("Exponential", lambda h: Exponential(step_size=h), flow)]
    cases += [(f"AdamsBashforth-{k}", lambda h, k=k: AdamsBashforth(order=k, dt=h), flow) for k in (1, 2, 3, 4)]
    cases += [("FusedEulerMaruyama", lambda h: FusedEulerMaruyama(dt=h), noiseless), ("SDE-euler", lambda h: SDE("euler", dt=h), noiseless)]
    return cases


@pytest.fixture(scope="module")
def fine_reference(problem):
    """dopri8 at fixed steps 1/64: its own error ~1e-18, below round-off; scipy's DOP853 at
    rtol 1e-13 is 2.5e-14 away from it, too coarse for an order-5 method's finest error."""
    from flowsim.integrators import RK

    return final_theta(RK("dopri8", first_step=1 / 64, ifactor=1.0, **FIXED_STEPS), fs.GradientFlow(), problem)[0]


@pytest.mark.parametrize("name, make, dynamics", _fixed_step_integrators(), ids=[c[0] for c in _fixed_step_integrators()])
def test_every_integrator_converges_at_its_stated_order(problem, fine_reference, name, make, dynamics):
    """Each integrator's `order` from the log-log slope of its error between its two finest fixed
    steps (in the asymptotic range; the coarser third shows the approach): |slope − order| ≤ 0.5
    (measured: euler 1.00, midpoint 2.02, heun3 3.01, rk4 4.04, exponential 4.00, dopri5 5.41,
    dopri8 7.94, DOP853 8.16, AdamsBashforth k = 1 … 4 1.00, 1.98, 2.92, 3.94). torchdiffeq's
    Adams methods (order None: it grows with their history) must converge faster than order 4
    (measured 4.55); torchdiffeq's explicit_adams, up to order 12 with a tiny stability region,
    diverges here (error 2.6 at h = 1/16, growing as h shrinks)."""
    order = make(0.1).order
    if name == "ODE-explicit_adams":
        pytest.xfail("torchdiffeq's explicit_adams (Adams–Bashforth up to order 12) is unstable at these steps")
    steps = ORDER_STEPS.get(order, [1 / 32, 1 / 64, 1 / 128])
    errors = [float((final_theta(make(h), dynamics, problem)[0].reshape(-1) - fine_reference).norm() / fine_reference.norm()) for h in steps]
    measured = slope(steps[-2:], errors[-2:])
    print(f"{name}: order {order}, slope {measured:.2f}, errors {np.array(errors)}")
    # the finest error is ≥ 10× the worst-case round-off of the run and the reference, one rounding
    # of y0 + h·Σ b_j k_j per step (Higham: n·ε over the steps of both; typical round-off is √n·ε)
    assert errors[-1] > 10 * roundoff(n_ops=round(T / steps[-1]) + 64)
    if order is None:
        assert measured > 4
    else:
        assert abs(measured - order) <= 0.5


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
