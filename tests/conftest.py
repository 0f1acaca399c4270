"""Shared fixtures: small problems on real digits, built fresh for every test."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import flowsim as fs
from flowsim import data, models


def build_problem(model_name: str = "mlp", n: int = 64, weight_decay: float = 0.0, seed: int = 0, **model_args) -> fs.Problem:
    """A zoo model on `n` digits, its parameters drawn from `seed`."""
    X, y = data.digits(n_train=n, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_name == "mlp":
            model = models.mlp.mlp(**{"depth": 2, "width": 8, **model_args})
        else:
            model = models.cnn.vgg(**{"depth": 2, "width": 4, **model_args})
    return fs.Problem(model, (X, y), weight_decay=weight_decay)


def slope(x, y) -> float:
    """The least-squares slope of log y against log x: a measured order of convergence."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def relative(a, b) -> float:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def roundoff(dtype=torch.float64, n_ops: float = 1, cond: float = 1.0) -> float:
    """A bound on how far two evaluations of one quantity in different summation orders (another
    BLAS kernel, vector width, thread split or CPU) can be apart, relative to the quantity:
    ``n_ops · cond · ε``, with ε = ``torch.finfo(dtype).eps`` = 2u (u the unit round-off).

    Higham (Accuracy and Stability, §3.1): a sum of n terms in any order is within
    γ_n·Σ|terms| of the exact sum, γ_n = nu/(1 − nu); two orders are within 2γ_n·Σ|terms| =
    nε/(1 − nu)·Σ|terms| of each other, i.e. n·cond·ε relative to |Σ| with cond = Σ|terms|/|Σ|
    (1 for terms of one sign; large where they cancel). Errors made at each of n steps add up
    (at worst linearly), so they go into `n_ops` too. Never fitted to a measured round-off: a
    test states what n_ops and cond count, and what a real bug would give instead."""
    eps = torch.finfo(dtype).eps
    return n_ops * cond * eps / (1 - n_ops * eps / 2)


def sum_lengths(problem: fs.Problem) -> int:
    """roundoff's n_ops for a loss and its gradient: the lengths of the sums along the network,
    each rounding once per term. Per layer the forward contraction (a Linear's in_features, a
    convolution's in_channels·kernel) and the backward one (out_features, out_channels·kernel),
    plus the weight gradients' sum over the N examples (a convolution's also over the ≤ H·W
    positions of each) and the loss's mean over them. Any other layer with parameters or an
    attention (normalisations, embeddings, q kᵀ and softmax·v) sums over no more than an
    example's size (d_model·length), forward and backward: twice that, and N for its weights."""
    size = int(problem.X[0].numel())
    positions = int(np.prod(problem.X.shape[2:])) if problem.X.dim() > 2 else 1
    total = problem.n_examples
    for module in problem.model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.in_features + module.out_features + problem.n_examples
        elif isinstance(module, torch.nn.Conv2d):
            kernel = int(np.prod(module.kernel_size))
            total += (module.in_channels + module.out_channels) * kernel + problem.n_examples * positions
        elif "attention" in type(module).__name__.lower() or any(True for _ in module.parameters(recurse=False)):
            total += 2 * size + problem.n_examples
    return total


def orthogonality_bound(problem: fs.Problem, theta: torch.Tensor) -> float:
    """How far from 0 round-off leaves gradient_check's |⟨∇Q, ∇L⟩| / (|∇Q| |∇L|) for an exact
    law: the computed gradient is off by δg ≤ roundoff(sum_lengths, gradient_condition)·|g|,
    which moves the cosine by ≤ |δg|/|g| (Cauchy–Schwarz); the inner product's P terms add
    roundoff(P) (Σ|q_i g_i| ≤ |q||g|: cond ≤ 1) and ∇Q's entries (2θ_i, θ_j) one rounding.
    A law that is not one (a broken symmetry) has a cosine of 1e-3 … 1."""
    return roundoff(n_ops=sum_lengths(problem), cond=gradient_condition(problem, theta)) + roundoff(n_ops=problem.n_params + 1)


def gradient_condition(problem: fs.Problem, theta: torch.Tensor) -> float:
    """How much the mean over the examples cancels in the gradient: |Σ_i |∇ℓ_i|| / |Σ_i ∇ℓ_i|
    (per-example gradients, one example at a time; with BatchNorm, which normalises a lone
    example by its own statistics, an estimate only). roundoff's cond for a gradient."""
    grads = torch.stack([problem.loss_and_grad(theta, torch.tensor([i]))[1] for i in range(problem.n_examples)])
    return float(grads.abs().sum(0).norm() / grads.sum(0).norm())


def hessian_norm(problem: fs.Problem, theta: torch.Tensor, iterations: int = 30) -> float:
    """‖∇²L(θ)‖₂ by power iteration on Hessian-vector products (from below: callers double it)."""
    v = torch.randn(theta.shape, dtype=theta.dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(iterations):
        v = problem.hvp(theta, v / v.norm())
    return float(v.norm())


def record_tolerances(problem: fs.Problem, theta: torch.Tensor, d_theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far what a record computes from θ may move when θ moves by at most `d_theta` (2-norm;
    θ (…, P) as recorded, `d_theta` (…)): the recorder runs the same code on both, so each
    variable moves with θ to first order, plus its own rounding:

    - g = ∇L(θ): |Δg| ≤ ‖H‖·|Δθ| (‖H‖ by power iteration, doubled), plus
      roundoff(sum_lengths, gradient_condition)·|g| of rounding on each side;
    - a law form Q_c (n_c terms, magnitude M_c; at most quadratic, coefficients ±1) of θ
      (``value``) or of g (``grad_sq``): |ΔQ_c| ≤ |∇Q_c|·|Δv| + |Δv|² + roundoff(n_c)·M_c;
    - loss: |ΔL| ≤ |∇L_λ|·|Δθ| + roundoff(sum_lengths)·L (its forward sums and a mean of N
      positive terms);
    - grad_norm = |g_λ|: moves by ≤ |Δg| + λ|Δθ|.

    Returns allowed |differences| for params, value, grad_sq, loss and grad_norm, shaped as recorded."""
    problem = problem.to(dtype=torch.float64)
    lead, flat = theta.shape[:-1], theta.reshape(-1, theta.shape[-1]).double()
    d_flat = d_theta.reshape(-1).double()
    lam, lengths = problem.weight_decay, sum_lengths(problem)
    evaluated = [problem.loss_and_grad(th) for th in flat]
    loss, g = torch.stack([e[0] for e in evaluated]), torch.stack([e[1] for e in evaluated])
    hessian = torch.tensor([2 * hessian_norm(problem, th) for th in flat], dtype=torch.float64)
    condition = torch.tensor([gradient_condition(problem, th) for th in flat], dtype=torch.float64)
    d_g = hessian * d_flat + 2 * roundoff(n_ops=lengths) * condition * g.norm(dim=1)
    law_set = fs.laws.LawSet(fs.laws.detect(problem.model), problem.names, problem.shapes)
    terms = (law_set.jacobian(torch.ones_like(flat[0])) != 0).sum(1)  # n_c

    def form(vectors: torch.Tensor, d_vectors: torch.Tensor) -> torch.Tensor:
        rows = [
            law_set.jacobian(v).norm(dim=1) * d + d**2 + roundoff(n_ops=terms) * law_set.magnitude(v)
            for v, d in zip(vectors, d_vectors)
        ]
        return torch.stack(rows).reshape(*lead, -1)

    return {
        "params": d_flat.reshape(*lead, 1),
        "value": form(flat, d_flat),
        "grad_sq": form(g, d_g),
        "loss": ((g + lam * flat).norm(dim=1) * d_flat + roundoff(n_ops=lengths) * loss).reshape(lead),
        "grad_norm": (d_g + lam * d_flat).reshape(lead),
    }


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test problem is tiny: one torch thread is faster than two, and many times faster
    when the cores are shared (a second OpenMP thread only spins). FLOWSIM_TEST_THREADS=n runs
    the suite on n threads instead: the BLAS then splits its sums otherwise, as another machine
    would (a check that the round-off bounds hold there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FLOWSIM_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


def checked_laws(model: torch.nn.Module, X: torch.Tensor, loss: str = "cross_entropy", derived: bool = False) -> list:
    """The laws detected on a float64 copy of `model`, each exact one orthogonal to the gradient
    flowsim integrates at a random θ: ≤ 1e-10 relative (the issue's bound), or, with `derived`,
    ≤ orthogonality_bound (round-off of this problem); a false law gives 1e-3 … 1."""
    from flowsim.laws import gradient_check

    torch.manual_seed(0)
    model, X = model.double(), X.double()
    with torch.no_grad():
        out = model(X)
    y = torch.randint(out.shape[-1], (len(X),)) if loss == "cross_entropy" else torch.randn_like(out)
    problem = fs.Problem(model, (X, y), loss=loss)
    laws = fs.laws.detect(model, loss=loss, inputs=X)
    exact = [law for law in laws if law.exact]
    theta = torch.randn(problem.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    worst = gradient_check(exact, problem, theta)
    bound = orthogonality_bound(problem, theta) if derived else 1e-10
    assert float(worst.max()) <= bound, [(law.kind, law.site) for law in exact]
    return laws
