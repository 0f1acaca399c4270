"""The central flow of full-batch gradient descent at the edge of stability.

Cohen, Damian, Talwalkar, Kolter & Lee, "Understanding Optimization in Deep Learning with Central
Flows", ICLR 2025 (code: github.com/locuslab/central_flows; JAX port
github.com/alex-damian/central_flows_jax, ``flows.central_flow_substep``, read for this module).

GD with step η oscillates along the top Hessian eigenvectors once the sharpness reaches 2/η
(Cohen et al., ICLR 2021). The central flow follows GD's time-averaged iterate θ, with Σ the
covariance of the oscillation around it. In flowsim's time t = k·η and with g = ∇L_λ:

    θ' = −(g + ½ ∇³L(θ)[Σ]),    Σ = U S Uᵀ,  S ⪰ 0  (k × k),

U the top k eigenvectors of H_λ = ∇²L + λI (eigenvalues λ_1 ≥ … ≥ λ_k). S solves the
semidefinite complementarity problem (SDCP) that keeps those eigenvalues at or below 2/η:

    S ⪰ 0,   Y = A/τ + dA/dt ⪰ 0,   ⟨S, Y⟩ = 0,       A = 2/η − Uᵀ H_λ U = diag(2/η − λ_i),
    dA/dt = −Uᵀ (dH/dt) U,   (dH/dt)[u_i, u_j] = ∇³L[u_i, u_j, θ'],

so Y = Q + M[S] with Q_ij = A_ij/τ + ⟨d_ij, g⟩ and M[S]_ij = ½⟨d_ij, Σ_kl S_kl d_kl⟩, where
d_ij = ∇³L[u_i, u_j, ·] = ∇_θ(u_iᵀ H u_j) (one backward pass through H u_j each). M is positive
semidefinite (⟨S, M S⟩ = ½|∇³L[Σ]|²), so S minimises ½⟨S, M S⟩ + ⟨Q, S⟩ over S ⪰ 0; that
convex program is solved here (``solve_sdcp``). Below the edge Q ⪰ 0, S = 0 and the central
flow is gradient flow exactly (the same ``loss_and_grad``, so to the bit).

GD's time averages it predicts (second-order Taylor expansion around θ, E[δ] = 0, E[δδᵀ] = Σ):
loss L(θ) + ½⟨∇²L, Σ⟩ = L(θ) + ½ Σ_i λ_i^L S_ii (λ^L of the data loss; ≈ L + tr(Σ)/η at the
edge), squared gradient norm |θ'|² + Σ_i λ_i² S_ii.

**Where this differs from the paper and its code, and why**

- *Relaxation τ.* The paper's condition is the limit τ → 0 at A = 0: the eigenvalues at the
  edge have dA/dt ⪰ 0 ⊥ S. An ODE integrator does not keep A exactly at 0, so here A/τ enters
  the complementarity (Baumgarte stabilisation): an eigenvalue that overshoots 2/η is pulled
  back, and one approaching it from below with a rate faster than A/τ is caught early and
  approaches 2/η like e^{−t/τ}. The JAX port does the same in discrete time: it asks the
  eigenvalues after its Euler sub-step dt = η/4 to be at most 2/η (A + dt·dA/dt ⪰ 0), i.e.
  τ = η/4. Default here τ = η (``relaxation=1``): the fastest rate is then 1/η, no stiffer
  than gradient flow at the edge (rate 2/η). On the edge (A = 0) the flows are the same.
- *Full contraction of Σ.* ∇³L[Σ] = Σ_{i,j} S_ij d_ij counts each off-diagonal pair twice.
  The JAX port's pair bookkeeping (``apply_to_pairs`` over i ≤ j, ``mat_to_upper``'s √2)
  weighs off-diagonal pairs by √2, as I read it; the two agree for one direction at the edge.
- *The SDCP solver.* The port solves the same convex program with CVXPY/CVXOPT; flowsim has
  no conic solver, so ``solve_sdcp`` uses accelerated projected gradient on the PSD cone,
  then solves the face it identifies exactly and checks the complementarity conditions.
- *Eigenvectors.* Top-k eigenpairs of the data-loss Hessian by ``flowsim.spectrum`` (Lanczos,
  warm-started from the previous evaluation's subspace), where the port uses LOBPCG.
- *k is fixed.* k eigen-directions can be at the edge (the port: the columns of its reference
  subspace). The next eigenvalue (a guard Ritz value, a lower bound of λ_{k+1}) is watched: if
  it passes 2/η the flow would no longer be central, and ``derivative`` raises
  IntegrationError naming a larger k (``simulate`` then records status "diverged").
- Only GD: the paper's RMSProp and the heavy-ball flows have a state-dependent preconditioner P
  (A = 2P − H); this class is the case P = I/η and would take P as another term.

What it carries from one evaluation to the next (the eigen-solver's subspace, the last S: its
warm starts) is the term's memory (``EdgeMemory``), one per run: a checkpoint keeps it, so a
resumed run equals the uninterrupted one bit for bit. At each save point the record gets the
predictions above as variables (``predicted_loss``, ``predicted_grad_sq``, ``sigma_trace``),
evaluated from a copy of that memory so that recording never changes the run.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, IntegrationError, check_field
from ..problem import Problem
from ..spectrum import HessianOperator, top_eigenpairs
from ..terms import VectorField
from .base import ContinuousDynamics


class EdgeState(NamedTuple):
    """What the central flow computes at one θ (``CentralFlow.edge``).

    - `loss`: L(θ), the data loss; `grad`: g = ∇L_λ(θ);
    - `eigenvalues`: (k,) the top eigenvalues of the data-loss Hessian ∇²L; `vectors`: (P, k);
    - `sigma`: S (k, k), Σ = U S Uᵀ; `velocity`: θ' = −(g + ½∇³L[Σ]);
    - `predicted_loss`: L + ½ Σ_i λ_i S_ii; `predicted_grad_norm_sq`: |θ'|² + Σ_i (λ_i + λ)² S_ii;
    - `matvecs`: Hessian-vector products the eigen-solver took.
    """

    loss: Tensor
    grad: Tensor
    eigenvalues: Tensor
    vectors: Tensor
    sigma: Tensor
    velocity: Tensor
    predicted_loss: Tensor
    predicted_grad_norm_sq: Tensor
    matvecs: int

    @property
    def sigma_trace(self) -> Tensor:
        """tr Σ = tr S (U has orthonormal columns)."""
        return self.sigma.trace()


@dataclass(frozen=True)
class CentralFlow(ContinuousDynamics):
    """The central flow of full-batch GD with learning rate η (module docstring: equations,
    and where this differs from Cohen, Damian et al., ICLR 2025):

        θ' = −(∇L_λ + ½ ∇³L[Σ]),  Σ = U S Uᵀ from the SDCP that holds the top eigenvalues ≤ 2/η.

    **Main arguments**

    - `lr`: η of the GD it follows.
    - `k`: how many top eigen-directions may sit at the edge (cost: k(k+1)/2 third-derivative
      vectors per evaluation, plus the eigen-solver's products).

    **Other arguments**

    - `relaxation`: τ/η, the time over which an eigenvalue that passes 2/η is pulled back.
    - `tol`: the eigen-solver's residual tolerance, relative to |λ|.

    Per evaluation: the loss and gradient with their graph (the Hessian graph), the
    eigen-solver's Hessian-vector products (warm-started from the previous evaluation), k double
    backward passes with graph and k(k+1)/2 backward passes through them; below the edge one
    more gradient, gradient flow's own (so that there it is gradient flow to the bit).
    """

    lr: float
    k: int = 2
    relaxation: float = 1.0
    tol: float = 1e-8

    def __post_init__(self) -> None:
        check_field(self, "dynamics", "lr", minimum=0.0, exclusive_minimum=True)
        check_field(self, "dynamics", "k", integer=True, minimum=1)
        check_field(self, "dynamics", "relaxation", minimum=0.0, exclusive_minimum=True)
        check_field(self, "dynamics", "tol", minimum=0.0, exclusive_minimum=True, maximum=1e-2)

    def coords(self) -> dict[str, float | int]:
        return {"lr": self.lr}

    def check(self, problem: Problem) -> None:
        if problem.n_params < self.k + 2:
            raise ConfigError(
                f"dynamics.k: got {self.k}; expected at most P − 2 = {problem.n_params - 2} (the model's parameters)"
            )

    @property
    def edge_value(self) -> float:
        """2/η: where GD's sharpness stops rising."""
        return 2.0 / self.lr

    def term(self, problem: Problem, theta0: Tensor) -> VectorField:
        """θ' = −(g + ½∇³L[Σ]) from θ0, warm-started from its own ``EdgeMemory``; at a save point
        it observes GD's predicted averages (``EdgeState``) from a copy of that memory."""
        memory = EdgeMemory()

        def observe(theta: Tensor) -> dict[str, Tensor]:
            state = self.edge(problem, theta, copy.copy(memory))
            return {
                "predicted_loss": state.predicted_loss,
                "predicted_grad_sq": state.predicted_grad_norm_sq,
                "sigma_trace": state.sigma_trace,
            }

        return VectorField(
            f=lambda t, y: self.edge(problem, y, memory).velocity,
            y0=theta0.clone(),
            split=functools.partial(self.split, problem),
            members=problem.members,
            error_norm=problem.error_norm,
            memory=memory,
            observe=observe,
        )

    def derivative(self, problem: Problem, t: Tensor, y: Tensor) -> Tensor:
        """θ' = −(g + ½∇³L[Σ]), from a cold start."""
        return self.edge(problem, y).velocity

    def predicted_loss(self, problem: Problem, theta: Tensor) -> Tensor:
        """GD's time-averaged loss as the central flow predicts it: L(θ) + ½⟨∇²L, Σ⟩."""
        return self.edge(problem, theta).predicted_loss

    def sigma_trace(self, problem: Problem, theta: Tensor) -> Tensor:
        """tr Σ(θ), the variance of GD's oscillation around θ."""
        return self.edge(problem, theta).sigma_trace

    def edge(self, problem: Problem, theta: Tensor, memory: EdgeMemory | None = None) -> EdgeState:
        """Everything the central flow computes at θ (P,): EdgeState, warm-started from `memory`
        and leaving its own solution there (None: a cold start). `problem` is a Problem, or any
        object with its ``loss_and_grad``, ``per_example_losses`` and ``weight_decay``."""
        if theta.ndim != 1:
            raise ConfigError(f"dynamics: CentralFlow runs one θ of shape (P,); got {tuple(theta.shape)} (no ensembles or paths)")
        lam = problem.weight_decay
        memory = EdgeMemory() if memory is None else memory
        hessian = HessianOperator(problem, theta)  # L and ∇L with their graph, for the Hessian products
        loss = hessian.loss.detach()
        g = hessian.grad.detach().add(theta, alpha=lam) if lam else hessian.grad.detach()
        eig = top_eigenpairs(hessian, self._start(theta, memory), self.k, tol=self.tol)
        memory.subspace = eig.subspace
        values, u = eig.values, eig.vectors
        guards = eig.guard_values
        if len(guards) and float(guards[0]) + lam > self.edge_value:
            raise IntegrationError(
                f"CentralFlow(k={self.k}): a {self.k + 1}-th Hessian eigenvalue ({float(guards[0]) + lam:.6g}) passed "
                f"2/η = {self.edge_value:.6g}; the flow needs more directions at the edge (k={self.k + 1} or more)"
            )
        headroom = self.edge_value - (values + lam)  # A = diag(2/η − λ_i)
        d = hessian.third(u)  # (n, P), pairs i ≤ j
        rows, columns, weights = (torch.as_tensor(a, device=theta.device) for a in _triu(self.k))
        q = _symmetric(d @ g, rows, columns, self.k) + torch.diag(headroom / (self.relaxation * self.lr))
        if float(torch.linalg.eigvalsh(q)[0]) >= 0:  # below the edge: S = 0, gradient flow's own evaluation, to the bit
            loss, grad = problem.loss_and_grad(theta)
            g = grad.add(theta, alpha=lam) if lam else grad
            sigma, velocity = torch.zeros_like(q), g.neg()
        else:
            f = d * weights.to(d)[:, None]  # svec: ∇³L[Σ] = Σ_ij S_ij d_ij = Fᵀ svec(S), f_(ij) = c_ij d_ij
            x = solve_sdcp(_svec_np(q.cpu().numpy()), 0.5 * (f @ f.T).cpu().numpy(), _previous_x(memory, u))
            sigma = torch.as_tensor(_smat(x, self.k), dtype=theta.dtype, device=theta.device)
            velocity = (g + 0.5 * (f.T @ torch.as_tensor(x, dtype=theta.dtype, device=theta.device))).neg_()
            memory.sigma, memory.vectors = sigma, u
        diagonal = sigma.diagonal()
        predicted_loss = loss + 0.5 * (values * diagonal).sum()
        predicted_grad = velocity.square().sum() + ((values + lam).square() * diagonal).sum()
        return EdgeState(loss, g, values, u, sigma, velocity, predicted_loss, predicted_grad, eig.matvecs)

    def _start(self, theta: Tensor, memory: EdgeMemory) -> Tensor:
        """The eigen-solver's start: the last evaluation's subspace, or k + 1 seeded random vectors
        (the last one a guard: its Ritz value bounds λ_{k+1} from below)."""
        previous = memory.subspace
        if previous is not None and previous.shape[0] == theta.numel() and previous.dtype == theta.dtype:
            return previous.to(theta.device)
        generator = torch.Generator().manual_seed(0)
        return torch.randn(theta.numel(), self.k + 1, generator=generator, dtype=theta.dtype).to(theta.device)


class EdgeMemory:
    """What the central flow carries from one evaluation to the next (a ``terms.Memory``): the
    eigen-solver's last subspace (P, k + 1) and the last S with its eigenvectors U (the SDCP's
    warm start). Each evaluation replaces them; none is changed in place."""

    def __init__(self) -> None:
        self.subspace: Tensor | None = None
        self.sigma: Tensor | None = None
        self.vectors: Tensor | None = None

    def state(self) -> dict[str, Tensor | None]:
        return {"subspace": self.subspace, "sigma": self.sigma, "vectors": self.vectors}

    def restore(self, state: dict[str, Tensor | None]) -> None:
        self.subspace, self.sigma, self.vectors = state["subspace"], state["sigma"], state["vectors"]


def _previous_x(memory: EdgeMemory, u: Tensor) -> np.ndarray | None:
    """The last S turned into the new eigenvector basis (UᵀU_old S U_oldᵀU), as svec: the SDCP's warm start."""
    if memory.sigma is None or memory.vectors.shape != u.shape:
        return None
    overlap = u.T @ memory.vectors
    return _svec_np((overlap @ memory.sigma @ overlap.T).cpu().numpy())


def _symmetric(values: Tensor, i: Tensor, j: Tensor, k: int) -> Tensor:
    """The symmetric k × k matrix with entries `values` at (i, j) and (j, i)."""
    out = values.new_zeros(k, k)
    out[i, j] = values
    out[j, i] = values
    return out


@functools.lru_cache(maxsize=16)
def _triu(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangle indices (i, j) of a k × k matrix and svec's weights (1, or √2 off the diagonal)."""
    i, j = np.triu_indices(k)
    return i, j, np.where(i == j, 1.0, math.sqrt(2.0))


def _smat(x: np.ndarray, k: int) -> np.ndarray:
    """svec⁻¹: the symmetric k × k matrix of x."""
    i, j, weights = _triu(k)
    out = np.empty((k, k))
    out[i, j] = out[j, i] = x / weights
    return out


def _svec_np(matrix: np.ndarray) -> np.ndarray:
    i, j, weights = _triu(len(matrix))
    return matrix[i, j] * weights


def _psd_part(x: np.ndarray, k: int) -> np.ndarray:
    """svec of the projection of smat(x) onto the PSD cone (negative eigenvalues set to 0)."""
    w, v = np.linalg.eigh(_smat(x, k))
    return _svec_np((v * np.maximum(w, 0.0)) @ v.T)


def solve_sdcp(a: np.ndarray, b: np.ndarray, x0: np.ndarray | None = None) -> np.ndarray:
    """x = svec(S) with S ⪰ 0, Y = smat(a + b x) ⪰ 0 and ⟨S, Y⟩ = 0, for `b` (n × n) positive
    semidefinite, n = k(k+1)/2: the minimiser of ½ xᵀ b x + aᵀx over S ⪰ 0.

    Those conditions are the fixed point x = Π(x − (a + b x)), Π the projection onto the PSD
    cone; semismooth Newton on it (``_newton``) converges quadratically from a start near the
    solution: `x0` (the last solution), else the log-barrier path (``_barrier``) followed until
    Newton lands. A solution is accepted when it meets the fixed point to round-off. One
    direction (k = 1) is S = −Q/M. Raises IntegrationError where no solution exists (the
    objective is unbounded below: a direction S ⪰ 0 that lowers Q without moving the Hessian)
    or where none was found (ill-conditioned M)."""
    n = len(a)
    k = int(round((math.sqrt(8 * n + 1) - 1) / 2))
    if np.linalg.eigvalsh(_smat(a, k))[0] >= 0:
        return np.zeros(n)
    if n == 1:  # one direction: S = −Q/M where Q < 0
        if b[0, 0] <= 0.0:
            raise IntegrationError(
                "CentralFlow: the third derivative vanishes along the eigenvector at the edge; no Σ holds it there"
            )
        return -a / b[0, 0]
    scale = float(np.linalg.norm(a))
    for start in itertools.chain([] if x0 is None else [x0], _barrier(a, b, k, scale)):
        x = _newton(a, b, start, k, scale)
        if x is not None:
            return x
    raise IntegrationError("CentralFlow: the SDCP for Σ was not solved to round-off (ill-conditioned third derivatives)")


def _projection_jacobian(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Π(z), ∂Π(z)) for the PSD projection in svec coordinates: with smat(z) = Q Λ Qᵀ,
    ∂Π[H] = Q (Ω ∘ QᵀHQ) Qᵀ, Ω_ij = (λ_i⁺ − λ_j⁺)/(λ_i − λ_j) (1 where both are positive, 0
    where neither is): an element of Clarke's generalised Jacobian (Sun & Sun 2002)."""
    w, q = np.linalg.eigh(_smat(z, k))
    positive = np.maximum(w, 0.0)
    difference = w[:, None] - w[None, :]
    same = np.abs(difference) <= 1e-300
    omega = np.where(
        same, (w[:, None] > 0).astype(float), (positive[:, None] - positive[None, :]) / np.where(same, 1.0, difference)
    )
    columns = [_svec_np(q @ (omega * (q.T @ _smat(e, k) @ q)) @ q.T) for e in np.eye(len(z))]
    return _svec_np((q * positive) @ q.T), np.stack(columns, 1)


def _newton(a: np.ndarray, b: np.ndarray, x: np.ndarray, k: int, scale: float) -> np.ndarray | None:
    """Semismooth Newton on F(x) = x − Π(x − a − b x) = 0 from `x`; the solution Π(x − a − b x)
    once |F| is at round-off (1e3·ε of the problem's scale), or None after 30 steps."""
    n = len(a)
    for _ in range(30):
        projected, jacobian = _projection_jacobian(x - a - b @ x, k)
        residual = x - projected
        if np.linalg.norm(residual) <= 1e3 * np.finfo(float).eps * (scale / np.linalg.norm(b) + np.linalg.norm(x)):
            return projected
        step = np.linalg.lstsq(np.eye(n) - jacobian @ (np.eye(n) - b), -residual, rcond=None)[0]
        x = x + step
        if not np.isfinite(x).all():
            return None
    return None


def _barrier(a: np.ndarray, b: np.ndarray, k: int, scale: float) -> Iterator[np.ndarray]:
    """The log-barrier path x(μ) = argmin ½ xᵀbx + aᵀx − μ log det smat(x), followed by damped
    Newton steps from S = s·I while μ falls by 20 per round; x(μ) after each round once kμ (the
    gap of x(μ) to the optimal value) is below 1e-6 of the objective's scale, down to 1e-13.
    The Newton system is scaled by S^½ (Δ = S^½ Δ̃ S^½), where the barrier's Hessian is μ·I, so
    it stays well conditioned as eigenvalues of S go to 0; a step goes at most 0.99 of the way
    to the boundary, then backtracks (Armijo)."""
    n = len(a)
    norm_b = float(np.linalg.eigvalsh(b)[-1])
    if norm_b <= 0.0:
        raise IntegrationError(
            "CentralFlow: the third derivative vanishes along the eigenvectors at the edge; no Σ holds them there"
        )
    size = scale / norm_b
    x = _svec_np(size * np.eye(k))
    mu = scale * size
    basis = [_smat(e, k) for e in np.eye(n)]

    def objective(z: np.ndarray) -> float:
        if not np.isfinite(z).all():
            return math.inf
        eigenvalues = np.linalg.eigvalsh(_smat(z, k))
        return 0.5 * z @ b @ z + a @ z - mu * np.log(eigenvalues).sum() if eigenvalues[0] > 0 else math.inf

    for _ in range(200):
        gap = mu * k / (scale * size + 0.5 * x @ b @ x)
        if gap <= 1e-6:
            yield x
            if gap <= 1e-13:
                return
        for _ in range(50):
            w, v = np.linalg.eigh(_smat(x, k))
            if w[0] <= 0:  # an eigenvalue of S at round-off: as far as the path goes
                yield x
                return
            root = (v * np.sqrt(w)) @ v.T
            scaling = np.stack([_svec_np(root @ e @ root) for e in basis], 1)  # svec Δ̃ ↦ svec(S^½ Δ̃ S^½)
            gradient = scaling.T @ (b @ x + a - mu * _svec_np((v / w) @ v.T))
            scaled = np.linalg.solve(scaling.T @ b @ scaling + mu * np.eye(n), -gradient)
            decrement = -gradient @ scaled  # the Newton decrement², scale-free
            if decrement < 1e-9 * mu:
                break
            # the longest step that keeps S ≻ 0: S + tΔ = S^½(I + tΔ̃)S^½, at most 0.99 of the way to the boundary
            lowest = float(np.linalg.eigvalsh(_smat(scaled, k))[0])
            t, value = (1.0 if lowest > -1.0 else -0.99 / lowest), objective(x)
            step = scaling @ scaled
            while not objective(x + t * step) <= value - 0.25 * t * decrement:  # NaN: shorter
                t *= 0.5
                if t < 1e-12:  # no descent left at this μ (round-off)
                    break
            else:
                x = x + t * step
                continue
            break
        if not np.isfinite(x).all() or np.linalg.norm(x) > 1e12 * size:
            raise IntegrationError("CentralFlow: the SDCP for Σ has no solution (its objective is unbounded below)")
        mu *= 0.05
