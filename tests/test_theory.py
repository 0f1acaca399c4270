"""flowsim.theory: the predictions for broken laws against what SGD and the flows record."""

import json

import numpy as np
import pytest
from scipy.linalg import expm

import flowsim as fs
from flowsim.cli import main
from flowsim.integrators import ODE
from flowsim.theory import error, predict, solve_linear

from conftest import build_problem, roundoff

EPS32 = float(np.finfo(np.float32).eps)


def run_sgd(name="mlp", n=64, lr=0.1, lam=5e-3, steps=40, batch_size=16, momentum=0.0, dampening=0.0, dtype="float64", **model):
    """A record with a save at every step (what the discrete predictions need)."""
    problem = build_problem(name, n=n, weight_decay=lam, **model)
    dynamics = fs.DiscreteSGD(lr=lr, batch_size=batch_size, momentum=momentum, dampening=dampening)
    dt = dynamics.time_step
    return fs.simulate(problem, dynamics, t1=steps * dt, save_every=dt, seed=3, observe=(), dtype=dtype, progress=False)


def max_error(ds, relative_to="range"):
    """Largest error per law kind present, as {kind: error}."""
    e = error(ds, relative_to)
    return {kind: float(e.where(ds.law == kind).max()) for kind in dict.fromkeys(ds.law.values.tolist())}


# ---------------------------------------------------------------------------- solve_linear
def oscillator(gamma, omega_sq, h0, a, b, t, magnitude=False):
    """Closed form of h'' + 2γh' + ω²h = 2(a + b t), h(0) = h0, h'(0) = 0, in every regime;
    with `magnitude`, the sum of its terms' absolute values instead (what its rounding scales with)."""
    slope = 2 * b / omega_sq
    offset = (2 * a - 2 * gamma * slope) / omega_sq
    y0, dy0 = h0 - offset, -slope  # the homogeneous part y = h − (offset + slope t)
    disc = gamma**2 - omega_sq
    f = np.abs if magnitude else (lambda v: v)
    if disc < 0:
        w = np.sqrt(-disc)
        y = np.exp(-gamma * t) * (f(y0 * np.cos(w * t)) + f((dy0 + gamma * y0) / w * np.sin(w * t)))
    elif disc == 0:
        y = np.exp(-gamma * t) * (f(y0) + f((dy0 + gamma * y0) * t))
    else:
        r1, r2 = -gamma + np.sqrt(disc), -gamma - np.sqrt(disc)
        c1 = (dy0 - r2 * y0) / (r1 - r2)
        y = f(c1 * np.exp(r1 * t)) + f((y0 - c1) * np.exp(r2 * t))
    return y + f(offset) + f(slope * t)


def solve_linear_roundoff(matrix, t) -> float:
    """solve_linear's round-off relative to the size of x and the forcing terms: each interval's
    x ← E x + w₀ f_i + w₁ f_{i+1} sums n + 2 terms whose propagator and weights expm gives within
    a few ε (4 roundings counted: n + 6), and later intervals carry that error by E^k, at most
    growth = max_k ‖e^{M(t_k − t_0)}‖_∞ (1 for a contracting M); at worst the T − 1 intervals'
    errors add up. A closed form in closed_form_roundoff."""
    step = expm(np.asarray(matrix, float) * (t[1] - t[0]))  # the grids here are uniform
    assert np.allclose(np.diff(t), t[1] - t[0])
    power, growth = np.eye(len(step)), 1.0
    for _ in t[1:]:
        power = step @ power
        growth = max(growth, float(np.abs(power).sum(1).max()))
    return roundoff(n_ops=(len(t) - 1) * (len(matrix) + 6), cond=growth)


#: a closed form's rounding: exp, cos, sin and each product or sum round once (≲ 10 roundings)
CLOSED_FORM_OPS = 10


@pytest.mark.parametrize("gamma, omega_sq", [(0.3, 4.0), (2.0, 4.0), (5.0, 4.0)], ids=["under", "critical", "over"])
def test_solve_linear_is_exact_for_linear_forcing_in_every_regime(gamma, omega_sq):
    t = np.linspace(0.0, 12.0, 241)
    a, b = np.array([0.5, -1.0]), np.array([0.1, 0.02])  # two quantities at once
    x = solve_linear([[0, 1], [-omega_sq, -2 * gamma]], [0, 2], t, np.array([[1.0, 3.0], [0.0, 0.0]]), a + np.outer(t, b))
    expected = np.stack([oscillator(gamma, omega_sq, h0, ai, bi, t) for h0, ai, bi in zip((1.0, 3.0), a, b)], axis=1)
    terms = np.stack([oscillator(gamma, omega_sq, h0, ai, bi, t, magnitude=True) for h0, ai, bi in zip((1.0, 3.0), a, b)], axis=1)
    # solve_linear_roundoff of max|x| and the forcing 2(a + bt), plus the closed form's own (a wrong
    # propagator or forcing weight is an O(Δ) error, ~1e-2 here)
    scale = max(np.abs(x).max(), 2 * np.abs(a + np.outer(t, b)).max())
    bound = solve_linear_roundoff([[0, 1], [-omega_sq, -2 * gamma]], t) * scale + roundoff(n_ops=CLOSED_FORM_OPS) * terms.max()
    assert np.abs(x[:, 0] - expected).max() < bound


def test_solve_linear_hold_and_first_order():
    """x' = −r x + c f: with f held over each interval, x_{i+1} = e^{−rΔ} x_i + c f_i (1 − e^{−rΔ})/r,
    to round-off: solve_linear_roundoff for both recursions (the reference rounds as many times)."""
    r, c, dt = 0.7, 2.0, 0.25
    t = np.arange(41) * dt
    f = np.cos(t)[:, None]
    x = solve_linear([[-r]], [c], t, np.array([[1.5]]), f, "hold")[:, 0, 0]
    expected = [1.5]
    for fi in f[:-1, 0]:
        expected.append(np.exp(-r * dt) * expected[-1] + c * fi * (1 - np.exp(-r * dt)) / r)
    scale = max(np.abs(x).max(), c * np.abs(f).max() / r)
    assert np.abs(x - expected).max() < 2 * solve_linear_roundoff([[-r]], t) * scale
    with pytest.raises(fs.ConfigError, match="theory.interpolation"):
        solve_linear([[-r]], [c], t, np.array([[1.5]]), f, "cubic")


def test_solve_linear_stays_finite_where_growing_exponentials_overflow():
    """10,000 steps at η = 0.01: 2γt = 2·10⁴(1−β)/(1+β) is 1053 at β = 0.9 (e^{2γt} overflows
    float64) and 101 at β = 0.99 (overflows float32); λ = 0 adds a zero eigenvalue. Where a
    closed form exists, to its round-off and solve_linear_roundoff over the 10,000 intervals."""
    eta, lam, t = 0.01, 1e-3, np.arange(10_001) * 0.01
    for beta in (0.9, 0.99):
        gamma = (1 - beta) / (eta * (1 + beta))
        for omega_sq in (0.0, 4 * lam / (eta * (1 + beta))):
            x = solve_linear([[0, 1], [-omega_sq, -2 * gamma]], [0, 2], t, np.array([[1.0], [0.0]]), np.full((len(t), 1), 1e-3))
            assert np.isfinite(x).all()
            if omega_sq:
                expected = oscillator(gamma, omega_sq, 1.0, 1e-3, 0.0, t)
                terms = oscillator(gamma, omega_sq, 1.0, 1e-3, 0.0, t, magnitude=True)
                bound = solve_linear_roundoff([[0, 1], [-omega_sq, -2 * gamma]], t) * max(np.abs(x).max(), 2e-3)
                assert np.abs(x[:, 0, 0] - expected).max() < bound + roundoff(n_ops=CLOSED_FORM_OPS) * terms.max()


# ---------------------------------------------------------------------------- discrete: exact
@pytest.mark.parametrize("momentum, dampening", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.3)], ids=["sgd", "heavy_ball", "dampened"])
@pytest.mark.parametrize(
    "name, model", [("mlp", {}), ("cnn", {}), ("cnn", {"batch_norm": True, "bn_eps": 1e-12})], ids=["mlp", "cnn", "cnn_bn"]
)
def test_discrete_predictions_are_exact_in_float64(name, model, momentum, dampening):
    """From the value at step 0 and the recorded companions alone, to 1e-9 of max(|value|, scale):
    mini-batches of 16, λ = 5e-3, 40 steps. Not a round-off bound: round-off alone is ~40 steps
    × roundoff(n_c) ≈ 1e-13 (measured ≤ 2e-15); BatchNorm's eps = 1e-12 keeps its scale laws
    only to ~eps/Var (measured 2.3e-11)."""
    ds = predict(run_sgd(name, momentum=momentum, dampening=dampening, **model), "discrete")
    errors = max_error(ds, "value")
    assert max(errors.values()) < 1e-9, errors
    assert "translation" in errors and ({"scale", "rescale"} & set(errors))
    assert ds.theory.attrs["prediction"] == "discrete" and ds.theory.dims == ("time", "quantity")
    assert float((abs(ds.value[-1] - ds.value[0]) / ds.scale).max()) > 1e-3  # the laws did move


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "heavy_ball"])
@pytest.mark.parametrize(
    "batch_size, lam",
    [(None, 0.0), (24, 0.1), (1, 1.0)],
    ids=["full_batch-no_decay", "uneven_batches", "one_example-large_decay"],
)
def test_discrete_predictions_are_exact_for_any_batch_size_and_weight_decay(batch_size, lam, momentum):
    """Full batch without weight decay (only η² grad_sq breaks the quadratic laws), batches of 24
    out of 64 (every third one holds 16), and single examples with ηλ = 0.1: 1e-9 of max(|value|, scale)."""
    ds = predict(run_sgd(n=64, batch_size=batch_size, lam=lam, momentum=momentum, depth=1, width=8), "discrete")
    errors = max_error(ds, "value")
    assert max(errors.values()) < 1e-9, errors
    assert float((abs(ds.value[-1] - ds.value[0]) / ds.scale).max()) > 1e-3  # the laws did move


@pytest.fixture(scope="module")
def heavy_ball_float32():
    """10,000 steps of heavy ball, β = 0.99, in float32 on a tiny MLP (underdamped: ω > γ)."""
    return run_sgd(n=32, lr=0.01, lam=1e-2, steps=10_000, batch_size=8, momentum=0.99, dtype="float32", depth=1, width=4)


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.0, 0.99], ids=["sgd", "heavy_ball"])
def test_discrete_predictions_to_float32_round_off_over_10k_steps(momentum, heavy_ball_float32):
    """float32 rounds every update of θ and of the buffer (unit ε = 1.2e-7); those independent
    errors add up as a random walk, so after n steps the recursion is off by about √n·ε of the
    value. Bound: 10·√n·ε = 1.2e-4 at n = 10⁴ (measured: 8.7e-6 for full-batch SGD, 1.1e-5 for β = 0.99 with batches of 8)."""
    ds = (
        heavy_ball_float32
        if momentum
        else run_sgd(n=16, lr=0.1, lam=1e-2, steps=10_000, batch_size=None, dtype="float32", depth=1, width=4)
    )
    assert ds.value.dtype == np.float32 and ds.sizes["time"] == 10_001
    errors = max_error(predict(ds, "discrete"), "value")
    assert max(errors.values()) < 10 * np.sqrt(10_000) * EPS32, errors


@pytest.mark.slow
def test_predictions_are_finite_over_10k_float32_steps_at_beta_099(heavy_ball_float32):
    """γ = 0.5 over t = 100: e^{2γt} = e^{100} is beyond float32; every prediction kind and rate stays finite."""
    for kind, rate in (("discrete", "modified"), ("continuous", "modified"), ("continuous", "leading")):
        ds = predict(heavy_ball_float32, kind, rate=rate)
        assert np.isfinite(ds.theory.values).all(), (kind, rate)
    assert "underdamped" in ds.theory.attrs["equation"]


# ---------------------------------------------------------------------------- continuous
def test_continuous_sgd_within_2_percent_of_range():
    """A CNN with BatchNorm, η = 0.05, λ = 0.04, batch 16, 500 steps (λt = 1); measured 0.2%.
    BatchNorm's eps = 1e-12: at PyTorch's 1e-5 the scale laws drift from every prediction,
    the exact discrete one included, by 1.7% of their range here (eps/Var grows as λ shrinks θ)."""
    ds = run_sgd("cnn", lr=0.05, lam=0.04, steps=500, batch_norm=True, bn_eps=1e-12)
    for rate in ("modified", "leading"):
        errors = max_error(predict(ds, "continuous", rate=rate))
        assert max(errors.values()) < 0.02, (rate, errors)
        assert set(errors) == {"translation", "scale", "rescale"}


def test_modified_rate_beats_the_leading_rate_when_eta_lambda_is_large():
    """η = λ = 0.3: the leading rate λ is off by ηλ/2 = 4.5%, the modified one by (ηλ)²/3 = 0.3%
    (the exact rate of the map s ← (1−ηλ)s is −ln(1−ηλ)/η); the translation laws show the rate alone."""
    ds = run_sgd(n=32, lr=0.3, lam=0.3, steps=200, batch_size=8, depth=1, width=4)
    modified = max_error(predict(ds, "continuous", rate="modified"))["translation"]
    leading = max_error(predict(ds, "continuous", rate="leading"))["translation"]
    assert leading > 0.01 and modified < leading / 5, (modified, leading)


@pytest.mark.parametrize(
    "lr, lam, regime", [(0.01, 1e-2, "over or critically"), (0.05, 0.05, "under")], ids=["overdamped", "underdamped"]
)
def test_momentum_oscillator_within_5_percent_at_beta_09(lr, lam, regime):
    """1000 steps, batch 8: λt/(1−β) = 1 (overdamped) and 25 (underdamped); measured 0.17% and 1.6%."""
    ds = predict(run_sgd(n=32, lr=lr, lam=lam, steps=1000, batch_size=8, momentum=0.9, depth=1, width=4), "continuous")
    assert f"{regime}damped" in ds.theory.attrs["equation"]
    errors = max_error(ds)
    assert max(errors.values()) < 0.05, errors


@pytest.mark.slow
def test_momentum_oscillator_within_5_percent_at_beta_099(heavy_ball_float32):
    """The underdamped oscillator (γ = 0.5, ω = 1.4) over 10,000 float32 steps, λt/(1−β) = 100."""
    errors = max_error(predict(heavy_ball_float32, "continuous"))
    assert max(errors.values()) < 0.05, errors


def test_gradient_flow_decays_exactly():
    """GradientFlow with weight decay λ: s = e^{−λt} s_0 and h = e^{−2λt} h_0 (η = 0)."""
    problem = build_problem("mlp", n=32, weight_decay=0.2, depth=1, width=4, activation="identity")
    ds = fs.simulate(problem, fs.GradientFlow(), ODE("dopri5", rtol=1e-10, atol=1e-12), t1=2.0, save_every=0.5, progress=False)
    errors = max_error(predict(ds, "continuous"), "value")
    assert max(errors.values()) < 1e-8, errors
    assert float((abs(ds.value[-1] - ds.value[0]) / ds.scale).max()) > 0.1  # weight decay did act


# ---------------------------------------------------------------------------- what it needs
@pytest.fixture(scope="module")
def short_records():
    sgd = run_sgd(n=32, lr=0.1, steps=5, batch_size=8, depth=1, width=4)
    heavy = run_sgd(n=32, lr=0.1, steps=5, batch_size=8, momentum=0.9, depth=1, width=4)
    return sgd, heavy


def test_missing_companions_are_named(short_records):
    sgd, heavy = short_records
    for kind in ("discrete", "continuous"):
        with pytest.raises(fs.RecordError, match="no `grad_sq` variable.*rescale"):
            predict(sgd.drop_vars("grad_sq"), kind)
        with pytest.raises(fs.RecordError, match="no `velocity_sq` variable.*under momentum"):
            predict(heavy.drop_vars("velocity_sq"), kind)
    # translation alone needs no companion
    translation = sgd.where(sgd.law == "translation", drop=True).drop_vars("grad_sq")
    assert np.isfinite(predict(translation, "discrete").theory).all()


def test_unsupported_records_are_refused(short_records):
    sgd, heavy = short_records
    with pytest.raises(fs.RecordError, match="no prediction for the dynamics 'SGDNoise'"):
        predict(sgd.assign_attrs(dynamics=json.dumps({"name": "SGDNoise"})), "continuous")
    with pytest.raises(fs.RecordError, match="Nesterov"):
        predict(heavy.assign_attrs(dynamics=json.dumps({**json.loads(heavy.attrs["dynamics"]), "nesterov": True})))
    with pytest.raises(fs.RecordError, match="save at every step.*steps 0, 2, 4"):
        predict(sgd.isel(time=slice(None, None, 2)), "discrete")
    assert np.isfinite(predict(sgd.isel(time=slice(None, None, 2)), "continuous").theory).all()  # any grid
    with pytest.raises(fs.RecordError, match="dynamics"):
        predict(sgd.assign_attrs(dynamics="not json"))
    with pytest.raises(fs.RecordError, match="`weight_decay` coord"):
        predict(sgd.drop_vars("weight_decay"))
    with pytest.raises(fs.RecordError, match="members along 'path'; predict one member at a time"):
        predict(sgd.assign(value=sgd.value.expand_dims(path=2, axis=1)))
    with pytest.raises(fs.RecordError, match="one run at a time"):
        predict(sgd.assign_coords(lr=("run", [0.1, 0.2])))
    with pytest.raises(fs.ConfigError, match="theory.kind"):
        predict(sgd, "exact")
    with pytest.raises(fs.ConfigError, match="theory.rate"):
        predict(sgd, "continuous", rate="fast")
    with pytest.raises(fs.RecordError, match="call flowsim.theory.predict"):
        error(sgd)


def test_gradient_flow_has_no_discrete_prediction():
    ds = fs.simulate(build_problem("mlp", n=16, depth=1, width=4), fs.GradientFlow(), t1=0.2, save_every=0.1, progress=False)
    with pytest.raises(fs.RecordError, match="GradientFlow has no discrete steps"):
        predict(ds, "discrete")


# ---------------------------------------------------------------------------- plots
def test_plot_draws_the_theory_dashed(short_records, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    sgd, _ = short_records
    fig = predict(sgd, "discrete").flowsim.plot()
    dashed = [line for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == sgd.sizes["quantity"]
    # the CLI computes it from a stored record with --theory
    out = tmp_path / "run.zarr"
    fs.simulate(
        build_problem("mlp", n=16, weight_decay=1e-2, depth=1, width=4),
        fs.DiscreteSGD(lr=0.1, batch_size=8),
        t1=0.5,
        save_every=0.1,
        out=out,
        progress=False,
    )
    assert main(["plot", str(out), "-o", str(tmp_path / "run.png"), "--theory", "discrete"]) == 0
    assert (tmp_path / "run.png").stat().st_size > 0
