"""CentralFlow: the central flow of full-batch GD at the edge of stability (Cohen, Damian et al.,
ICLR 2025): its pieces (SDCP solver, third derivatives) on problems with known answers, gradient
flow below the edge, and GD's time-averaged trajectory at the edge."""

import numpy as np
import pytest
import torch

import flowsim as fs
from flowsim.dynamics.central import CentralFlow, _smat, _svec_np, solve_sdcp
from flowsim.integrators import ODE
from flowsim.spectrum import HessianOperator, top_eigenpairs

from conftest import roundoff

LR = 0.8  # 2/η = 2.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two (and does not fight other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp_problem(weight_decay: float = 0.0) -> fs.Problem:
    """A tanh MLP 64-16-16-10 (1482 parameters) on 64 digits, mse on one-hot labels, float64.
    Full-batch GD at η = 0.8: the sharpness starts at 2.04, rises to 2/η = 2.5 by step ~200,
    overshoots to 2.85 at step 400 and comes back to hover at 2.5 (two eigenvalues at the edge)."""
    X, y = fs.data.digits(n_train=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = fs.models.mlp.mlp(depth=2, width=16, activation="tanh").double()
    return fs.Problem(model, (X, torch.nn.functional.one_hot(y, 10).double()), loss="mse", weight_decay=weight_decay)


def test_bad_hyper_parameters_are_config_errors():
    for kwargs, field in [
        ({"lr": 0.0}, "dynamics.lr"),
        ({"lr": 0.1, "k": 0}, "dynamics.k"),
        ({"lr": 0.1, "relaxation": -1.0}, "dynamics.relaxation"),
        ({"lr": 0.1, "tol": 0.5}, "dynamics.tol"),
    ]:
        with pytest.raises(fs.ConfigError, match=field):
            CentralFlow(**kwargs)
    assert CentralFlow(0.1).describe() == {"name": "CentralFlow", "lr": 0.1, "k": 2, "relaxation": 1.0, "tol": 1e-8}


# --------------------------------------------------------------------------- the SDCP
def test_sdcp_with_identity_operator_is_the_psd_projection():
    """M = identity: min ½|S|² + ⟨Q, S⟩ over S ⪰ 0 is S = Π(−Q), the PSD part of −Q (closed form)."""
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        n = k * (k + 1) // 2
        q = rng.standard_normal((k, k))
        q = q + q.T
        w, v = np.linalg.eigh(-q)
        expected = (v * np.maximum(w, 0)) @ v.T
        got = _smat(solve_sdcp(_svec_np(q), np.eye(n)), k)
        assert np.abs(got - expected).max() <= roundoff(n_ops=10 * k) * np.abs(q).max(), k


def test_sdcp_meets_the_complementarity_conditions():
    """Random well-posed problems (M = ½FFᵀ of full rank): S ⪰ 0, Y = Q + M[S] ⪰ 0, ⟨S, Y⟩ = 0 to
    round-off of the problem's scale, from a cold start and from a warm start near the answer."""
    rng = np.random.default_rng(1)
    for trial in range(30):
        k = 2 + trial % 3
        n = k * (k + 1) // 2
        f = rng.standard_normal((n, 40)) * rng.uniform(0.1, 3.0, size=(n, 1))
        b, a = 0.5 * f @ f.T, 3.0 * rng.standard_normal(n)
        cold = solve_sdcp(a, b)
        for x in (cold, solve_sdcp(a, b, cold + 1e-3 * rng.standard_normal(n))):
            s, y = _smat(x, k), _smat(a + b @ x, k)
            scale = np.linalg.norm(a) + np.linalg.norm(b) * np.linalg.norm(x)
            bound = roundoff(n_ops=1e3)  # the solver accepts 1e3·ε of this scale
            assert np.linalg.eigvalsh(s)[0] >= -bound * np.linalg.norm(x) and np.linalg.eigvalsh(y)[0] >= -bound * scale, trial
            assert abs(np.sum(s * y)) <= bound * scale * np.linalg.norm(x), trial


class Toy:
    """A duck-typed problem with a known central flow: θ = (x1, x2, y1, y2, y3, z1 … z4),

        L = ½(h + s1·y1)x1² + ½(h + s2·y2)x2² + s3·y3·x1·x2 + g·y + ½ Σ c_i z_i²,

    so at x = 0, y = 0 the Hessian is diag(h, h, 0, 0, 0, c): with h = 2/η both x-directions sit
    at the edge, and ∇³L[e_x1, e_x1, ·] = s1 e_y1, ∇³L[e_x2, e_x2, ·] = s2 e_y2, ∇³L[e_x1, e_x2, ·] =
    s3 e_y3 (orthogonal: the SDCP has one solution). In the x-basis the complementarity Y = Q + M[S]
    with Q_ij = ⟨∇³L[e_xi, e_xj, ·], g⟩ and M[S]_ij = ½⟨∇³L[e_xi, e_xj, ·], Σ_kl S_kl ∇³L[e_xk, e_xl, ·]⟩
    (the full contraction counts S_12 twice) gives, when both directions are held (Y = 0):
    S_11 = −2g1/s1, S_22 = −2g2/s2, S_12 = −g3/s3, and y' = 0. A direction whose s_i g_i > 0
    flattens by itself: its S is 0 and gradient flow moves its y."""

    weight_decay = 0.0
    n_params = 9

    def __init__(self, s, g, c=(1.0, 0.5, 0.2, 0.1), h=2 / LR):
        self.s, self.g = torch.tensor(s, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)
        self.c, self.h = torch.tensor(c, dtype=torch.float64), h

    def per_example_losses(self, theta):
        x, y, z = theta[:2], theta[2:5], theta[5:]
        curvature = 0.5 * ((self.h + self.s[:2] * y[:2]) * x**2).sum() + self.s[2] * y[2] * x[0] * x[1]
        return (curvature + (self.g * y).sum() + 0.5 * (self.c * z**2).sum()).reshape(1)

    def loss_and_grad(self, theta):
        leaf = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.per_example_losses(leaf).mean()
            (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad


@pytest.mark.parametrize(
    "g, expected, held",
    [
        ((-0.3, -0.2, 0.0), [[0.6, 0.0], [0.0, 0.4]], (1, 1, 1)),  # both held, S diagonal
        ((-0.3, -0.2, 0.1), [[0.6, -0.1], [-0.1, 0.4]], (1, 1, 1)),  # both held, coupled
        ((-0.3, 0.2, 0.0), [[0.6, 0.0], [0.0, 0.0]], (1, 0, 1)),  # x2 flattens: gradient flow moves y2
    ],
)
def test_central_flow_on_a_model_with_a_closed_form(g, expected, held):
    """Σ in closed form (Toy), y' = 0 where held and −g where not, tr Σ, and the predicted loss
    L + ½ Σ λ_i S_ii = L + tr(S)/η at the edge."""
    toy = Toy(s=(1.0, 1.0, 1.0), g=g)
    theta = torch.tensor([0.0] * 5 + [0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
    # eigen-solver at residual 1e-12·λ: its vectors leave the x-plane by ≤ 1e-12·λ/gap ≈ 2e-12
    # (gap 2.5 − 1), which moves S (entries < 1) and y' by as much: 1e-10 leaves room
    state = CentralFlow(LR, k=2, tol=1e-12).edge(toy, theta)
    assert state.eigenvalues.tolist() == pytest.approx([2 / LR, 2 / LR], rel=1e-12)
    u = state.vectors[:2]  # the edge eigenvectors live in the x-plane, any basis of it
    np.testing.assert_allclose((u @ state.sigma @ u.T).numpy(), expected, rtol=0, atol=1e-10)
    assert state.velocity[2:5].tolist() == pytest.approx([0.0 if h else -gi for h, gi in zip(held, g)], abs=1e-10)
    trace = expected[0][0] + expected[1][1]
    assert float(state.sigma_trace) == pytest.approx(trace, abs=1e-10)
    assert float(state.predicted_loss) == pytest.approx(float(state.loss) + trace / LR, abs=1e-10)


def test_third_derivative_against_finite_differences():
    """HessianOperator.third gives ∇_θ(u_iᵀ H u_j); its product with w matches the central
    difference (u_iᵀH(θ+εw)u_j − u_iᵀH(θ−εw)u_j)/2ε, whose error falls as ε² (4× per halving)."""
    problem = mlp_problem()
    theta = problem.initial_theta()
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(problem.n_params, 2, generator=generator, dtype=torch.float64))[0]
    w = torch.randn(problem.n_params, generator=generator, dtype=torch.float64)
    exact = HessianOperator(problem, theta).third(u) @ w  # pairs (0,0), (0,1), (1,1)

    def difference(eps):
        plus, minus = HessianOperator(problem, theta + eps * w)(u), HessianOperator(problem, theta - eps * w)(u)
        quadratic = (u.T @ (plus - minus)) / (2 * eps)
        return torch.stack([quadratic[0, 0], quadratic[0, 1], quadratic[1, 1]])

    errors = [float((difference(eps) - exact).abs().max() / exact.abs().max()) for eps in (2e-4, 1e-4)]
    assert errors[0] < 1e-5 and 3.0 < errors[0] / errors[1] < 5.0, errors


# --------------------------------------------------------------------------- below and at the edge
def test_below_the_edge_it_is_gradient_flow_bit_for_bit():
    """At θ0 the sharpness (2.04) is below 2/η = 2.5 and no eigenvalue is caught: Σ = 0 and the
    vector field is gradient flow's, the same bits (the same loss_and_grad); so is a run of
    simulate with the same integrator, and with weight decay."""
    for weight_decay in (0.0, 1e-3):
        problem = mlp_problem(weight_decay)
        theta = problem.initial_theta()
        state = CentralFlow(LR).edge(problem, theta)
        assert float(state.eigenvalues[0]) + weight_decay < 2 / LR and float(state.sigma_trace) == 0.0
        assert torch.equal(state.velocity, fs.GradientFlow().derivative(problem, torch.tensor(0.0), theta))
        assert float(state.predicted_loss) == float(state.loss)
    run = dict(integrator=ODE("rk4", step_size=LR / 2), t1=2 * LR, save_every=LR, observe=("loss", "params"), progress=False)
    central, gradient = fs.simulate(problem, CentralFlow(LR), **run), fs.simulate(problem, fs.GradientFlow(), **run)
    for name in ("params", "loss", "value", "grad_sq"):
        np.testing.assert_array_equal(central[name].values, gradient[name].values)


# --------------------------------------------------------------------------- record and resume
@pytest.fixture(scope="module")
def at_the_edge():
    """The test MLP from GD's iterate at step 400 (sharpness 2.85, above 2/η: Σ ≠ 0)."""
    problem = mlp_problem()
    theta = problem.initial_theta()
    for _ in range(400):
        theta = theta - LR * problem.loss_and_grad(theta)[1]
    problem.load_into_model(theta)
    return problem


def test_the_record_holds_its_predictions_and_a_resume_is_bit_for_bit(at_the_edge, tmp_path, monkeypatch):
    """The record has the central flow's predictions at every save point (predicted_loss,
    predicted_grad_sq, sigma_trace), equal to an evaluation from a cold start at the saved θ
    to the eigen-solver's tolerance; recording them does not change the run (the same
    trajectory as a run without a record's extras would be is not observable, so: the
    predictions are evaluated from a copy of the warm starts). Stopped at the 3rd save point
    and resumed, the run is the uninterrupted one bit for bit: the checkpoint keeps the
    warm starts (the eigen-solver's subspace, the last S)."""
    from test_resume import interrupt_at, same

    flow = CentralFlow(LR, tol=1e-10)
    kwargs = dict(integrator=fs.RK("rk4", step_size=LR), t1=5 * LR, save_every=LR, observe=("loss", "params"), progress=False)
    reference = fs.simulate(at_the_edge, flow, **kwargs)
    assert float(reference.sigma_trace[0]) > 0  # at the edge
    for j in (0, reference.sizes["time"] - 1):
        state = flow.edge(at_the_edge, torch.as_tensor(reference.params.values[j]))
        # the eigenvectors to 1e-10·λ: S and the predictions move by as much relative to their size
        for name, value in [("predicted_loss", state.predicted_loss), ("predicted_grad_sq", state.predicted_grad_norm_sq), ("sigma_trace", state.sigma_trace)]:
            assert float(reference[name][j]) == pytest.approx(float(value), rel=1e-7), name
    assert (reference.predicted_loss >= reference.loss).all()

    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        fs.simulate(at_the_edge, flow, out=tmp_path / "c.zarr", checkpoint_every=0, **kwargs)
    monkeypatch.undo()
    same(fs.simulate(at_the_edge, flow, out=tmp_path / "c.zarr", resume=True, **kwargs), reference)


# --------------------------------------------------------------------------- the issue's MLP
EDGE_LR = 0.5  # 2/η = 4; flowsim's "mse" is ½‖f − y‖²/5 per example: η = 0.1 in the unscaled loss


def issue_mlp() -> fs.Problem:
    """A tanh MLP 64-32-32-10 (3,466 parameters, PyTorch's default init) on 256 digits, mse on
    one-hot labels, float64. Full-batch GD at η = 0.5: the sharpness rises from 2.45 to 2/η = 4
    by step ~1250 and overshoots to 4.3–4.4 around step 1500; then GD's oscillation sets in, in
    bursts that bring it back, and from step ~2500 on it oscillates steadily at the edge."""
    X, y = fs.data.digits(n_train=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = fs.models.mlp.mlp(depth=2, width=32, activation="tanh").double()
    return fs.Problem(model, (X, torch.nn.functional.one_hot(y, 10).double()), loss="mse")


def test_on_a_64_32_32_10_mlp_it_follows_gd_where_gradient_and_modified_flow_do_not():
    """GD for 3,000 steps; from GD's iterate at step 2,500 averaged over ±10 steps (where its
    early bursts of oscillation have settled into a steady one, sharpness 3.98), the central
    flow (k = 1: the second eigenvalue, ~2.9, is far below the edge), gradient flow and the
    modified flow for 200 steps by RK4 at h = η (as the issue asks, on its MLP).
    - GD's sharpness over the second half of its run (steps 1,500–3,000, every 100) within 10%
      of 2/η (measured 3.8–4.4 over three runs that differ in round-off).
    - The central flow's sharpness (the record's observer) reaches 2/η and never passes it by
      more than the eigen-solver's tolerance, while gradient flow's rises on (to 4.09).
    - At the end it is at most half as far from GD's time-averaged iterate as gradient flow
      (measured 3.2e-4 against 2.5e-3 relative) and closer than the modified flow (2.5e-2).
    - Its predicted loss L + ½⟨∇²L, Σ⟩ over the last half is GD's running-average loss to 10%
      (measured 2.5% below; L(θ) alone is 7.6% below).
    GD at the edge amplifies round-off (its bursts of oscillation from step ~1,500 are chaotic),
    so another machine's GD reaches step 2,500 elsewhere in the same steady regime. With θ0
    moved by 1e-12 relative (two seeds), GD's largest sharpness changed (4.27 → 4.37) and the
    figures did not: distances 3.0e-4 / 2.5e-3 / 2.6e-2, predicted loss 2.3% below."""
    problem = issue_mlp()
    edge, window, n0, steps, total = 2 / EDGE_LR, 10, 2500, 200, 3000
    theta, gd = problem.initial_theta(), []
    for _ in range(total + 1):
        gd.append(theta)
        theta = theta - EDGE_LR * problem.loss_and_grad(theta)[1]
    gd = torch.stack(gd)
    start, sharpness = torch.randn(problem.n_params, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), []
    for step in range(total // 2, total + 1, 100):
        found = top_eigenpairs(HessianOperator(problem, gd[step]), start, 1, tol=1e-6)
        sharpness.append(float(found.values[0]))
        start = found.subspace
    assert np.abs(np.asarray(sharpness) - edge).max() <= 0.1 * edge, sharpness

    def averaged(step: int) -> torch.Tensor:
        return gd[step - window : step + window + 1].mean(0)

    problem.load_into_model(averaged(n0))
    run = dict(integrator=fs.RK("rk4", step_size=EDGE_LR), t1=steps * EDGE_LR, save_every=20 * EDGE_LR, observe=("loss", "sharpness", "params"), progress=False)
    central = fs.simulate(problem, CentralFlow(EDGE_LR, k=1, tol=1e-6), **run)
    flows = {"gradient": fs.GradientFlow(), "modified": fs.ModifiedFlow(EDGE_LR)}
    others = {name: fs.simulate(problem, dynamics, **run) for name, dynamics in flows.items()}

    top = central.sharpness.values
    assert others["gradient"].sharpness.values[-1] > 1.02 * edge  # gradient flow keeps sharpening (measured 4.09)
    assert top.max() <= edge * (1 + 1e-6), top  # never above: the eigen-solver's tolerance 1e-6·λ
    assert np.abs(top[1:] - edge).max() <= 1e-3 * edge, top  # at the edge from the first save on

    target = averaged(n0 + steps)
    distance = {name: float((torch.as_tensor(ds.params.values[-1]) - target).norm() / target.norm()) for name, ds in [("central", central), *others.items()]}
    assert distance["central"] <= 0.5 * distance["gradient"] and distance["central"] < distance["modified"], distance

    half = central.time.values >= central.time.values[-1] / 2
    predicted = float(central.predicted_loss.values[half].mean())
    running = float(torch.stack([problem.loss(gd[n0 + step]) for step in range(steps // 2, steps + 1)]).mean())
    assert abs(predicted - running) <= 0.1 * running, (predicted, running, float(central.loss.values[half].mean()))
