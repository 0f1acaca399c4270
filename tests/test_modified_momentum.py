"""ModifiedFlow and MomentumFlow: how well they track GD and heavy-ball GD, and their laws.

Convergence slopes are least-squares fits of log(error) against log(η); every error is the
parameter distance at a fixed time T from `fs.compare`, relative to the GD run's |θ|."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import xarray as xr

import flowsim as fs
from flowsim.defaults import default_integrator
from flowsim.integrators import ODE, Exponential, SaveGrid

from conftest import build_problem, roundoff, slope

TIGHT = ODE("dopri5", rtol=1e-10, atol=1e-10)
ACCURATE = ODE("dopri5", rtol=1e-9, atol=1e-9)
ACCURATE_EXP = Exponential(rtol=1e-8, atol=1e-8)
LOOSE = ODE("dopri5", rtol=1e-5, atol=1e-5)  # for errors above 1e-2


def run(problem, dynamics, integrator=None, t1=1.0):
    return fs.simulate(problem, dynamics, integrator, t1=t1, save_every=t1, observe=("params",), progress=False)


def error_at(problem, flow, integrator, sgd, t1=1.0):
    """|θ_flow(T) − θ_GD(T)| / |θ_GD(T)| at T = t1 (a whole number of SGD steps); `flow` and
    `sgd` are dynamics, or runs of them already made."""
    flow_run = flow if isinstance(flow, xr.Dataset) else run(problem, flow, integrator, t1)
    sgd_run = sgd if isinstance(sgd, xr.Dataset) else run(problem, sgd, None, t1)
    return float(fs.compare(flow_run, sgd_run).param_error[-1])


def small_problem(**args):
    """The tracking tests' model: a tanh MLP 64-4-10 (310 parameters) on 16 digits."""
    return build_problem("mlp", n=16, depth=1, width=4, activation="tanh", **args)


def test_gradient_flow_tracks_gd_to_order_1_and_the_modified_flow_to_order_2():
    """Full-batch GD at η ∈ {0.2, 0.1, 0.05, 0.025} to T = 1 on a smooth (tanh) MLP with weight
    decay: slope 1.01 for gradient flow, 1.99 for the modified flow (measured; errors 2.3e-2 …
    2.8e-3 and 3.4e-3 … 5.5e-5), whose error is also the smaller at every η."""
    problem = small_problem(weight_decay=1e-2)
    lrs = [0.2, 0.1, 0.05, 0.025]
    gradient_flow = run(problem, fs.GradientFlow(), ACCURATE)
    gf = [error_at(problem, gradient_flow, None, fs.DiscreteSGD(lr)) for lr in lrs]
    mf = [error_at(problem, fs.ModifiedFlow(lr), ACCURATE, fs.DiscreteSGD(lr)) for lr in lrs]
    print(f"GF slope {slope(lrs, gf):.3f}, ModifiedFlow slope {slope(lrs, mf):.3f}; errors {gf} {mf}")
    assert abs(slope(lrs, gf) - 1) < 0.25
    assert abs(slope(lrs, mf) - 2) < 0.3
    assert all(m < g for m, g in zip(mf, gf))


def test_momentum_flow_tracks_heavy_ball_better_than_the_reduced_flow():
    """Heavy-ball GD (β = 0.9) at η ∈ {0.04, 0.02, 0.01} to T = 1. Measured: "rest" slope
    1.16 (errors 1.6e-2 … 3.3e-3), "matched" slope 1.57 and 17–30 times smaller (9.5e-4 …
    1.1e-4), the reduced flow's errors 0.77 … 0.37 (slope 0.53: at β = 0.9 its O(η) term has a
    factor (1+β)/(2(1−β)²) = 95, so these η are outside its range)."""
    problem = small_problem()
    lrs = [0.04, 0.02, 0.01]
    heavy_ball = [run(problem, fs.DiscreteSGD(lr, momentum=0.9)) for lr in lrs]
    errors = {
        name: [error_at(problem, fs.MomentumFlow(lr, 0.9, **args), integ, hb) for lr, hb in zip(lrs, heavy_ball)]
        for name, args, integ in [
            ("rest", {}, ACCURATE_EXP),
            ("matched", {"start": "matched"}, ACCURATE_EXP),
            ("reduced", {"form": "reduced"}, LOOSE),
        ]
    }
    print({k: f"slope {slope(lrs, e):.2f}, errors {np.round(e, 6)}" for k, e in errors.items()})
    for rest, matched, reduced in zip(errors["rest"], errors["matched"], errors["reduced"]):
        assert matched <= rest < reduced
    assert 0.75 < slope(lrs, errors["rest"]) < 1.5


def test_matched_start_with_dampening_reaches_order_2():
    """β = 0.5, dampening 0.3 (time step h = 0.7η): "rest" leaves an O(h) offset (slope 0.98),
    the dampened "matched" start v(0) = −(1+d)/((1+β)(1−d))·g_0 removes it (slope 1.8, rising
    towards 2 as η falls)."""
    problem = small_problem()
    lrs = [0.08, 0.04, 0.02, 0.01]
    errors = {}
    for start in ("rest", "matched"):
        errors[start] = []
        for lr in lrs:
            sgd = fs.DiscreteSGD(lr, momentum=0.5, dampening=0.3)
            t1 = round(1.0 / sgd.time_step) * sgd.time_step
            errors[start].append(error_at(problem, fs.MomentumFlow(lr, 0.5, 0.3, start=start), ACCURATE_EXP, sgd, t1))
    print({k: f"slope {slope(lrs, e):.2f}" for k, e in errors.items()})
    assert abs(slope(lrs, errors["rest"]) - 1) < 0.25
    assert slope(lrs, errors["matched"]) > 1.6
    assert all(m < r for m, r in zip(errors["matched"], errors["rest"]))


def test_modified_flow_laws():
    """No weight decay: translation laws conserved, and a scale law grows exactly as
    d|θ_A|²/dt = η|ĝ_A|² (grad_sq), integrated along the run by Simpson's rule (started after 30
    GD steps, past the first fast drop of |ĝ_A|² that a quadrature on the save grid would
    miss). With weight decay λ a translation law decays at the modified rate λ + ηλ²/2."""
    from scipy.integrate import cumulative_simpson

    lr = 0.2
    problem = build_problem("cnn", n=32, activation="identity", pool_every=0, batch_norm=True, bn_eps=1e-12)
    theta = problem.initial_theta()
    for _ in range(30):
        theta = theta - 0.1 * problem.loss_and_grad(theta)[1]
    problem.load_into_model(theta)
    ds = fs.simulate(problem, fs.ModifiedFlow(lr), TIGHT, t1=1.0, save_every=0.05, progress=False)
    assert ds.attrs["status"] == "completed"
    scale, translation = ds.law == "scale", ds.law == "translation"
    assert int(scale.sum()) == 8 and int(translation.sum()) > 0
    # a Runge–Kutta method keeps a linear law exactly: each evaluation's column sums
    # Σ_k f[k, j] are 0 whatever the rounded activations (Σ_k p_k = 1), up to the rounding of
    # the softmax's K terms and the mean over N examples, roundoff(N + K) per entry, K entries;
    # every evaluation enters θ once through the stage sums (|h f| ≤ |θ|), and the law's two
    # evaluations round by roundoff(K + 1) of its scale (a drift from another cause, e.g. weight
    # decay, is ~λt ≥ 1e-3)
    classes, nfe = 10, int(ds.nfe[-1])
    bound = roundoff(n_ops=nfe * (1 + classes * (problem.n_examples + classes)) + 2 * (classes + 1))
    assert float(abs(ds.flowsim.drift().where(translation, drop=True)).max()) < bound
    value = ds.value.where(scale, drop=True).values
    grown = value - value[0]
    predicted = lr * cumulative_simpson(ds.grad_sq.where(scale, drop=True).values, x=ds.time.values, axis=0, initial=0.0)
    print(f"scale laws grew by up to {np.abs(grown).max():.3e}, off the prediction by {np.abs(grown - predicted).max():.3e}")
    assert np.abs(grown - predicted).max() < 1e-9 * np.abs(value).max()
    assert np.abs(grown - predicted).max() < 1e-4 * np.abs(grown).max()
    # with weight decay λ: s(t) = s(0) exp(−(λ + ηλ²/2) t)
    lam = 0.1
    decayed = build_problem("mlp", n=32, activation="tanh", weight_decay=lam)
    ds = fs.simulate(decayed, fs.ModifiedFlow(lr), TIGHT, t1=1.0, save_every=0.5, progress=False)
    s = ds.value.where(ds.law == "translation", drop=True).values
    rate = lam + lr * lam**2 / 2
    np.testing.assert_allclose(s[-1], s[0] * np.exp(-rate), rtol=1e-8)
    assert np.abs(s[-1] - s[0] * np.exp(-lam)).max() > 1e-4 * np.abs(s[0]).max()  # not the plain rate


@dataclass(frozen=True)
class KickedMomentumFlow(fs.MomentumFlow):
    """MomentumFlow started with a random velocity (SGD-matched starts are ∝ g, which carries no
    angular momentum)."""

    def initial_state(self, problem, theta0):
        y = super().initial_state(problem, theta0)
        generator = torch.Generator().manual_seed(1)
        self.split(problem, y)[1].copy_(torch.randn(theta0.shape, generator=generator, dtype=theta0.dtype))
        return y


def test_momentum_rotation_law_of_a_linear_network():
    """f(x) = W2 (W1 x + b1) + b2 is invariant under W̄1 → G W̄1, W2 → W2 G⁻¹ (W̄1 = [W1 | b1],
    G ∈ GL(r)). Along θ'' + τθ' = −g/m, the momentum p_A = ⟨θ', ξ_A(θ)⟩ of a generator
    ξ_A = (A W̄1, −W2 A) obeys p_A' = −τ p_A + tr(A(V̄1 V̄1ᵀ − V2ᵀ V2)) (⟨g, ξ_A⟩ = 0), and the last
    term vanishes for antisymmetric A: e^{τt}·Anti(W̄1 V̄1ᵀ − V2ᵀ W2) is conserved (V = θ')."""
    problem = build_problem("mlp", n=32, depth=1, width=4, activation="identity").to(dtype=torch.float64)
    flow = KickedMomentumFlow(lr=0.05, momentum=0.9)
    times = tuple(np.linspace(0.0, 2.0, 9))

    def law(rtol):
        out = []
        for point in Exponential(rtol=rtol, atol=rtol).solve(flow.term(problem, problem.initial_theta()), SaveGrid(times), seed=0):
            p, v = problem.unflatten(point.theta), problem.unflatten(point.velocity)
            w1 = torch.cat([p["fc1.weight"], p["fc1.bias"][:, None]], dim=1)
            v1 = torch.cat([v["fc1.weight"], v["fc1.bias"][:, None]], dim=1)
            m = w1 @ v1.T - v["out.weight"].T @ p["out.weight"]
            out.append((m - m.T) / 2 * np.exp(flow.damping * point.time))
        out = torch.stack(out)
        return out, float((out - out[0]).abs().max() / out[0].abs().max())

    laws, loose = law(1e-8)
    _, tight = law(1e-10)
    print(f"e^(τt)·Anti(...) relative deviation: {loose:.1e} at rtol 1e-8, {tight:.1e} at rtol 1e-10")
    assert flow.damping * times[-1] > 4  # Anti(...) itself shrinks by e^{−τT} ≈ 1/67
    assert float(laws[0].abs().max()) > 0.1
    assert loose < 1e-5 and tight < 1e-6 and tight < loose / 10  # conserved to integration tolerance


def test_stiff_momentum_flow_needs_a_tenth_of_dopri5s_evaluations():
    """η = 0.001, β = 0.9 (τ = 105) to t = 10, from a partly trained tanh MLP (300 GD steps).
    The default integrator (Exponential, rtol = atol = 1e-6) reaches a relative error E against
    dopri5 at rtol 1e-9; the loosest dopri5 as accurate costs 10× more (measured: E = 7.4e-8 in
    109 evaluations; dopri5 needs rtol 1e-6 and 2,426: stability holds its step near 3.3/τ ∝ η,
    whatever the tolerance)."""
    problem = build_problem("mlp", n=32, depth=1, width=8, activation="tanh").to(dtype=torch.float64)
    theta0 = problem.initial_theta()
    for _ in range(300):
        theta0 = theta0 - 0.2 * problem.loss_and_grad(theta0)[1]
    flow = fs.MomentumFlow(lr=0.001, momentum=0.9)
    grid = SaveGrid((0.0, 10.0))

    def final(integrator):
        *_, end = integrator.solve(flow.term(problem, theta0), grid, seed=0)
        return end.theta, end.nfe

    reference, reference_nfe = final(ODE("dopri5", rtol=1e-9, atol=1e-9))
    error = lambda theta: float((theta - reference).norm() / reference.norm())
    theta, nfe = final(default_integrator(flow))
    target = error(theta)
    for rtol in (1e-6, 1e-7, 1e-8):  # the loosest dopri5 as accurate (1e-5 is not: measured 4.8e-7)
        theta5, nfe5 = final(ODE("dopri5", rtol=rtol, atol=rtol))
        if error(theta5) <= target:
            break
    print(f"Exponential: error {target:.2e} in {nfe} evaluations; dopri5 at rtol {rtol:g}: {error(theta5):.2e} in {nfe5}")
    assert target < 1e-6 and error(theta5) <= target
    assert nfe * 10 <= nfe5


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(fs.ConfigError, match="dynamics.lr"):
        fs.ModifiedFlow(lr=0.0)
    with pytest.raises(fs.ConfigError, match="dynamics.momentum"):
        fs.MomentumFlow(lr=0.1, momentum=1.0)
    with pytest.raises(fs.ConfigError, match="dynamics.dampening"):
        fs.MomentumFlow(lr=0.1, momentum=0.9, dampening=1.0)
    with pytest.raises(fs.ConfigError, match="dynamics.start"):
        fs.MomentumFlow(lr=0.1, momentum=0.9, start="moving")
    with pytest.raises(fs.ConfigError, match="dynamics.form"):
        fs.MomentumFlow(lr=0.1, momentum=0.9, form="first")
    with pytest.raises(fs.ConfigError, match="reduced form has no velocity"):
        fs.MomentumFlow(lr=0.1, momentum=0.9, start="matched", form="reduced")


def test_momentum_flow_from_a_config_records_the_velocity():
    config = """
[model]
name = "mlp.mlp"
depth = 1
width = 4
[data]
name = "digits"
n_train = 32
[dynamics]
name = "MomentumFlow"
lr = 0.1
momentum = 0.9
start = "matched"
[run]
t1 = 0.5
save_every = 0.25
"""
    ds = fs.run_config(config, progress=False)
    assert ds.attrs["status"] == "completed" and "Exponential" in ds.attrs["integrator"]
    assert float(ds.lr) == 0.1 and float(ds.momentum) == 0.9 and '"start": "matched"' in ds.attrs["dynamics"]
    assert "velocity_sq" in ds and float(abs(ds.velocity_sq[0]).max()) > 0  # matched: moving at t = 0
    modified = fs.run_config(config.replace('name = "MomentumFlow"', 'name = "ModifiedFlow"').replace(
        'momentum = 0.9\nstart = "matched"\n', ""), progress=False)
    assert modified.attrs["status"] == "completed" and "velocity_sq" not in modified
