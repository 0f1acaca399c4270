"""integrators.RK: the fused Runge–Kutta loop takes torchdiffeq's steps and gives its states."""

import dataclasses
import math
import warnings

import pytest
import torch
import xarray as xr
import torch._inductor
from torch import Tensor, nn

import flowsim as fs
from flowsim.dynamics import ContinuousDynamics
from flowsim.errors import ConfigError, IntegrationError
from flowsim.integrators import INTEGRATORS, ODE, RK, SaveGrid
from flowsim.integrators.rk import TABLEAUS, ButcherTableau, _AdaptiveLoop, _DeviceLoop, _FixedLoop, vector_field
from flowsim.problem import split_contraction

from conftest import build_problem, gradient_condition, record_tolerances, relative, roundoff, sum_lengths

GRID = SaveGrid((0.0, 0.5, 1.0, 1.5))


@pytest.fixture(scope="module")
def smooth():
    """A tanh MLP on 64 digits in float64: its gradient flow is smooth (README, "Non-smooth flows")."""
    problem = build_problem("mlp", n=32, activation="tanh").to(dtype=torch.float64)
    return problem, problem.initial_theta()


def both(method: str, problem, theta0, grid=GRID, **kwargs):
    flow = fs.GradientFlow()
    reference = list(ODE(method, **kwargs).solve(flow.term(problem, theta0), grid, 0))
    fused = list(RK(method, **kwargs).solve(flow.term(problem, theta0), grid, 0))
    return reference, fused


class _Conditioned(_AdaptiveLoop):
    """The host loop, recording κ, the worst condition of its error estimate over the attempts
    whose ratio r sets the next step size (safety·r^(−1/order) strictly between dfactor and
    ifactor: where it is clamped, a slightly other r gives the same step):
    |Σ_j |b_j − b̂_j| |k_j|| / |Σ_j (b_j − b̂_j) k_j| (2-norms over the components)."""

    kappa = 1.0

    def _error_ratio(self, h):
        ratio = super()._error_ratio(h)
        integrator, K = self.integrator, self.state.stages[: self.tableau.stages]
        estimate = float((K.T @ self.b_error).norm())
        if estimate > 0 and integrator.dfactor < integrator.safety * ratio ** (-1 / self.tableau.order) < integrator.ifactor:
            self.kappa = max(self.kappa, float((K.T.abs() @ self.b_error.abs()).norm()) / estimate)
        return ratio


def summation_order_bound(method, tol, problem, theta0, grid, field_roundoff=0.0) -> float:
    """How far apart, relative to |θ| (max or 2-norm), two runs of one adaptive method may be at
    the save points when they take the same steps but make their sums in other orders
    (torchdiffeq's loop, the device loop, another BLAS or CPU); `field_roundoff` when their
    vector fields differ too (compiled against eager: roundoff(sum_lengths, gradient_condition)
    of |f|). Two parts:

    - direct: each of the n attempts rounds y1 and its stage sums, ~3ε|y| in each run
      (|h Σ a k| ≤ |y| on an accurate step), and h·Σ_j b_j δf_j ≤ field_roundoff·|y|: at worst
      they add up, roundoff(n_ops = 6n) + n·field_roundoff.
    - through the step sizes: the error estimate e = h Σ (b − b̂)_j k_j cancels by κ (measured
      on this run by `_Conditioned`; up to 1e7 … 1e10 for dopri8 on this MLP), so stage
      round-off of 2ε + field_roundoff relative moves the ratio r by κ times that and the next
      step size by 1/order of it. A save point moves with the step sizes as the solver's error
      E does (E ∝ h^m, m = max(order, 4) + 1: the local error, or the quartic dense output), by
      m·E·δh/h; E is bounded by the distance to the solve at 10× the tolerance (larger error).
      Never more than 2E, however large κ·ε (float32): both runs are within E of the flow.

    Never from a measured round-off: the README's 1.4e-12 for dopri8 at rtol 1e-10 is this term.
    A bug in a loop (a wrong coefficient, stage, time or dense weight) gives an O(h^p) error of
    the size of E itself (1e-7 … 1e-3 here) or other steps, orders of magnitude above."""
    field = vector_field(fs.GradientFlow().term(problem, problem.initial_theta()))
    loop = _Conditioned(RK(method, rtol=tol, atol=tol), field, theta0, grid)
    states = [loop.advance(t) for t in grid.times[1:]]
    looser = _AdaptiveLoop(RK(method, rtol=10 * tol, atol=10 * tol), field, theta0, grid)
    error = 0.0
    for t, y in zip(grid.times[1:], states):
        z = looser.advance(t)
        error = max(error, relative(z, y), float((z - y).norm() / y.norm()))
    order, attempts = TABLEAUS[method].order, loop.state.accepted + loop.state.rejected
    direct = roundoff(theta0.dtype, n_ops=6 * attempts) + attempts * field_roundoff
    stage = roundoff(theta0.dtype, n_ops=2) + field_roundoff
    return direct + min((max(order, 4) + 1) / order * error * loop.kappa * stage, 2 * error)


@pytest.mark.parametrize("method, tol", [("dopri5", 1e-8), ("dopri8", 1e-8), ("bosh3", 1e-6)])
def test_same_steps_evaluations_and_states_as_torchdiffeq(smooth, method, tol):
    """FSAL methods: at every save point the same accepted steps and evaluations as torchdiffeq
    (ODE), and the same state up to `summation_order_bound` (dopri5 and bosh3 ~1e-13, dopri8
    ~1e-11). Not bitwise: the stages are one mv here and torchdiffeq's sums over a stage-last
    buffer; the error estimate Σ (b − b̂)_j k_j cancels to 1e-7 … 1e-10 of Σ|b − b̂||k|, so
    the orders move the next step size and with it the save points (README: dopri8 at rtol 1e-10
    ends 1.4e-12 apart)."""
    reference, fused = both(method, *smooth, rtol=tol, atol=tol)
    assert [(p.step, p.nfe) for p in fused] == [(p.step, p.nfe) for p in reference]
    assert fused[-1].step >= 4
    bound = summation_order_bound(method, tol, *smooth, GRID)
    for p, q in zip(reference, fused):
        assert relative(q.theta, p.theta) < bound, (method, p.time)


@pytest.mark.parametrize("method, step_size", [("euler", 0.25), ("midpoint", None), ("heun3", 0.2), ("rk4", 0.3)])
def test_fixed_step_methods_equal_torchdiffeq(smooth, method, step_size):
    """Fixed grids (step_size, or the save times) with linear interpolation between them, as
    torchdiffeq. The states: within roundoff(n_ops = 6n) after n steps (each step of each run
    rounds y1 and its stage sums, ~3ε|y|: |h Σ b k| ≤ |y| and h‖J‖ ≲ 1 on these steps; at worst
    the errors add up), ~1e-14; a wrong coefficient or stage is an O(h^p) error, ≥ 1e-6 here."""
    reference, fused = both(method, *smooth, step_size=step_size)
    assert [(p.step, p.nfe) for p in fused] == [(p.step, p.nfe) for p in reference]
    bound = roundoff(torch.float64, n_ops=6 * fused[-1].step)
    for p, q in zip(reference, fused):
        assert relative(q.theta, p.theta) < bound


@pytest.mark.parametrize("sync_every", [1, 16])
@pytest.mark.parametrize("method, tol", [("dopri5", 1e-8), ("dopri8", 1e-8), ("bosh3", 1e-6), ("fehlberg2", 1e-6)])
def test_device_control_takes_the_steps_of_the_host(smooth, method, tol, sync_every):
    """Step-size control on the device (``sync_every``), read back once per chunk: the same
    accepted steps and evaluations at every save point as the host loop, and the same states up
    to `summation_order_bound`: a stage is y0 + h·(Kᵀa) by mv and addcmul here, one addmv on the
    host, and the BLAS may round the two apart (by one ulp per stage under MKL_CBWR=COMPATIBLE
    or ATEN_CPU_CAPABILITY=default, or on an AVX-512 CPU, where dopri8 then ends 2e-13 … 6e-13
    apart through its step sizes; bound ~1e-11)."""
    problem, theta0 = smooth
    grid = SaveGrid((0.0, 0.5, 1.0, 1.5, 3.0))
    host = list(RK(method, rtol=tol, atol=tol).solve(fs.GradientFlow().term(problem, theta0), grid, 0))
    device = list(RK(method, rtol=tol, atol=tol, sync_every=sync_every).solve(fs.GradientFlow().term(problem, theta0), grid, 0))
    assert [(p.step, p.nfe) for p in device] == [(p.step, p.nfe) for p in host]
    bound = summation_order_bound(method, tol, problem, theta0, grid)
    for p, q in zip(host, device):
        assert relative(q.theta, p.theta) < bound, (method, p.time)


def test_device_control_rejects_like_the_host_and_wastes_little():
    """A ReLU network's flow is non-smooth: steps are rejected. The device loop rejects the same
    attempts, its states are the host's up to `summation_order_bound`, and the attempts it
    launches past a save time (masked, wasted) stay few."""
    problem = build_problem("mlp", n=64).to(dtype=torch.float64)
    theta0, grid = problem.initial_theta(), SaveGrid(tuple(0.25 * k for k in range(9)))
    host = _AdaptiveLoop(RK("dopri5", rtol=1e-6, atol=1e-6), vector_field(fs.GradientFlow().term(problem, problem.initial_theta())), theta0, grid)
    device = _DeviceLoop(RK("dopri5", rtol=1e-6, atol=1e-6, sync_every=16), vector_field(fs.GradientFlow().term(problem, problem.initial_theta())), theta0, grid)
    bound = summation_order_bound("dopri5", 1e-6, problem, theta0, grid)
    for time in grid.times[1:]:
        assert relative(device.advance(time), host.advance(time)) < bound
        assert (device.state.accepted, device.state.rejected, device.state.nfe) == (host.state.accepted, host.state.rejected, host.state.nfe)
    attempts = host.state.accepted + host.state.rejected
    assert host.state.rejected >= 10 and attempts >= 60, (host.state.rejected, attempts)  # measured: 30 of 77
    assert device.launched <= 1.1 * attempts, (device.launched, attempts)


def test_device_loop_reads_back_seldom_and_launches_no_more_than_needed():
    """One save interval, dt growing from torchdiffeq's cautious first step: the chunks (half
    the steps expected at the growth of the last chunk) waste no attempt (measured: 320
    attempts, 320 launched) and read the state back about once per ten attempts (29 reads)."""
    problem = build_problem("cnn", n=64).to(dtype=torch.float64)
    loop = _DeviceLoop(RK("dopri5", rtol=1e-7, atol=1e-7, sync_every=16), vector_field(fs.GradientFlow().term(problem, problem.initial_theta())), problem.initial_theta(), SaveGrid((0.0, 5.0)))
    loop.advance(5.0)
    attempts = loop.state.accepted + loop.state.rejected
    assert attempts >= 200 and loop.launched <= 1.05 * attempts and loop.reads <= attempts / 5, (attempts, loop.launched, loop.reads)


@pytest.mark.parametrize("method", ["adaptive_heun", "fehlberg2"])
def test_methods_without_fsal_converge(smooth, method):
    """adaptive_heun and fehlberg2 evaluate f(y1) after each accepted step (torchdiffeq reuses
    their last stage, which is not taken at y1): the error at t=0.5 against a dopri8 solution
    at rtol=1e-12 shrinks at least 10× from rtol=1e-4 to 1e-6."""
    problem, theta0 = smooth
    grid = SaveGrid((0.0, 0.5))
    exact = list(RK("dopri8", rtol=1e-12, atol=1e-12).solve(fs.GradientFlow().term(problem, theta0), grid, 0))[-1].theta
    errors = [
        relative(list(RK(method, rtol=tol, atol=tol).solve(fs.GradientFlow().term(problem, theta0), grid, 0))[-1].theta, exact)
        for tol in (1e-4, 1e-6)
    ]
    assert errors[1] < errors[0] / 10, errors


def test_simulate_gives_the_dataset_of_ode(smooth):
    """Inside fs.simulate, RK("dopri5") records what ODE("dopri5") records, to round-off: θ up to
    B = `summation_order_bound` (|Δθ| ≤ B|θ|), and what the recorder computes from θ moves with
    it as `record_tolerances` (conftest) allows (grad_sq here: translation laws only, whose
    companion Σ_k g_kj is 0, so both sides are round-off). A bug in the wiring (another point's
    θ, a missed save) moves them by the flow between saves, ≥ 1e-3 relative."""
    problem = build_problem("mlp", n=64, activation="tanh", weight_decay=1e-3)
    run = dict(t1=1.0, save_every=0.25, progress=False, observe=("loss", "grad_norm", "params"))
    a = fs.simulate(problem, fs.GradientFlow(), ODE("dopri5", rtol=1e-8, atol=1e-8), **run)
    b = fs.simulate(problem, fs.GradientFlow(), RK("dopri5", rtol=1e-8, atol=1e-8), **run)
    assert b.attrs["status"] == "completed"
    assert (a.nfe.values == b.nfe.values).all() and (a.step.values == b.step.values).all()
    assert '"name": "RK"' in b.attrs["integrator"]
    exact = problem.to(dtype=torch.float64)
    bound = summation_order_bound("dopri5", 1e-8, exact, exact.initial_theta(), SaveGrid(tuple(b.time.values.tolist())))
    theta = torch.as_tensor(b.params.values)  # (time, P)
    tolerance = record_tolerances(exact, theta, bound * theta.norm(dim=1))
    for name, allowed in tolerance.items():
        worst = float((abs(a[name] - b[name]).values / allowed.numpy()).max())  # measured ≤ 0.04
        assert worst < 1, (name, worst)


def test_config_names_rk():
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
name = "RK"
method = "dopri8"
rtol = 1e-6
[run]
t1 = 0.1
save_every = 0.1
"""
    loaded = fs.config.load_config(config)
    assert INTEGRATORS["RK"] is RK and loaded.integrator == RK("dopri8", rtol=1e-6)


# ----------------------------------------------------------------------------------------- tableaus


def test_tableaus():
    """Every tableau passed its checks on construction; FSAL is derived from the coefficients."""
    assert {m for m, t in TABLEAUS.items() if t.fsal} == {"dopri5", "dopri8", "bosh3"}
    assert {m for m, t in TABLEAUS.items() if not t.adaptive} == {"euler", "midpoint", "heun2", "heun3", "rk4"}
    assert [TABLEAUS[m].stages for m in ("dopri5", "dopri8", "bosh3", "rk4")] == [7, 14, 4, 4]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"c": (0.0, 0.4)}, "row 1 of a sums to"),
        ({"b": (0.5, 0.4)}, "b sums to"),
        ({"b_error": (0.5, 0.0)}, "b_error sums to"),
        ({"a": ((), (0.5, 0.0))}, "expected 1 \\(explicit method\\)"),
        ({"b_mid": (0.25, 0.25)}, "only used with b_error"),
    ],
)
def test_tableau_checks(change, message):
    heun = ButcherTableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5), (0.5, -0.5), (0.5, 0.0))
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(heun, **({"b_error": None} if "b_mid" in change else {}), **change)


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "rk45"}, "integrator.method"),
        ({"rtol": 0.0}, "integrator.rtol"),
        ({"atol": -1.0}, "integrator.atol"),
        ({"step_size": 0.1}, "integrator.step_size"),
        ({"method": "rk4", "first_step": 0.1}, "integrator.first_step"),
        ({"max_steps": 0}, "integrator.max_steps"),
        ({"safety": 1.5}, "integrator.safety"),
        ({"dfactor": 0.0}, "integrator.dfactor"),
        ({"compile": "yes"}, "integrator.compile"),
        ({"sync_every": 0}, "integrator.sync_every"),
        ({"method": "rk4", "sync_every": 4}, "integrator.sync_every"),
        ({"cuda_graph": True}, "integrator.cuda_graph"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        RK(**kwargs)


@dataclasses.dataclass(frozen=True)
class _Explodes(ContinuousDynamics):
    """θ' = θ²: every positive component reaches infinity at t = 1/θ0."""

    def derivative(self, problem, t, y):
        return y * y


@dataclasses.dataclass(frozen=True)
class _TurnsNaN(ContinuousDynamics):
    """θ' = −θ, NaN from t = 0.5 on."""

    def derivative(self, problem, t, y):
        return -y if float(t) < 0.5 else torch.full_like(y, math.nan)


def test_cuda_graph_needs_cuda():
    """Refused before any work starts, naming the field."""
    with pytest.raises(ConfigError, match="integrator.cuda_graph"):
        fs.simulate(build_problem("mlp", n=16), fs.GradientFlow(), RK(sync_every=4, cuda_graph=True), t1=0.1, save_every=0.1, device="cpu", progress=False)


@pytest.mark.parametrize("sync_every", [None, 4], ids=["host", "device"])
@pytest.mark.parametrize(
    "dynamics, integrator, message",
    [
        (_Explodes(), RK("dopri5"), "step size underflow"),
        (_TurnsNaN(), RK("bosh3"), "NaN/Inf"),
        (_TurnsNaN(), RK("fehlberg2"), "NaN/Inf"),
        (fs.GradientFlow(), RK("dopri5", rtol=1e-12, atol=1e-12, max_steps=3), "max_steps = 3"),
    ],
    ids=["underflow", "nan", "nan_no_fsal", "max_steps"],
)
def test_failures_end_the_run_as_diverged(dynamics, integrator, message, sync_every):
    """The host loop and the device loop (its decisions read back once per chunk) end alike."""
    integrator = dataclasses.replace(integrator, sync_every=sync_every)
    problem = build_problem("mlp", n=16)
    with pytest.warns(RuntimeWarning, match="diverged"):
        ds = fs.simulate(problem, dynamics, integrator, t1=10.0, save_every=0.25, progress=False, laws=[])
    assert ds.attrs["status"] == "diverged" and message in ds.attrs["status_message"]
    assert ds.sizes["time"] >= 1


def test_failure_raises_integration_error_from_solve():
    problem = build_problem("mlp", n=16)
    points = RK("dopri5", max_steps=2).solve(fs.GradientFlow().term(problem, problem.initial_theta()), SaveGrid((0.0, 5.0)), 0)
    next(points)
    with pytest.raises(IntegrationError, match="raise integrator.max_steps"):
        next(points)


def test_float32_runs_and_refuses_what_it_cannot_honour(smooth):
    """float32 takes the steps of float64 at rtol=1e-5 (exactly) and ends within float32
    round-off of it: `summation_order_bound` in float32 (ε = 1.2e-7; float64's round-off is 2^29
    times smaller), its vector field rounded by roundoff(float32, sum_lengths,
    gradient_condition) too. Here κ·ε ≈ 0.04 (three attempts, κ ~3e5): the step sizes may move
    by percents, so the bound is the solver's own error, 2E + the direct rounding (~6e-4; the
    step sizes actually differ by 8e-5, the states by 1.7e-7). A float32 run that is not
    solving the same flow (a stage dropped, a wrong cast) is off by O(h) ~ 1e-2."""
    problem, theta0 = smooth
    grid, rk = SaveGrid((0.0, 0.5)), RK("dopri5", rtol=1e-5, atol=1e-5)
    single = problem.to(dtype=torch.float32)
    last = list(rk.solve(fs.GradientFlow().term(single, theta0.float()), grid, 0))[-1]
    exact = list(rk.solve(fs.GradientFlow().term(problem, theta0), grid, 0))[-1]
    assert last.theta.dtype == torch.float32 and (last.step, last.nfe) == (exact.step, exact.nfe)
    field = roundoff(torch.float32, n_ops=sum_lengths(problem), cond=gradient_condition(problem, theta0))
    bound = summation_order_bound("dopri5", 1e-5, single, theta0.float(), grid, field_roundoff=field)
    assert relative(last.theta.double(), exact.theta) < bound
    with pytest.raises(ConfigError, match="integrator.rtol.*float32"):
        RK("dopri5", rtol=1e-8).check_dtype(torch.float32)


# ----------------------------------------------------------------------------------------- compiled vector field


def test_compile_failure_falls_back_with_a_warning(smooth, monkeypatch):
    problem, theta0 = smooth

    def broken(graph, inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch._inductor, "compile", broken)
    f = vector_field(fs.GradientFlow().term(problem, problem.initial_theta()), compile=True)
    out, expected = torch.empty_like(theta0), fs.GradientFlow().derivative(problem, torch.tensor(0.0), theta0)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        f(0.0, theta0, out)
    assert torch.equal(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(0.0, theta0, out)  # warned once, then eager without a word


def test_compile_switch(smooth, monkeypatch):
    """compile=False never compiles; compile=True traces the problem's full-batch gradient once
    (make_fx, fake tensors) and hands the graph to the compiler once (here a stand-in that
    returns the traced graph unchanged): the functional gradient, equal to the flat-buffer one
    to round-off (roundoff(sum_lengths, gradient_condition) of it), so the same steps and states
    within `summation_order_bound` with that field round-off (~1e-11)."""
    problem, theta0 = smooth
    compiled = []

    def stand_in(graph, inputs):
        compiled.append([tuple(x.shape) for x in inputs])
        return graph

    monkeypatch.setattr(torch._inductor, "compile", stand_in)
    off = list(RK("dopri5", rtol=1e-6, atol=1e-6).solve(fs.GradientFlow().term(problem, theta0), GRID, 0))
    assert compiled == []
    on = list(RK("dopri5", rtol=1e-6, atol=1e-6, compile=True).solve(fs.GradientFlow().term(problem, theta0), GRID, 0))
    assert compiled == [[tuple(theta0.shape), tuple(problem.X.shape), tuple(problem.y.shape)]]
    assert [(p.step, p.nfe) for p in on] == [(p.step, p.nfe) for p in off]
    field = roundoff(n_ops=sum_lengths(problem), cond=gradient_condition(problem, theta0))
    bound = summation_order_bound("dopri5", 1e-6, problem, theta0, GRID, field_roundoff=field)
    assert relative(on[-1].theta, off[-1].theta) < bound
    assert problem._compiled_grad is None  # the twin compiled, not the problem the user holds


def test_simulate_compiles_once_per_problem(monkeypatch):
    """Every simulate call binds a copy of the problem (Problem.to); the copies share its
    compiled gradients, so two runs compile once; a changed buffer (traced in as a constant), a
    new dtype or another problem compile again."""
    compiled = []

    def stand_in(graph, inputs):
        compiled.append(inputs[0].dtype)
        return graph

    monkeypatch.setattr(torch._inductor, "compile", stand_in)
    problem = build_problem("mlp", n=32, depth=1, width=8)
    problem.model.register_buffer("offset", torch.zeros(()))
    run = lambda p, **kw: fs.simulate(p, fs.GradientFlow(), RK("dopri5", rtol=1e-6, atol=1e-6, compile=True), t1=0.2, save_every=0.1, laws=[], progress=False, **kw)
    first, second = run(problem), run(problem)
    assert compiled == [torch.float64]
    xr.testing.assert_identical(first.drop_vars("wall_time"), second.drop_vars("wall_time"))
    run(problem, dtype=torch.float32)
    assert compiled == [torch.float64, torch.float32]
    problem.model.offset.fill_(1.0)
    run(problem)
    assert len(compiled) == 3
    run(build_problem("mlp", n=32, depth=1, width=8))
    assert len(compiled) == 4


class Branching(nn.Module):
    """A model whose Python branches on a value: fake tensors cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x)
        return out if out.sum() > 0 else -out


def test_compile_refuses_value_dependent_control_flow():
    """A model whose Python branches on a value cannot be traced with fake tensors: the twin
    warns and evaluates eagerly instead of baking one branch into the graph."""
    torch.manual_seed(0)
    problem = fs.Problem(Branching().double(), (torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3))
    theta = problem.initial_theta()
    twin = problem.compiled_gradient()
    with pytest.warns(RuntimeWarning, match="compiling the gradient failed"):
        loss, grad = twin.loss_and_grad(theta)
    expected_loss, expected_grad = problem.loss_and_grad(theta)
    assert torch.equal(grad, expected_grad) and torch.equal(loss, expected_loss)


def test_ensemble_runs_flat_and_compile_leaves_it_eager():
    """An ensemble's (K, P) state: RK's fused loop equals torchdiffeq's (same evaluations,
    states within roundoff(n_ops = 6n) after n rk4 steps, as test_fixed_step_methods_equal_torchdiffeq:
    ~2e-14, where a wrong stage would be O(h⁴) ~ 1e-6); under compile=True the members keep
    their eager vmapped gradient (the same operations: equal bit for bit), and it says so."""
    problem = build_problem(n=32, width=6, activation="tanh")
    run = dict(t1=0.4, save_every=0.2, ensemble=3, observe=("params",), progress=False)
    fused = fs.simulate(problem, fs.GradientFlow(), RK("rk4", step_size=0.05), **run)
    reference = fs.simulate(problem, fs.GradientFlow(), ODE("rk4", step_size=0.05), **run)
    assert fused.attrs["status"] == "completed" and (fused.nfe.values == reference.nfe.values).all()
    assert relative(fused.params.values, reference.params.values) < roundoff(n_ops=6 * int(fused.step[-1]))
    with pytest.warns(RuntimeWarning, match="eagerly"):
        compiled = fs.simulate(problem, fs.GradientFlow(), RK("rk4", step_size=0.05, compile=True), **run)
    assert (compiled.params == fused.params).all()


@pytest.fixture
def two_threads():
    """Two torch threads for one test (the suite runs on one): what ``split_contraction`` splits over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_split_contraction(two_threads):
    """A long contraction (k ≥ threads·max(m, n)) becomes a batched product over one slice of
    k per thread and a sum, equal to the product to round-off: two sums of the same k = 64 terms
    in any orders are within roundoff(n_ops = k)·Σ_l |a_il||b_lj| of each other, entry by entry
    (Higham; a lost or doubled slice is off by O(|a||b|)); a shorter one, one off the CPU or one
    with a single thread is left to the BLAS (NotImplemented: make_fx keeps the mm)."""
    a, b = torch.randn(8, 64, dtype=torch.float64), torch.randn(64, 10, dtype=torch.float64)
    split = split_contraction(a, b)
    assert split is not NotImplemented
    worst = float(((split - a @ b).abs() / (roundoff(n_ops=64) * (a.abs() @ b.abs()))).max())
    assert worst < 1, worst
    assert split_contraction(torch.randn(64, 8, dtype=torch.float64), b[:8]) is NotImplemented  # k = 8 < 2·max(64, 10)
    assert split_contraction(torch.randn(8, 63, dtype=torch.float64), torch.randn(63, 10, dtype=torch.float64)) is NotImplemented
    assert split_contraction(torch.randn(40, 64, dtype=torch.float64), b) is NotImplemented  # 64 < 2·40
    assert split_contraction(a.to("meta"), b.to("meta")) is NotImplemented
    wide = torch.randn(64, 20, dtype=torch.float64)
    assert split_contraction(a, wide) is not NotImplemented  # two threads: 64 ≥ 2·20
    torch.set_num_threads(4)
    assert split_contraction(a, wide) is NotImplemented  # four: 64 < 4·20, a slice per thread too short
    torch.set_num_threads(1)
    assert split_contraction(a, b) is NotImplemented


def test_compiled_vector_field_equals_eager(smooth, two_threads):
    """The real compiler (make_fx and TorchInductor, ~10 s on 2 cores), with two threads so
    that the weight gradients of the hidden and output layers (contractions over the 32
    examples) are split: the same steps, and states within `summation_order_bound` with the
    gradient's round-off in the other order, roundoff(sum_lengths, gradient_condition) of it."""
    problem, theta0 = smooth
    eager = list(RK("dopri5", rtol=1e-8, atol=1e-8).solve(fs.GradientFlow().term(problem, theta0), GRID, 0))
    twin = problem.compiled_gradient()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: it really compiled
        twin.loss_and_grad(theta0)
        compiled = list(RK("dopri5", rtol=1e-8, atol=1e-8, compile=True).solve(fs.GradientFlow().term(problem, theta0), GRID, 0))
    traced = twin._compiled_grad.graph
    assert sum(node.target == torch.ops.aten.bmm.default for node in traced.graph.nodes) == 2
    assert [(p.step, p.nfe) for p in compiled] == [(p.step, p.nfe) for p in eager]
    field = roundoff(n_ops=sum_lengths(problem), cond=gradient_condition(problem, theta0))
    bound = summation_order_bound("dopri5", 1e-8, problem, theta0, GRID, field_roundoff=field)
    assert relative(compiled[-1].theta, eager[-1].theta) < bound


@pytest.mark.gpu
def test_on_cuda_equals_cpu(gpu, smooth):
    problem, theta0 = smooth
    cpu = list(RK("dopri5", rtol=1e-8, atol=1e-8).solve(fs.GradientFlow().term(problem, theta0), GRID, 0))
    on_gpu = list(RK("dopri5", rtol=1e-8, atol=1e-8).solve(fs.GradientFlow().term(problem.to(gpu), theta0.to(gpu)), GRID, 0))
    assert [(p.step, p.nfe) for p in on_gpu] == [(p.step, p.nfe) for p in cpu]
    assert relative(on_gpu[-1].theta.cpu(), cpu[-1].theta) < 1e-10


@pytest.mark.gpu
def test_compiled_on_cuda_equals_cpu(gpu, smooth):
    """compile=True on CUDA (TorchInductor's GPU kernels, no fallback): the CPU host loop's
    steps, states to 1e-10 relative."""
    problem, theta0 = smooth
    cpu = list(RK("dopri5", rtol=1e-8, atol=1e-8).solve(fs.GradientFlow().term(problem, theta0), GRID, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        on_gpu = list(RK("dopri5", rtol=1e-8, atol=1e-8, compile=True).solve(fs.GradientFlow().term(problem.to(gpu), theta0.to(gpu)), GRID, 0))
    assert [(p.step, p.nfe) for p in on_gpu] == [(p.step, p.nfe) for p in cpu]
    assert relative(on_gpu[-1].theta.cpu(), cpu[-1].theta) < 1e-10


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["launches", "cuda_graph"])
def test_device_control_on_cuda_equals_the_host_loop_on_cpu(gpu, smooth, cuda_graph):
    """On the GPU, the device loop (and its CUDA-graph replay) takes the host loop's steps."""
    problem, theta0 = smooth
    cpu = list(RK("dopri5", rtol=1e-8, atol=1e-8).solve(fs.GradientFlow().term(problem, theta0), GRID, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the graph was captured
        integrator = RK("dopri5", rtol=1e-8, atol=1e-8, sync_every=16, cuda_graph=cuda_graph)
        on_gpu = list(integrator.solve(fs.GradientFlow().term(problem.to(gpu), theta0.to(gpu)), GRID, 0))
    assert [(p.step, p.nfe) for p in on_gpu] == [(p.step, p.nfe) for p in cpu]
    for p, q in zip(cpu, on_gpu):
        assert relative(q.theta.cpu(), p.theta) < 1e-10


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["launches", "cuda_graph"])
def test_device_loop_never_waits_for_the_host_inside_a_chunk(gpu, cuda_graph):
    """Launching a chunk of attempts synchronises nothing (torch.cuda's sync debug mode raises
    on any synchronising call); only the read-back after the chunk does."""
    problem = build_problem("mlp", n=64).to(device=gpu, dtype=torch.float32)
    integrator = RK("dopri5", rtol=1e-4, atol=1e-4, sync_every=8, cuda_graph=cuda_graph)
    loop = _DeviceLoop(integrator, vector_field(fs.GradientFlow().term(problem, problem.initial_theta())), problem.initial_theta(), SaveGrid((0.0, 1.0)))
    loop.target.fill_(100.0)  # far: every attempt is live
    for _ in range(loop.WARM_UP + 1):  # the warm-up attempts and the capture (which synchronises)
        loop._launch()
    assert (loop.graph is not None) == cuda_graph
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            loop._launch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loop._sync()
    assert loop.state.accepted + loop.state.rejected == loop.launched == loop.WARM_UP + 9 and loop.state.t1 > 0


# ----------------------------------------------------------------------------------------- no allocation per step


def allocations(fn) -> int:
    """How many tensor storages `fn()` allocates (torch.profiler's memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "[memory]" and e.cpu_memory_usage > 0)


@pytest.mark.parametrize("method, options", [("dopri5", {"rtol": 1e-9}), ("dopri8", {"rtol": 1e-13}), ("fehlberg2", {"rtol": 1e-6}), ("rk4", {"step_size": 0.02})])
def test_no_allocation_per_step(method, options):
    """With a vector field that writes in place (y' = A y into `out`), advancing over a few or
    over many more steps allocates the same: the steps allocate nothing, only the save point does."""
    A = -torch.eye(40, dtype=torch.float64) + torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 40
    y0 = torch.ones(40, dtype=torch.float64)
    kwargs = options if "step_size" in options else {**options, "atol": options["rtol"]}
    loop = (_AdaptiveLoop if TABLEAUS[method].adaptive else _FixedLoop)(
        RK(method, **kwargs), lambda t, y, out: torch.mv(A, y, out=out), y0, SaveGrid((0.0, 2.0))
    )
    loop.advance(0.1)
    start = loop.state.accepted
    few = allocations(lambda: loop.advance(0.2))
    middle = loop.state.accepted
    many = allocations(lambda: loop.advance(2.0))
    assert loop.state.accepted - middle >= middle - start + 10, (start, middle, loop.state.accepted)
    assert many == few, (few, many)


def test_adaptive_ensemble_takes_torchdiffeqs_steps():
    """An ensemble under adaptive dopri5: RK's first step, as torchdiffeq's, is chosen in the
    term's error norm (the worst member's), so RK takes ODE's steps and evaluations and ends
    within roundoff(n_ops = 7 per step) of it (7 stages summed in another order; 2.5e-9 apart
    when RK took its first step in the RMS over all members)."""
    problem = build_problem(n=32, width=6, activation="tanh")
    run = dict(t1=0.4, save_every=0.2, ensemble=3, observe=("params",), progress=False)
    fused = fs.simulate(problem, fs.GradientFlow(), RK("dopri5", rtol=1e-7, atol=1e-9, compile=False), **run)
    reference = fs.simulate(problem, fs.GradientFlow(), ODE("dopri5", rtol=1e-7, atol=1e-9), **run)
    assert (fused.step.values == reference.step.values).all() and (fused.nfe.values == reference.nfe.values).all()
    assert relative(fused.params.values, reference.params.values) < roundoff(n_ops=7 * int(fused.step[-1]))
