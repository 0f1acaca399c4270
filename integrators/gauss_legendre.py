"""Gauss–Legendre collocation: implicit Runge–Kutta methods that keep every quadratic law.

The s-stage Gauss–Legendre method (order 2s; s = 1 is the implicit midpoint rule) advances
y' = f(t, y) by h from (t_0, y_0) through stage derivatives K_1 … K_s that solve

    K_i = f(t_0 + c_i h, Y_i),   Y_i = y_0 + h Σ_j a_ij K_j,      y_1 = y_0 + h Σ_i b_i K_i,

c_i the Gauss nodes on [0, 1] (Butcher 1964; Hairer, Nørsett & Wanner I, §II.7). Its
coefficients satisfy b_i a_ij + b_j a_ji = b_i b_j, so for every quadratic Q(y) = yᵀSy + dᵀy

    Q(y_1) − Q(y_0) = h Σ_i b_i ∇Q(Y_i) · K_i                                     (*)

exactly (Cooper 1987; Hairer, Lubich & Wanner, Geometric Numerical Integration, IV.2): the
Gauss quadrature of Q' along the collocation polynomial. A law (∇Q · f = 0 everywhere) is
kept at any step size; a quadratic whose rate has no gradient in it (weight decay,
Q' = −2λQ; MomentumFlow's θᵀSθ and θᵀSv) changes by the quadrature of that rate at the stages.

**The stage equations** (``Collocation.solve``):

1. fixed-point sweeps K ← F(K), one evaluation of f per stage, from the previous step's
   collocation polynomial extrapolated (f(t_0, y_0) on the first step). On a ``Semilinear``
   term (y' = (M ⊗ I)y + N) the linear part is implicit in every sweep,
   (I − h A ⊗ M) K ← 1 ⊗ M y_0 + N(Y), so M's stiffness (MomentumFlow's damping) costs nothing;
2. where they stop contracting (or would need more than `max_iterations` sweeps) and f has
   kinks (ReLU, max-pool: f jumps, and the equations may have no solution), the same sweeps on
   the smooth piece of f through the best iterate (its kink branches recorded and replayed,
   flowsim.kinks; every piece keeps the laws, so (*) holds on it);
3. then Newton–Krylov on G(K) = K − F(K): each correction by GMRES on
   (I − h diag(J_i)(A ⊗ I)) V = −G, halved until |G| decreases, with J_i v = ∂f/∂y(Y_i) v the
   term's ``jvp`` (GradientFlow: −(H + λ)v) or the difference (f(Y_i + δv) − f(Y_i))/δ,
   δ = √ε (1 + |Y_i|)/|v|, one evaluation of f (``jvp="difference"``, or where it has none).

They have converged when the relative increment |ΔK|/|K| is at most `tol` (default 100ε:
round-off), or stops decreasing below max(tol, ε^{2/3}), the round-off floor of f (Hairer,
Lubich & Wanner VIII.6). The last sweep's K is used, each K_i = f at a point: by (*) a law then
moves per step by 2h² Σ b_i a_ij K_iᵀ S ΔK_j ≲ h²|K|²·|ΔK|/|K|, round-off at round-off
increments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from flowsim.errors import bad_value, check_field
from flowsim.terms import Semilinear, VectorField

from .base import (
    Integrator, SaveGrid, SavePoint, check_fixed_step, not_converged, not_finite, step_size_underflow, too_many_steps,
)  # fmt: skip
from .control import StepSizeController, error_ratio, initial_step
from .ode import check_rtol

#: the longest extrapolation of the previous step's polynomial, in its step lengths (a step cut
#: short to land on a save time would otherwise be extrapolated far beyond its own length)
EXTRAPOLATE_MAX = 2.0
#: Newton–Krylov's Jacobian-vector products: the term's own where it has one, or differences of f
JVPS = ("auto", "difference")
#: the most GMRES steps per Newton correction (its basis is krylov_dim copies of the stages)
MAX_KRYLOV = 1000
#: halvings of a Newton correction that does not decrease the residual
BACKTRACKS = 4


@dataclass(frozen=True)
class GaussTableau:
    """The s-stage Gauss–Legendre method: nodes c, matrix a, weights b, and the weights
    (γ on f(t_0, y_0), e on the K_i) of its embedded error estimate of order s (below)."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]

    def __post_init__(self) -> None:
        """Rows of a sum to c, b to 1, and b_i a_ij + b_j a_ji = b_i b_j (what (*) rests on)."""
        a, b, c = np.array(self.a), np.array(self.b), np.array(self.c)
        if np.abs(a.sum(1) - c).max() > 1e-14 or abs(b.sum() - 1) > 1e-14:
            raise ValueError(f"GaussTableau: rows of a must sum to c and b to 1, got {self}")
        if np.abs(b[:, None] * a + (b[:, None] * a).T - np.outer(b, b)).max() > 1e-14:
            raise ValueError(f"GaussTableau: b_i a_ij + b_j a_ji = b_i b_j fails, got {self}")

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def order(self) -> int:
        return 2 * self.stages

    @property
    def gamma(self) -> float:
        return 1.0 / (2 * self.stages)

    @property
    def error_weights(self) -> tuple[float, ...]:
        """e = b̂ − b for ŷ = y_0 + h(γ f(t_0, y_0) + Σ b̂_i K_i), the order-s formula with
        Σ_i b̂_i c_i^{k−1} = 1/k − γ[k = 1], k = 1 … s; y_1 − ŷ = O(h^{s+1})."""
        c = np.array(self.c)
        vandermonde = np.vander(c, increasing=True).T  # row k: c_i^k
        rhs = 1.0 / np.arange(1, self.stages + 1)
        rhs[0] -= self.gamma
        return tuple((np.linalg.solve(vandermonde, rhs) - np.array(self.b)).tolist())

    def extrapolation(self, ratio: float) -> list[list[float]]:
        """E with K⁰_i = Σ_j E_ij K_j: the polynomial through (c_j, K_j) of the last step (length
        h_last) at the next step's nodes 1 + c_i·ratio, ratio = h/h_last (at most EXTRAPOLATE_MAX)."""
        points = [1.0 + ci * ratio for ci in self.c] if ratio <= EXTRAPOLATE_MAX else [1.0] * self.stages
        return [
            [math.prod((x - cm) / (cj - cm) for m, cm in enumerate(self.c) if m != j) for j, cj in enumerate(self.c)]
            for x in points
        ]


_R3, _R15 = math.sqrt(3.0), math.sqrt(15.0)
#: Gauss–Legendre methods of orders 2, 4 and 6 (Hairer, Nørsett & Wanner I, Table II.7.3–4)
TABLEAUS = {
    1: GaussTableau(c=(0.5,), a=((0.5,),), b=(1.0,)),
    2: GaussTableau(
        c=(0.5 - _R3 / 6, 0.5 + _R3 / 6),
        a=((0.25, 0.25 - _R3 / 6), (0.25 + _R3 / 6, 0.25)),
        b=(0.5, 0.5),
    ),
    3: GaussTableau(
        c=(0.5 - _R15 / 10, 0.5, 0.5 + _R15 / 10),
        a=(
            (5 / 36, 2 / 9 - _R15 / 15, 5 / 36 - _R15 / 30),
            (5 / 36 + _R15 / 24, 2 / 9, 5 / 36 - _R15 / 24),
            (5 / 36 + _R15 / 30, 2 / 9 + _R15 / 15, 5 / 36),
        ),
        b=(5 / 18, 4 / 9, 5 / 18),
    ),
}


class StagesNotConverged(Exception):
    """The stage equations of one step did not converge (its message says how far they got)."""


@dataclass
class Counts:
    """What the stage solver has spent, for the whole run: evaluations of f, Jacobian-vector
    products, fixed-point sweeps and Newton iterations; and the steps solved on a piece whose
    kink branches their stage points do not all take (``Collocation.solve``)."""

    nfe: int = 0
    jvps: int = 0
    iterations: int = 0
    newton_iterations: int = 0
    kinked_steps: int = 0


class Collocation:
    """The stage equations of one Gauss–Legendre step on a term: ``solve`` returns the stage
    derivatives K (s, *y.shape) and the final relative increment; ``points`` the stage values
    Y_i = y_0 + h Σ_j a_ij K_j (the Y_i of (*), module docstring)."""

    def __init__(self, integrator: GaussLegendre, term: VectorField) -> None:
        self.integrator, self.term = integrator, term
        self.tableau = tab = TABLEAUS[integrator.stages]
        like = term.y0
        self.shape, self.s = like.shape, tab.stages
        self.a = torch.tensor(tab.a, dtype=like.dtype, device=like.device)
        self.b = torch.tensor(tab.b, dtype=like.dtype, device=like.device)
        self.e = torch.tensor(tab.error_weights, dtype=like.dtype, device=like.device)
        eps = torch.finfo(like.dtype).eps
        self.eps = eps
        self.tol = integrator.tol if integrator.tol is not None else 100 * eps
        self.floor = max(self.tol, eps ** (2 / 3))
        self.linear = term.linear.to(torch.float64) if isinstance(term, Semilinear) else None
        self.counts = Counts()
        self._implicit: dict[float, Tensor] = {}
        #: per stage, the kink branches its evaluations record (``recording``) or replay; None: f as it is
        self.branches: list[Any] | None = None
        self.recording = False

    # ------------------------------------------------------------------ evaluations
    def f(self, t: float, y: Tensor) -> Tensor:
        self.counts.nfe += 1
        return self.term.f(torch.tensor(t, dtype=torch.float64), y)

    def at_stage(self, i: int, evaluate: Callable[..., Tensor], *args: Any) -> Tensor:
        """`evaluate(*args)` for stage i: on its kink branches (recording or replaying them)."""
        if self.branches is None:
            return evaluate(*args)
        with self.branches[i].record() if self.recording else self.branches[i].replay():
            return evaluate(*args)

    def jvp(self, t: float, y: Tensor, fy: Tensor, v: Tensor) -> Tensor:
        """∂f/∂y(t, y) v: the term's jvp (``jvp="auto"``), or a forward difference from fy = f(t, y)."""
        if self.term.jvp is not None and self.integrator.jvp == "auto":
            self.counts.jvps += 1
            return self.term.jvp(torch.tensor(t, dtype=torch.float64), y, v)
        norm = float(v.norm())
        if norm == 0.0:
            return torch.zeros_like(v)
        delta = math.sqrt(self.eps) * (1.0 + float(y.norm())) / norm
        return (self.f(t, y + delta * v) - fy) / delta

    def combine(self, weights: Tensor, k: Tensor) -> Tensor:
        """Σ_j w_ij K_j for a weight matrix (rows i) or vector, on the stacked K."""
        out = weights.to(k) @ k.reshape(self.s, -1)
        return out.reshape(*weights.shape[:-1], *self.shape)

    def points(self, t: float, y: Tensor, h: float, k: Tensor) -> Tensor:
        """The stage values Y_i = y_0 + h Σ_j a_ij K_j, (s, *y.shape)."""
        return y + h * self.combine(self.a, k)

    def times(self, t: float, h: float) -> list[float]:
        return [t + ci * h for ci in self.tableau.c]

    def field(self, t: float, h: float, points: Tensor) -> Tensor:
        return torch.stack([self.at_stage(i, self.f, ti, yi) for i, (ti, yi) in enumerate(zip(self.times(t, h), points))])

    def relative(self, delta: Tensor, k: Tensor) -> float:
        """|ΔK| / |K| over all stages (for (K, P) members: the largest over the members)."""
        if len(self.shape) == 2:
            num, den = delta.square().sum((0, 2)).sqrt(), k.square().sum((0, 2)).sqrt()
            return float((num / den.clamp_min(torch.finfo(k.dtype).tiny)).max())
        den = float(k.norm())
        return float(delta.norm()) / den if den > 0 else float(delta.norm())

    # ------------------------------------------------------------------ the sweep
    def sweep(self, t: float, y: Tensor, h: float, k: Tensor, record: bool = False) -> Tensor:
        """One fixed-point sweep: F(K) = f(Y(K)), or on a Semilinear term
        (I − h A ⊗ M)⁻¹ (1 ⊗ M y_0 + N(Y(K))); with `record`, noting the stages' kink branches."""
        self.recording = record
        try:
            return self._sweep(t, y, h, k)
        finally:
            self.recording = False

    def _sweep(self, t: float, y: Tensor, h: float, k: Tensor) -> Tensor:
        points = self.points(t, y, h, k)
        self.counts.iterations += 1
        if self.linear is None:
            return self.field(t, h, points)
        self.counts.nfe += self.s
        nonlinear = torch.stack(
            [
                self.at_stage(i, self.term.nonlinear, torch.tensor(ti, dtype=torch.float64), yi)
                for i, (ti, yi) in enumerate(zip(self.times(t, h), points))
            ]
        )
        m = self.linear.to(y)
        rows = len(m)
        rhs = (m @ y.reshape(rows, -1)).unsqueeze(0) + nonlinear.reshape(self.s, rows, -1)
        return (self.implicit(h).to(y) @ rhs.reshape(self.s * rows, -1)).reshape(self.s, *self.shape)

    def implicit(self, h: float) -> Tensor:
        """(I − h A ⊗ M)⁻¹, float64 (cached per step size)."""
        if h not in self._implicit:
            a = torch.tensor(self.tableau.a, dtype=torch.float64)
            size = self.s * len(self.linear)
            if len(self._implicit) > 64:
                self._implicit.clear()
            self._implicit[h] = torch.linalg.inv(torch.eye(size, dtype=torch.float64) - h * torch.kron(a, self.linear))
        return self._implicit[h]

    # ------------------------------------------------------------------ the solve
    def solve(self, t: float, y: Tensor, h: float, guess: Tensor) -> tuple[Tensor, float]:
        """K and its final relative increment: fixed-point sweeps on f; where they stop
        contracting and f has kinks (``term.kinks``), sweeps on the smooth piece of f through the
        best iterate's stage points (their kink branches recorded there, flowsim.kinks: every
        piece keeps the laws, so (*) holds on it); then Newton–Krylov (on that piece). A solution
        on a piece is checked by one more sweep that records the branches its stage points
        take: the same, it is the collocation solution of f; else it stands for the piece's and
        counts in ``kinked_steps`` (a kink crossed, or slid along, within the step). Raises
        StagesNotConverged where nothing converges."""
        self.branches = None
        k, r, converged = self.sweeps(t, y, h, guess)
        if converged:
            return k, r
        fixed = f"the fixed point reached {r:.2g} (relative increment)"
        if self.term.kinks is not None:
            self.branches = [self.term.kinks() for _ in range(self.s)]
            new = self.sweep(t, y, h, k, record=True)
            if all(b.empty for b in self.branches):  # no kink: the sweeps failed on a smooth f
                self.branches = None
            else:
                k, r, converged = self.sweeps(t, y, h, new, best=(k, self.relative(new - k, new)))
                fixed += f", {r:.2g} on the piece of f through it"
        if not converged:
            if not self.integrator.newton:
                raise StagesNotConverged(f"{fixed}; newton=False")
            k, r = self.newton(t, y, h, k, fixed)
        if self.branches is None:
            return k, r
        solved, self.branches = self.branches, [self.term.kinks() for _ in range(self.s)]
        check = self.sweep(t, y, h, k, record=True)
        if all(a.same(b) for a, b in zip(solved, self.branches)):
            return check, max(r, self.relative(check - k, check))
        self.counts.kinked_steps += 1
        return k, r

    def sweeps(
        self, t: float, y: Tensor, h: float, k: Tensor, best: tuple[Tensor, float] = (None, math.inf)
    ) -> tuple[Tensor, float, bool]:
        """Fixed-point sweeps from K until they converge (module docstring), stop contracting or
        reach ``max_iterations``: (the converged K, or the iterate with the smallest residual
        |K − F(K)|/|F(K)|, the increment of the sweep from it, `best` (K, residual) among them;
        that residual; converged)."""
        previous, (best, best_r) = math.inf, best
        budget = self.integrator.max_iterations
        for sweep in range(1, budget + 1):
            new = self.sweep(t, y, h, k)
            if not torch.isfinite(new).all():
                break
            r = self.relative(new - k, new)
            if r <= self.tol or previous <= r <= self.floor:
                return new, r, True
            if r < best_r:
                best, best_r = k, r
            # not contracting, or contracting too slowly (at rate r/previous) to converge within the budget
            if r >= previous or (previous < math.inf and sweep + math.log(self.tol / r) / math.log(r / previous) > budget):
                break
            k, previous = new, r
        return (k, previous, False) if best is None else (best, best_r, False)

    def newton(self, t: float, y: Tensor, h: float, k: Tensor, fixed: str) -> tuple[Tensor, float]:
        """Newton on G(K) = K − f(Y(K)) from K: each correction V by GMRES (``gmres``) on
        (I − h diag(J_i)(A ⊗ I)) V = −G, then halved (at most BACKTRACKS times) until |G|
        decreases (Deuflhard, Newton Methods for Nonlinear Problems, §3.1)."""
        times = self.times(t, h)
        points = self.points(t, y, h, k)
        fk = self.field(t, h, points)
        if not torch.isfinite(fk).all():  # no Jacobian to solve with (GMRES would meet NaN)
            raise StagesNotConverged(f"{fixed}; f is non-finite (NaN/Inf) at the stage points")
        r = self.relative(k - fk, fk)
        for _ in range(self.integrator.max_newton):
            if r <= self.tol:
                return fk, r
            self.counts.newton_iterations += 1

            def operator(v: Tensor, points: Tensor = points, fk: Tensor = fk) -> Tensor:  # (I − h diag(J_i)(A ⊗ I)) v
                w = h * self.combine(self.a, v)
                return v - torch.stack([self.at_stage(i, self.jvp, *args) for i, args in enumerate(zip(times, points, fk, w))])

            step = gmres(operator, fk - k, min(1e-2, math.sqrt(r)), self.integrator.krylov_dim)
            for _ in range(BACKTRACKS + 1):
                trial = k + step
                trial_points = self.points(t, y, h, trial)
                f_trial = self.field(t, h, trial_points)
                r_trial = self.relative(trial - f_trial, f_trial) if torch.isfinite(f_trial).all() else math.inf
                if r_trial < r:
                    break
                step = 0.5 * step
            else:  # no decrease along the correction: converged if at the round-off floor
                if r <= self.floor:
                    return fk, r
                break
            stalled = r_trial > 0.5 * r and r_trial <= self.floor
            k, points, fk, r = trial, trial_points, f_trial, r_trial
            if stalled:
                return fk, r
        if r <= self.tol:
            return fk, r
        raise StagesNotConverged(f"{fixed}; Newton–Krylov reached {r:.2g} (relative residual)")


def gmres(operator: Callable[[Tensor], Tensor], rhs: Tensor, rtol: float, maxiter: int) -> Tensor:
    """x with |operator(x) − rhs| ≤ rtol·|rhs|, or the best of `maxiter` Krylov steps: GMRES
    (Saad & Schultz 1986) from x = 0, modified Gram–Schmidt Arnoldi, no restart; the small
    least-squares problem in float64 on the host."""
    beta = float(rhs.norm())
    if beta == 0.0:
        return torch.zeros_like(rhs)
    basis = [rhs / beta]
    hessenberg = np.zeros((maxiter + 1, maxiter))
    coefficients = np.zeros(0)
    for j in range(maxiter):
        w = operator(basis[j])
        for i in range(j + 1):
            hessenberg[i, j] = float((w * basis[i]).sum())
            w = w - hessenberg[i, j] * basis[i]
        hessenberg[j + 1, j] = float(w.norm())
        target = np.zeros(j + 2)
        target[0] = beta
        coefficients = np.linalg.lstsq(hessenberg[: j + 2, : j + 1], target, rcond=None)[0]
        left = np.linalg.norm(target - hessenberg[: j + 2, : j + 1] @ coefficients)
        if left <= rtol * beta or hessenberg[j + 1, j] <= 1e-14 * beta:
            break
        basis.append(w / hessenberg[j + 1, j])
    return sum(float(ci) * vi for ci, vi in zip(coefficients, basis))


@dataclass(frozen=True)
class GaussLegendre(Integrator):
    """The s-stage Gauss–Legendre collocation method (order 2s) on any vector-field term: every
    law, linear or quadratic, is kept at any step size, to the round-off of f and of the
    stage equations' solution (module docstring).

    **Arguments**

    - `stages`: 1 (implicit midpoint, order 2), 2 (order 4) or 3 (order 6).
    - `step_size`: fixed steps of this size (the last one before a save time cut short to land
      on it). None: adaptive steps, with `rtol`, `atol` on the embedded order-s estimate
      y_1 − ŷ = h(γ f(t_0, y_0) + Σ_i e_i K_i) (one more evaluation of f per step), and a
      step whose stage equations do not converge is retried at half the size.
    - `tol`: the stage equations' relative increment |ΔK|/|K| at convergence (None: 100ε,
      round-off; ε of the dtype).
    - `max_iterations`: fixed-point sweeps per step before Newton–Krylov takes over.
    - `newton`: fall back to Newton–Krylov (False: a fixed point that does not converge ends
      the run); `max_newton` its iterations per step, `krylov_dim` the GMRES steps of each.
    - `jvp`: its Jacobian-vector products, "auto" (the term's own, e.g. GradientFlow's
      Hessian-vector product, else differences of f) or "difference" (one evaluation of f
      each, where a Hessian-vector product costs 4 to 10: measured on the tests' MLP and CNN).
    - `first_step`, `max_steps`: the first adaptive trial step (None: from |y| and |f(y)|);
      the step attempts allowed before the run ends as diverged.

    One step costs s evaluations of f per sweep (5 to 20 sweeps to round-off from the
    extrapolated guess, fewer at smaller h·‖∂f/∂y‖), plus s Jacobian-vector products per GMRES
    step where Newton runs. Its save points carry ``stats``: cumulative ``iterations``
    (sweeps), ``newton_iterations``, ``jacobian_products``, ``kinked_steps`` (steps solved on
    a smooth piece of f whose kink branches their stages do not all take) and
    ``rejected_steps``, and the largest final ``residual`` (relative increment) since the last
    save point. Its checkpoint holds the state, the last step's K
    and length (the next guess) and the counters, so a resumed run is the uninterrupted one
    bit for bit. **Raises** IntegrationError when the stage equations do not converge (at a
    fixed step; adaptive: when the step size underflows), f turns non-finite or `max_steps`
    is reached: the run ends "diverged", keeping what it saved.
    """

    stages: int = 2
    step_size: float | None = None
    tol: float | None = None
    rtol: float = 1e-6
    atol: float = 1e-6
    max_iterations: int = 50
    newton: bool = True
    max_newton: int = 20
    krylov_dim: int = 30
    jvp: str = "auto"
    first_step: float | None = None
    max_steps: int = 1_000_000
    term: ClassVar[type[VectorField]] = VectorField

    def __post_init__(self) -> None:
        check_field(self, "integrator", "stages", integer=True, minimum=1)
        if self.stages not in TABLEAUS:
            raise bad_value("integrator.stages", self.stages, "1, 2 or 3 (orders 2, 4, 6)")
        for name in ("step_size", "tol", "first_step"):
            if getattr(self, name) is not None:
                check_field(self, "integrator", name, minimum=0.0, exclusive_minimum=True)
        if self.tol is not None and self.tol >= 1:
            raise bad_value("integrator.tol", self.tol, "a relative increment below 1 (None: round-off)")
        check_field(self, "integrator", "rtol", minimum=0.0, exclusive_minimum=True)
        check_field(self, "integrator", "atol", minimum=0.0, exclusive_minimum=True)
        for name in ("max_iterations", "max_newton", "max_steps"):
            check_field(self, "integrator", name, integer=True, minimum=1)
        check_field(self, "integrator", "krylov_dim", integer=True, minimum=1, maximum=MAX_KRYLOV)
        if not isinstance(self.newton, bool):
            raise bad_value("integrator.newton", self.newton, "true or false")
        if self.jvp not in JVPS:
            raise bad_value("integrator.jvp", self.jvp, f"one of {', '.join(JVPS)}")

    @property
    def order(self) -> int:
        return TABLEAUS[self.stages].order

    def check_dtype(self, dtype: torch.dtype) -> None:
        if self.step_size is None:
            check_rtol(self.rtol, dtype)

    def check_grid(self, grid: SaveGrid) -> None:
        check_fixed_step("integrator.step_size", self.step_size, grid, "a longer step would be cut to the interval")

    def solve(self, term: VectorField, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None) -> Iterator[SavePoint]:
        stages = Collocation(self, term)
        counts, tab = stages.counts, stages.tableau
        adaptive = self.step_size is None
        controller = StepSizeController(order=tab.stages + 1, ifactor=5.0)  # the embedded estimate is O(h^(s+1))

        def checkpoint(index: int) -> dict[str, Any]:
            return {
                "index": index, "y": y, "f0": f0, "last": last, "last_h": last_h, "h": h,
                "steps": steps, "attempts": attempts, **vars(counts),
            }  # fmt: skip

        def point(time: float, index: int) -> SavePoint:
            stats = {
                "iterations": counts.iterations,
                "newton_iterations": counts.newton_iterations,
                "jacobian_products": counts.jvps,
                "rejected_steps": attempts - steps,
                "kinked_steps": counts.kinked_steps,
                "residual": residual,
            }
            theta, velocity = term.split(y)
            return SavePoint(time, steps, counts.nfe, theta, velocity=velocity, checkpoint=checkpoint(index), stats=stats)

        residual = 0.0
        if start is None:
            y, f0, last, last_h, h, steps, attempts = term.y0, None, None, None, self.step_size, 0, 0
            first = 1
            yield point(grid.times[0], 0)
        else:
            y, f0, last, last_h, h, steps, attempts = (start[k] for k in ("y", "f0", "last", "last_h", "h", "steps", "attempts"))
            for name in vars(counts):
                setattr(counts, name, start[name])
            first = start["index"] + 1
        t = grid.times[first - 1]
        for index in range(first, len(grid.times)):
            target, residual = grid.times[index], 0.0
            while t < target:
                if attempts >= self.max_steps:
                    raise too_many_steps("GaussLegendre", self.max_steps, t)
                attempts += 1
                if f0 is None and (adaptive or last is None):
                    f0 = stages.f(t, y)
                    if h is None:
                        h = self.first_step or initial_step(y, f0, target - t, self.rtol, self.atol, term.error_norm)
                step = min(h, target - t)
                if target - t - step <= 1e-12 * max(1.0, abs(target)):
                    step = target - t
                if last is None:
                    guess = f0.expand(tab.stages, *y.shape)
                else:
                    guess = stages.combine(torch.tensor(tab.extrapolation(step / last_h), dtype=torch.float64), last)
                try:
                    k, r = stages.solve(t, y, step, guess)
                except StagesNotConverged as exc:
                    if not adaptive:
                        raise not_converged("GaussLegendre", t, step, str(exc)) from None
                    h = 0.5 * step
                    if h <= 1e-14 * max(1.0, abs(t)):
                        raise step_size_underflow("GaussLegendre", h, t, str(exc)) from None
                    continue
                y_new = y + step * stages.combine(stages.b, k)
                if not torch.isfinite(y_new).all():
                    raise not_finite("GaussLegendre", t, step)
                if adaptive:
                    error = step * (tab.gamma * f0 + stages.combine(stages.e, k))
                    ratio = error_ratio(error, y, y_new, self.rtol, self.atol, term.error_norm)
                    accept, h = controller.landing(step, h, ratio)
                    if h <= 1e-14 * max(1.0, abs(t)):
                        raise step_size_underflow("GaussLegendre", h, t)
                    if not accept:
                        continue
                t = target if step == target - t else t + step
                y, f0, last, last_h = y_new, None, k, step
                residual = max(residual, r)
                steps += 1
            yield point(target, index)


__all__ = ["GaussLegendre", "GaussTableau", "TABLEAUS", "Collocation", "gmres"]
