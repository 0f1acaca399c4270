"""The SGD-noise SDE: its noise is SGD's covariance, it keeps the symmetries' laws, its
integrators converge at weak order 1 and replay their paths, and it matches SGD to O(η)
(gradient drift) and O(η²) (modified drift)."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm
from torch import nn

import flowsim as fs
from flowsim.integrators import ODE, SDE, FusedEulerMaruyama
from flowsim.integrators.brownian import brownian_increments

from conftest import build_problem, gradient_condition, hessian_norm, record_tolerances, roundoff, slope, sum_lengths


# ---------------------------------------------------------------------------------- the noise
def per_example_gradients(problem, theta):
    """∇ℓ_i(θ) for every example (with BatchNorm: under the statistics of all N), (N, P)."""
    leaf = theta.detach().requires_grad_(True)
    losses = problem.per_example_losses(leaf)
    return torch.stack([torch.autograd.grad(loss, leaf, retain_graph=True)[0] for loss in losses])


def test_exact_noise_is_the_covariance_of_an_sgd_step():
    """η G Gᵀ = η Cov_B[ĝ_B] over all C(8, 3) batches of S = 3 distinct examples, to round-off;
    diagonal noise keeps exactly its diagonal.

    Round-off: both sides are second moments of deviations d (ĝ_B − mean, ∇ℓ_i − ∇L), built
    from gradients whose entries are rounded by roundoff(sum_lengths)·max|∇ℓ_i| each, so
    each d is off by twice that; a product d_p d_q by that times 2·max|d|, and the sums over
    the 56 batches and the 8 examples round by roundoff(56 + 8)·max|d|²: times η, relative to
    max|Cov| (~1e-13). The diagonal noise is √(ηΣ_pp)·w_p: a variance off by δ moves its square
    root by ≤ δ/√Σ_pp (≤ √δ). A wrong covariance factor or centring is off by O(1/S)."""
    problem = build_problem("mlp", n=8, width=4).to(dtype=torch.float64)
    theta, n, s, lr = problem.initial_theta(), 8, 3, 0.1
    batch_grads = torch.stack([problem.loss_and_grad(theta, torch.tensor(b))[1] for b in itertools.combinations(range(n), s)])
    sgd_cov = lr * torch.cov(batch_grads.T, correction=0)
    exact = fs.SGDNoise(lr=lr, batch_size=s)
    G = torch.stack([exact.diffusion(problem, theta, e) for e in torch.eye(n, dtype=torch.float64)], dim=1)  # √η G
    per_example = per_example_gradients(problem, theta)
    deviation = max(float((d - d.mean(0)).abs().max()) for d in (batch_grads, per_example))
    rounding = roundoff(n_ops=sum_lengths(problem)) * float(per_example.abs().max())
    delta = lr * (2 * 2 * rounding * deviation + roundoff(n_ops=len(batch_grads) + n) * deviation**2)  # absolute, per entry
    worst = float((G @ G.T - sgd_cov).abs().max()) / delta
    assert worst < 1, worst
    w = torch.randn(problem.n_params, dtype=torch.float64)
    diagonal = fs.SGDNoise(lr=lr, batch_size=s, noise="diagonal").diffusion(problem, theta, w)
    variance = sgd_cov.diagonal()
    allowed = (delta / variance.sqrt().clamp_min(delta**0.5) + roundoff(n_ops=2) * variance.sqrt()) * w.abs()
    worst = float(((diagonal - variance.sqrt() * w).abs() / allowed).max())
    assert worst < 1, worst


@pytest.mark.parametrize("drift", ["gradient", "modified"])
def test_fused_step_is_drift_plus_noise_in_one_pass(drift):
    """euler_maruyama_step(θ, h, ΔW) = θ + b(θ) h + √η G ΔW (BatchNorm CNN, weight decay), and
    the modified drift is −g − (η/2)(H g + λ g).

    Round-off: each side sums, entry by entry, θ and the examples' gradients ∇ℓ_i with weights
    a_i (−h/N for the drift, √(ηc/(SN))(ΔW_i − mean ΔW) for the noise) along the network's
    sums: within roundoff(sum_lengths + 4) of M_p = |θ_p|(1 + hλ) + Σ_i |a_i||∇ℓ_i,p|, twice the
    lengths (a double backward) for the modified drift's (η/2)·h·|H_λ g|, bounded by
    (η/2)·h·(‖H‖ + λ)|g| (‖H‖ by power iteration, doubled). A wrong weight or a missing term is
    off by O(h|g|) ≫ that."""
    problem = build_problem("cnn", n=24, weight_decay=0.05, batch_norm=True).to(dtype=torch.float64)
    dynamics = fs.SGDNoise(lr=0.2, batch_size=4, drift=drift)
    theta = problem.initial_theta()
    dw = 0.3 * torch.randn(24, dtype=torch.float64)
    step = dynamics.euler_maruyama_step(problem, theta, 0.3, dw)
    reference = theta + 0.3 * dynamics.drift_at(problem, theta) + dynamics.diffusion(problem, theta, dw)
    _, grad = problem.loss_and_grad(theta)
    g = grad + 0.05 * theta
    per_example, lengths = per_example_gradients(problem, theta).abs(), sum_lengths(problem)
    noise = math.sqrt(0.2 * dynamics.covariance_factor(problem) / 24) * (dw - dw.mean()).abs()
    terms = theta.abs() * (1 + 0.3 * 0.05) + (0.3 / 24 + noise) @ per_example  # M_p
    modified = 0.0 if drift == "gradient" else 0.2 / 2 * (2 * hessian_norm(problem, theta) + 0.05) * float(g.norm())
    allowed = roundoff(n_ops=lengths + 4) * terms + roundoff(n_ops=2 * lengths) * 0.3 * modified
    worst = float(((step - reference).abs() / allowed.clamp_min(torch.finfo(torch.float64).tiny)).max())
    assert worst < 1, worst
    expected = -g if drift == "gradient" else -g - 0.1 * (problem.hvp(theta, g) + 0.05 * g)
    drift_terms = per_example.mean(0) + 0.05 * theta.abs()
    allowed = roundoff(n_ops=lengths + 2) * drift_terms + roundoff(n_ops=2 * lengths) * modified
    difference = (dynamics.drift_at(problem, theta) - expected).abs()
    worst = float((difference / allowed.clamp_min(torch.finfo(torch.float64).tiny)).max())
    assert worst < 1, worst


def test_fused_modified_step_is_one_forward_and_one_double_backward(monkeypatch):
    """The fused step with the modified drift runs the network forward once and differentiates
    twice (the gradient keeping its graph, then one double backward carrying both the noise
    weights and the Hessian-vector product: ``gradient_and_hvp``)."""
    problem = build_problem("cnn", n=16, weight_decay=0.05).to(dtype=torch.float64)
    theta, dw = problem.initial_theta(), 0.3 * torch.randn(16, dtype=torch.float64)
    forwards, passes = [], []
    problem._net.register_forward_hook(lambda *_: forwards.append(1))
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: passes.append(1) or grad(*a, **k))
    fs.SGDNoise(lr=0.2, batch_size=4, drift="modified").euler_maruyama_step(problem, theta, 0.3, dw)
    assert (len(forwards), len(passes)) == (1, 2)


def test_brownian_increments_are_independent_standard_normal_and_counter_based():
    """ΔW of (seed, path, step) is N(0, h·I), independent across paths and steps, and depends on
    nothing else: the number of paths does not change path p's increment."""
    h, size = 0.25, 64
    across_paths = brownian_increments(3, 200, 7, size, h, torch.float64, torch.device("cpu"))
    across_steps = torch.cat([brownian_increments(3, 1, k, size, h, torch.float64, torch.device("cpu")) for k in range(200)])
    for draws in (across_paths, across_steps):
        z = (draws / h**0.5).reshape(-1)  # 12,800 draws
        assert abs(float(z.mean())) < 4 / len(z) ** 0.5
        assert abs(float(z.var()) - 1) < 4 * (2 / len(z)) ** 0.5
        correlation = torch.corrcoef(draws[:, :8].T)  # between channels; rows between paths/steps
        assert float((correlation - torch.eye(8, dtype=torch.float64)).abs().max()) < 4 / len(draws) ** 0.5
    assert torch.equal(brownian_increments(3, 5, 7, size, h, torch.float64, torch.device("cpu")), across_paths[:5])
    assert not torch.equal(across_steps[0], across_steps[1])


# ---------------------------------------------------------------------------------- laws
def translation_spread(ds):
    """Largest relative drift of a translation law over time and paths, and its spread across paths at t1."""
    translation = ds.law == "translation"
    drift = ds.flowsim.drift().where(translation, drop=True)
    return float(abs(drift).max()), float(drift.isel(time=-1).std("path").max())


@pytest.mark.parametrize("integrator", [FusedEulerMaruyama(dt=0.05), SDE("euler", dt=0.05)], ids=["fused", "torchsde"])
def test_exact_noise_keeps_translation_laws_on_every_path(integrator):
    """A translation law Σ_k W[k, j] is moved by Σ_i a_i Σ_k (p_ik − y_ik) h_ij = 0 whatever the
    rounded h and logits (Σ_k p_ik = 1), so only rounding moves it: per step each of the K = 10
    entries' increments rounds by roundoff(N + K) of Σ_i |a_i||∇ℓ_i| (≤ √N·|ΔW| with random-sign
    noise weights, and |ΔW| ≤ |W| on these steps), and each update W + ΔW by ε/2·|W|; the law's
    two evaluations by roundoff(K + 1) of its scale Σ|W[k, j]|. Over n = 10 steps:
    roundoff(n·(1 + K(N + K)), √N) + 2·roundoff(K + 1) of the scale, ~5e-12 (noise that is not
    SGD's, e.g. diagonal, moves it by ~1e-6: test_diagonal_noise_makes_translation_laws_diffuse)."""
    problem = build_problem("mlp", n=32)
    ds = fs.simulate(
        problem, fs.SGDNoise(lr=0.2, batch_size=4, paths=4), integrator, t1=0.5, save_every=0.1, seed=1, progress=False
    )
    drift, _ = translation_spread(ds)
    steps, classes, n = 10, 10, problem.n_examples
    assert drift < roundoff(n_ops=steps * (1 + classes * (n + classes)), cond=n**0.5) + 2 * roundoff(n_ops=classes + 1)
    assert float(ds.loss.isel(time=-1).std("path")) > 1e-4  # the paths did move apart


def test_diagonal_noise_makes_translation_laws_diffuse():
    problem = build_problem("mlp", n=32)
    dynamics = fs.SGDNoise(lr=0.2, batch_size=4, noise="diagonal", paths=4)
    ds = fs.simulate(problem, dynamics, FusedEulerMaruyama(dt=0.05), t1=0.5, save_every=0.1, seed=1, progress=False)
    drift, spread = translation_spread(ds)
    assert spread > 1e-6 and drift > 1e-6


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_fused_steps_keep_the_scale_identity(lam):
    """Scale laws (a conv channel before BatchNorm, eps = 1e-12): the noise and gradient are
    orthogonal to θ_A, so h_{k+1} = (1 − hλ)² h_k + |Δθ_A + hλ θ_A|² at every step on every path;
    with λ = 0 that is h_k + |Δθ_A|² and h never decreases. To 1e-10 relative: not a round-off
    bound (round-off alone is ~roundoff(n_c) ≈ 1e-14): BatchNorm's eps makes the noise and the
    gradient orthogonal to θ_A only up to ~eps/Var (measured 3.4e-12)."""
    problem = build_problem("cnn", n=32, weight_decay=lam, batch_norm=True, bn_eps=1e-12)
    h = 0.05
    ds = fs.simulate(
        problem, fs.SGDNoise(lr=0.2, batch_size=4, paths=2), FusedEulerMaruyama(dt=h), t1=0.5, save_every=h,
        observe=("params",), seed=2, progress=False,
    )  # fmt: skip
    assert list(ds.step.values) == list(range(11))
    law_set = fs.laws.LawSet(fs.laws.detect(problem.model), problem.names, problem.shapes)
    scale = (ds.law == "scale").values
    theta = torch.as_tensor(ds.params.values)  # (time, path, P)
    orthogonal = theta[1:] - (1 - h * lam) * theta[:-1]  # Δθ + hλθ
    moved = law_set.value(orthogonal.reshape(-1, problem.n_params).T).T.reshape(10, 2, -1)[..., scale].numpy()
    value = ds.value.values[..., scale]
    error = np.abs((1 - h * lam) ** 2 * value[:-1] + moved - value[1:]) / value[1:]
    assert scale.sum() == 8 and error.max() < 1e-10
    if lam == 0:
        assert (np.diff(value, axis=0) > 0).all()


# ---------------------------------------------------------------------------------- integrators
def test_fused_and_torchsde_give_the_same_paths_and_replay():
    """The fused step (drift and noise in one backward pass of Σ_i a_i ℓ_i) and torchsde's
    (drift and noise apart, then θ + b h + G ΔW) are the same Euler–Maruyama steps summed in
    other orders. Per step they differ by the two gradients' rounding, roundoff(n_ops =
    sum_lengths, cond)·|Δθ| with cond = max(gradient_condition, √N) (the noise weights
    ΔW_i − mean ΔW have random signs: the sum over examples cancels like a random walk), and a
    few roundings of the update (4ε|θ|); with |Δθ| ≤ |θ| on these small steps and each error
    grown by at most (1 + h‖H‖) per later step: δ relative to |θ| after n steps. The recorded
    variables then move as `record_tolerances` allows (the modified drift's double backward
    doubles the lengths). A wrong weight (drift or noise) is off by O(h) ≥ 1e-3. Same paths,
    replayed or with more paths, are the same operations per path: equal bit for bit."""
    problem = build_problem("mlp", n=32)
    run = lambda integrator, paths=2, seed=5, **kw: fs.simulate(  # noqa: E731
        problem, fs.SGDNoise(lr=0.1, batch_size=4, paths=paths, **kw), integrator, t1=0.3, save_every=0.1, seed=seed,
        observe=("loss", "params"), progress=False,
    )  # fmt: skip
    fused, torchsde = run(FusedEulerMaruyama(0.05)), run(SDE("euler", 0.05))
    exact, steps, h = problem.to(dtype=torch.float64), 6, 0.05
    theta = torch.as_tensor(fused.params.values)  # (time, path, P)
    assert float((theta[1:] - theta[:-1]).norm(dim=-1).max()) < float(theta.norm(dim=-1).min())  # |Δθ| ≤ |θ|
    cond = max(gradient_condition(exact, theta[0, 0]), problem.n_examples**0.5)
    growth = (1 + h * 2 * hessian_norm(exact, theta[0, 0])) ** steps

    def tolerances(lengths):
        delta = steps * growth * (roundoff(n_ops=lengths, cond=cond) + roundoff(n_ops=4))
        return record_tolerances(exact, theta, delta * theta.norm(dim=-1))

    allowed = tolerances(sum_lengths(exact))
    for name in ("params", "value", "loss", "grad_sq"):
        worst = float((np.abs(fused[name].values - torchsde[name].values) / allowed[name].numpy()).max())
        assert worst < 1, (name, worst)
    assert list(fused.step.values) == [0, 2, 4, 6] and list(torchsde.nfe.values) == [0, 2, 4, 6]
    np.testing.assert_array_equal(run(FusedEulerMaruyama(0.05)).value.values, fused.value.values)  # replays
    three = run(FusedEulerMaruyama(0.05), paths=3)
    np.testing.assert_array_equal(three.value.values[:, :2], fused.value.values)  # path p is path p, whatever K
    assert not np.array_equal(run(FusedEulerMaruyama(0.05), seed=6).value.values, fused.value.values)
    modified = run(SDE("euler", 0.05), drift="modified")
    fused_modified = run(FusedEulerMaruyama(0.05), drift="modified")
    allowed = tolerances(2 * sum_lengths(exact))["value"].numpy()
    worst = float((np.abs(fused_modified.value.values - modified.value.values) / allowed).max())
    assert worst < 1, worst


# ---------------------------------------------------------------------------------- linear regression
N, S, LAM, T = 16, 4, 0.1, 1.0


def linear_regression():
    """y = Xw + b + noise, mse: ∇ℓ_i = Q_i θ − q_i with Q_i = 2 x̃_i x̃_iᵀ, q_i = 2 x̃_i y_i, x̃ = (x, 1)."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(N, 2, generator=generator, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5 + 0.5 * torch.randn(N, generator=generator, dtype=torch.float64)
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 1.0]]))
        model.bias.fill_(-1.0)
    problem = fs.Problem(model, (X, y), loss="mse", weight_decay=LAM)
    xa = np.c_[X.numpy(), np.ones(N)]
    return problem, 2 * np.einsum("ni,nj->nij", xa, xa), 2 * xa * y.numpy()[:, None]


def second_moments(z_flow: np.ndarray, z0: np.ndarray) -> np.ndarray:
    """Z(T) = E[z zᵀ] for z = (θ, 1) under vec(Z)' = Ω vec(Z)."""
    return (expm(z_flow * T) @ np.outer(z0, z0).reshape(-1)).reshape(len(z0), len(z0))


def sde_moment_flow(drift: np.ndarray, noises: list[np.ndarray]) -> np.ndarray:
    """Ω for dz = Ã z dt + Σ_j B̃_j z dW_j: Z' = Ã Z + Z Ãᵀ + Σ_j B̃_j Z B̃_jᵀ (Itô, linear SDE)."""
    eye = np.eye(len(drift))
    return np.kron(eye, drift) + np.kron(drift, eye) + sum(np.kron(b, b) for b in noises)


def hand_sde(eta: float, Q, q) -> np.ndarray:
    """Ω of the SGD-noise SDE with gradient drift, from the formulas: b = −H_λ θ + q̄,
    √η G e_j = s((Q_j − Q̄)θ − (q_j − q̄)), s = √(η c/(S N))."""
    p = Q.shape[1]
    drift = np.zeros((p + 1, p + 1))
    drift[:p, :p], drift[:p, p] = -(Q.mean(0) + LAM * np.eye(p)), q.mean(0)
    s = np.sqrt(eta * (N - S) / ((N - 1) * S * N))
    noises = []
    for j in range(N):
        b = np.zeros((p + 1, p + 1))
        b[:p, :p], b[:p, p] = s * (Q[j] - Q.mean(0)), -s * (q[j] - q.mean(0))
        noises.append(b)
    return sde_moment_flow(drift, noises)


def probed_sde(dynamics: fs.SGDNoise, problem: fs.Problem) -> np.ndarray:
    """Ω of SGDNoise's own drift and noise, read off by evaluating them (both are affine in θ)."""
    p = problem.n_params
    points = torch.cat([torch.zeros(1, p, dtype=torch.float64), torch.eye(p, dtype=torch.float64)])

    def affine(f) -> np.ndarray:
        values = torch.stack([f(x) for x in points]).numpy()
        m = np.zeros((p + 1, p + 1))
        m[:p, p], m[:p, :p] = values[0], (values[1:] - values[0]).T
        return m

    noises = [affine(lambda x, e=e: dynamics.diffusion(problem, x, e)) for e in torch.eye(N, dtype=torch.float64)]
    return sde_moment_flow(affine(lambda x: dynamics.drift_at(problem, x)), noises)


def sgd_moments(eta: float, Q, q, z0) -> np.ndarray:
    """Z after T/η steps of SGD whose batches are S distinct examples drawn independently each step:
    z ← C_B z with C_B = (1/S) Σ_{i∈B} C_i, so Z ← E[C_B Z C_Bᵀ] from the pair probabilities
    P(i ∈ B) = S/N and P(i, j ∈ B) = S(S−1)/(N(N−1))."""
    p = Q.shape[1]
    C = np.zeros((N, p + 1, p + 1))
    C[:, :p, :p], C[:, :p, p], C[:, p, p] = (1 - eta * LAM) * np.eye(p) - eta * Q, eta * q, 1.0
    total, Z = C.sum(0), np.outer(z0, z0)
    for _ in range(round(T / eta)):
        same = np.einsum("iab,bc,idc->ad", C, Z, C)
        Z = (S / N * same + S * (S - 1) / (N * (N - 1)) * (total @ Z @ total.T - same)) / S**2
    return Z


def test_euler_maruyama_has_weak_order_one_on_linear_regression():
    """Mean and second moment at T = 1 of 150 paths (η = 0.01) against the exact moments of the
    linear SDE: errors fall as dt¹ (slope 1 ± 0.25), each above 3 Monte-Carlo standard errors."""
    problem, Q, q = linear_regression()
    eta, paths = 0.01, 150
    z0 = np.r_[problem.initial_theta().numpy(), 1.0]
    Z = second_moments(hand_sde(eta, Q, q), z0)
    exact_mean, exact_second = Z[:3, 3], Z[:3, :3]
    dts, mean_errors, second_errors = [1 / 4, 1 / 8, 1 / 16], [], []
    for dt in dts:
        ds = fs.simulate(
            problem, fs.SGDNoise(lr=eta, batch_size=S, paths=paths), FusedEulerMaruyama(dt), t1=T, save_every=T,
            observe=("params",), seed=0, progress=False,
        )  # fmt: skip
        theta = ds.params.values[-1]  # (paths, 3)
        products = (theta[:, :, None] * theta[:, None, :]).reshape(paths, -1)
        mean_errors.append(np.abs(theta.mean(0) - exact_mean).max())
        second_errors.append(np.abs(products.mean(0) - exact_second.reshape(-1)).max())
        assert mean_errors[-1] > 3 * theta.std(0).max() / paths**0.5
        assert second_errors[-1] > 3 * products.std(0).max() / paths**0.5
    assert abs(slope(dts, mean_errors) - 1) < 0.25, mean_errors
    assert abs(slope(dts, second_errors) - 1) < 0.25, second_errors


def test_adaptive_torchsde_is_replayable_and_converges_on_linear_regression():
    """Step doubling to atol = rtol = 1e-3: the mean at T = 1 of 40 paths is within 5 Monte-Carlo
    standard errors (plus 1e-3) of the exact mean; the same seed gives the same run."""
    problem, Q, q = linear_regression()
    eta, paths = 0.01, 40
    z0 = np.r_[problem.initial_theta().numpy(), 1.0]
    exact_mean = second_moments(hand_sde(eta, Q, q), z0)[:3, 3]
    run = lambda: fs.simulate(  # noqa: E731
        problem, fs.SGDNoise(lr=eta, batch_size=S, paths=paths), SDE("euler", dt=0.1, adaptive=True, rtol=1e-3, atol=1e-3),
        t1=T, save_every=T / 2, observe=("params",), seed=0, progress=False,
    )  # fmt: skip
    ds = run()
    theta = ds.params.values[-1]
    assert (np.abs(theta.mean(0) - exact_mean) < 5 * theta.std(0) / paths**0.5 + 1e-3).all()
    assert ds.nfe.values[-1] > 3 * 10  # it refined the 0.1 steps
    np.testing.assert_array_equal(run().params.values, ds.params.values)


def test_sgd_moments_match_the_sde_to_first_and_second_order_in_eta():
    """Exact moments of SGD (independent batches) at T = 1 against the exact moments of SGDNoise's
    own SDE: error O(η) with the gradient drift, O(η²) with the modified drift."""
    problem, Q, q = linear_regression()
    z0 = np.r_[problem.initial_theta().numpy(), 1.0]
    np.testing.assert_allclose(probed_sde(fs.SGDNoise(lr=0.1, batch_size=S), problem), hand_sde(0.1, Q, q), atol=1e-12)
    etas = [0.1, 0.05, 0.025, 0.0125]
    errors = {"gradient": [], "modified": []}
    for eta in etas:
        sgd = sgd_moments(eta, Q, q, z0)
        for drift, err in errors.items():
            sde = second_moments(probed_sde(fs.SGDNoise(lr=eta, batch_size=S, drift=drift), problem), z0)
            err.append(np.abs(sde - sgd).max())  # mean (last column) and second moment at once
    assert abs(slope(etas, errors["gradient"]) - 1) < 0.3, errors
    assert abs(slope(etas, errors["modified"]) - 2) < 0.4, errors
    assert errors["modified"][-1] < 0.05 * errors["gradient"][-1]


def test_discrete_sgd_with_independent_batches_has_the_modelled_moments():
    """DiscreteSGD(sampling="independent") over 300 seeds agrees with the exact moment recursion
    the SDE is compared against (within 4 standard errors); epoch reshuffling has far less noise."""
    problem, Q, q = linear_regression()
    z0 = np.r_[problem.initial_theta().numpy(), 1.0]
    eta = 0.1
    exact = sgd_moments(eta, Q, q, z0)
    exact_cov = exact[:3, :3] - np.outer(exact[:3, 3], exact[:3, 3])

    def final(sampling: str, seeds: int) -> np.ndarray:
        dynamics = fs.DiscreteSGD(lr=eta, batch_size=S, sampling=sampling)
        out = []
        for seed in range(seeds):
            term = dynamics.term(problem, problem.initial_theta())
            state = term.init
            for k in range(round(T / eta)):
                state = term.step(state, k, seed).state
            out.append(state.theta.numpy())
        return np.array(out)

    seeds = 300
    theta = final("independent", seeds)
    assert (np.abs(theta.mean(0) - exact[:3, 3]) < 4 * theta.std(0) / seeds**0.5).all()
    cov = np.cov(theta.T, bias=True)
    assert (np.abs(cov - exact_cov) < 4 * np.sqrt((np.diag(exact_cov)[:, None] * np.diag(exact_cov)[None]) * 2 / seeds)).all()
    assert np.trace(np.cov(final("epoch", 100).T)) < 0.5 * np.trace(exact_cov)


def test_batches_drawn_independently_are_distinct_and_seeded():
    problem = build_problem("mlp", n=20)
    dynamics = fs.DiscreteSGD(lr=0.1, batch_size=6, sampling="independent")
    batches = [dynamics.batch(problem, k, seed=3) for k in range(4)]
    assert all(len(set(b.tolist())) == 6 for b in batches)
    assert torch.equal(dynamics.batch(problem, 2, seed=3), batches[2]) and not torch.equal(batches[0], batches[1])


# ---------------------------------------------------------------------------------- input and output
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: fs.SGDNoise(lr=0.1, batch_size=4, paths=0), "dynamics.paths"),
        (lambda: fs.SGDNoise(lr=0.1, batch_size=0), "dynamics.batch_size"),
        (lambda: fs.SGDNoise(lr=-0.1, batch_size=4), "dynamics.lr"),
        (lambda: fs.SGDNoise(lr=0.1, batch_size=4, drift="second"), "dynamics.drift"),
        (lambda: fs.SGDNoise(lr=0.1, batch_size=4, noise="full"), "dynamics.noise"),
        (lambda: fs.DiscreteSGD(lr=0.1, sampling="random"), "dynamics.sampling"),
        (lambda: FusedEulerMaruyama(dt=0.0), "integrator.dt"),
        (lambda: SDE("euler", dt=-1e-3), "integrator.dt"),
        (lambda: SDE("srk", dt=0.01), "srk.*takes only.*noise.*expected one of euler"),
        (lambda: SDE("midpoint", dt=0.01), "midpoint.*stratonovich SDEs"),
        (lambda: SDE("rk4", dt=0.01), "integrator.method.*torchsde's"),
    ],
)
def test_bad_input_is_refused(make, match):
    with pytest.raises(fs.ConfigError, match=match):
        make()


def test_bad_combinations_are_refused_before_any_work(tmp_path):
    problem = build_problem("mlp", n=16)
    out = tmp_path / "run.zarr"
    with pytest.raises(fs.ConfigError, match="dynamics.batch_size.*at most the 16 examples"):
        fs.simulate(problem, fs.SGDNoise(lr=0.1, batch_size=17), t1=1.0, save_every=0.1, out=out)
    with pytest.raises(fs.ConfigError, match="ODE integrates VectorField terms, but SGDNoise hands a Noise term"):
        fs.simulate(problem, fs.SGDNoise(lr=0.1, batch_size=4), ODE(), t1=1.0, save_every=0.1, out=out)
    with pytest.raises(fs.ConfigError, match="SDE integrates Noise terms, but GradientFlow hands a VectorField term"):
        fs.simulate(problem, fs.GradientFlow(), SDE("euler", 0.1), t1=1.0, save_every=0.1, out=out)
    assert not out.exists()


def test_config_runs_paths_to_zarr_and_the_cli_shows_their_band(tmp_path, capsys):
    from flowsim.cli import main

    config = tmp_path / "run.toml"
    config.write_text(
        '[model]\nname = "mlp.mlp"\nwidth = 4\n[data]\nname = "digits"\nn_train = 32\n'
        '[dynamics]\nname = "SGDNoise"\nlr = 0.1\nbatch_size = 4\npaths = 3\n'
        '[integrator]\nname = "SDE"\nmethod = "euler"\ndt = 0.05\n'
        f'[run]\nt1 = 0.2\nsave_every = 0.1\nout = "{tmp_path / "run.zarr"}"\n'
    )
    assert main(["run", str(config), "--no-progress"]) == 0
    ds = fs.open_record(tmp_path / "run.zarr")
    assert ds.value.dims == ("time", "path", "quantity") and ds.loss.dims == ("time", "path") and ds.nfe.dims == ("time",)
    assert list(ds.path.values) == [0, 1, 2] and ds.paths == 3 and ds.drift == "gradient"
    band = ds.flowsim.band("loss")
    assert float(band["std"][0]) == 0 and float(band["std"][-1]) > 0  # same start, then apart
    assert main(["info", str(tmp_path / "run.zarr")]) == 0
    printed = capsys.readouterr().out
    assert "paths       3" in printed and "±" in printed
    assert main(["plot", str(tmp_path / "run.zarr"), "-o", str(tmp_path / "run.png")]) == 0
    assert (tmp_path / "run.png").stat().st_size > 0
