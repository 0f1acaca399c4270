"""An exponential Runge–Kutta integrator for stiff semilinear flows: the linear part exactly.

For y' = (M ⊗ I_P) y + N(t, y), with the state k stacked vectors of length P and M a small
k×k matrix (a ``Semilinear`` term's ``linear``; MomentumFlow's damping −τ ∝ −1/η is in it),
a step of size h uses only the φ-functions of Z = hM and Z/2,

    φ_0(Z) = e^Z,  φ_{j+1}(Z) = ∫_0^1 e^{(1−s)Z} s^j / j! ds,

read off one matrix exponential of a 4k×4k block matrix. They are exact on the linear part,
so the step size follows the smooth motion of N, whatever the stiffness of M.

The scheme is Krogstad's fourth-order exponential Runge–Kutta method (Krogstad 2005; Table
of Hochbruck & Ostermann, Acta Numerica 2010), nodes 0, ½, ½, 1, N_i = N(t + c_i h, U_i):

    U_2 = e^{Z/2} y + h ½φ_1(Z/2) N_1
    U_3 = e^{Z/2} y + h [(½φ_1(Z/2) − φ_2(Z/2)) N_1 + φ_2(Z/2) N_2]
    U_4 = e^{Z} y + h [(φ_1 − 2φ_2) N_1 + 2φ_2 N_3]
    y⁺  = e^{Z} y + h [(φ_1 − 3φ_2 + 4φ_3) N_1 + (2φ_2 − 4φ_3)(N_2 + N_3) + (4φ_3 − φ_2) N_4]

With M = 0 it is the classical RK4. The error estimate is first-same-as-last: N_5 = N(y⁺), the
next step's N_1, replaces N_4 in the last weight, ŷ − y⁺ = h(4φ_3 − φ_2)(N_5 − N_4) = O(h⁴) —
four evaluations per step, as dopri5's estimate reuses its seventh stage.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowsim.errors import ConfigError, check_field
from flowsim.terms import Semilinear, VectorField

from .base import Integrator, SaveGrid, SavePoint, check_fixed_step, not_finite, step_size_underflow, too_many_steps
from .control import StepSizeController, error_ratio, initial_step

#: the step-size control of the fourth-order estimate: grow at most 5× a step, shrink at most 5×
CONTROLLER = StepSizeController(order=4, safety=0.9, ifactor=5.0, dfactor=0.2)


def phi_functions(z: Tensor, count: int = 4) -> list[Tensor]:
    """[φ_0(Z), …, φ_{count−1}(Z)] for a small float64 matrix Z, from exp of the block matrix
    [[Z, I, 0…], [0, 0, I…], …, [0 … 0]] whose first block row is (φ_0, φ_1, …)."""
    k = z.shape[0]
    big = torch.zeros(count * k, count * k, dtype=torch.float64)
    big[:k, :k] = z
    for j in range(1, count):
        big[(j - 1) * k : j * k, j * k : (j + 1) * k] = torch.eye(k, dtype=torch.float64)
    top = torch.linalg.matrix_exp(big)[:k]
    return [top[:, j * k : (j + 1) * k] for j in range(count)]


#: a coefficient Σ w · φ_k(c·Z), written {(k, c): w}
Coefficient = dict[tuple[int, float], float]


@dataclass(frozen=True)
class ExponentialTableau:
    """An explicit exponential Runge–Kutta method: stage i sits at c_i and is
    U_i = e^{c_i Z} y + h Σ_j a_ij(Z) N_j; y⁺ = e^Z y + h Σ_i b_i(Z) N_i. `estimate` is the stage
    at c = 1 whose N the first-same-as-last N(y⁺) replaces for the error estimate."""

    c: tuple[float, ...]
    a: tuple[tuple[Coefficient, ...], ...]
    b: tuple[Coefficient, ...]
    estimate: int
    order: int

    def __post_init__(self) -> None:
        # at Z = 0 (φ_k(0) = 1/k!) it must be a Runge–Kutta method with rows summing to c
        value = lambda coef: sum(w / math.factorial(k) for (k, _), w in coef.items())
        for i, row in enumerate(self.a):
            if abs(sum(value(x) for x in row) - self.c[i + 1]) > 1e-12:
                raise ValueError(f"ExponentialTableau: row {i + 1} does not sum to c = {self.c[i + 1]}")
        if abs(sum(value(x) for x in self.b) - 1.0) > 1e-12 or self.c[self.estimate] != 1.0:
            raise ValueError("ExponentialTableau: weights must sum to 1 and the estimate stage sit at c = 1")


def _phi(k: int, c: float, w: float = 1.0) -> Coefficient:
    return {(k, c): w}


def _sum(*coefs: Coefficient) -> Coefficient:
    out: Coefficient = {}
    for coef in coefs:
        for key, w in coef.items():
            out[key] = out.get(key, 0.0) + w
    return out


#: Krogstad (2005): order 4, four stages
KROGSTAD = ExponentialTableau(
    c=(0.0, 0.5, 0.5, 1.0),
    a=(
        (_phi(1, 0.5, 0.5),),
        (_sum(_phi(1, 0.5, 0.5), _phi(2, 0.5, -1.0)), _phi(2, 0.5)),
        (_sum(_phi(1, 1.0), _phi(2, 1.0, -2.0)), {}, _phi(2, 1.0, 2.0)),
    ),
    b=(
        _sum(_phi(1, 1.0), _phi(2, 1.0, -3.0), _phi(3, 1.0, 4.0)),
        _sum(_phi(2, 1.0, 2.0), _phi(3, 1.0, -4.0)),
        _sum(_phi(2, 1.0, 2.0), _phi(3, 1.0, -4.0)),
        _sum(_phi(2, 1.0, -1.0), _phi(3, 1.0, 4.0)),
    ),
    estimate=3,
    order=4,
)

_A52 = _sum(_phi(2, 0.5, 0.5), _phi(3, 1.0, -1.0), _phi(2, 1.0, 0.25), _phi(3, 0.5, -0.5))
#: Hochbruck & Ostermann (2005): stiff order 4, five stages
HOCHBRUCK_OSTERMANN = ExponentialTableau(
    c=(0.0, 0.5, 0.5, 1.0, 0.5),
    a=(
        (_phi(1, 0.5, 0.5),),
        (_sum(_phi(1, 0.5, 0.5), _phi(2, 0.5, -1.0)), _phi(2, 0.5)),
        (_sum(_phi(1, 1.0), _phi(2, 1.0, -2.0)), _phi(2, 1.0), _phi(2, 1.0)),
        (
            _sum(_phi(1, 0.5, 0.5), {k: -2 * w for k, w in _A52.items()}, _phi(2, 0.5, -0.25), {k: w for k, w in _A52.items()}),
            _A52,
            _A52,
            _sum(_phi(2, 0.5, 0.25), {k: -w for k, w in _A52.items()}),
        ),
    ),
    b=(
        _sum(_phi(1, 1.0), _phi(2, 1.0, -3.0), _phi(3, 1.0, 4.0)),
        {},
        {},
        _sum(_phi(2, 1.0, -1.0), _phi(3, 1.0, 4.0)),
        _sum(_phi(2, 1.0, 4.0), _phi(3, 1.0, -8.0)),
    ),
    estimate=3,
    order=4,
)

TABLEAUS = {"krogstad": KROGSTAD, "hochbruck_ostermann": HOCHBRUCK_OSTERMANN}


class _Semilinear:
    """A term seen as M and N, with blocks applied as (k×k) @ (k×P); counts evaluations."""

    def __init__(self, term: VectorField, tableau: ExponentialTableau) -> None:
        self.tableau = tableau
        if isinstance(term, Semilinear):
            self.linear = term.linear.to(torch.float64)
            self.field = term.nonlinear
        else:  # M = 0: the classical RK4 (Krogstad) with the same error estimate
            self.linear = torch.zeros(1, 1, dtype=torch.float64)
            self.field = term.f
        self.k = self.linear.shape[0]
        self.like = term.y0
        self.nfe = 0
        self._cache: dict[float, tuple] = {}

    def __call__(self, t: float, y: Tensor) -> Tensor:
        self.nfe += 1
        return self.field(torch.tensor(t, dtype=torch.float64), y)

    def weights(self, h: float) -> tuple:
        """(e^{c_i Z} per stage, h·a_ij, h·b_i, e^Z) as k×k matrices for a step of size h (cached)."""
        if h not in self._cache:
            tab = self.tableau
            phis = {c: phi_functions(c * h * self.linear) for c in sorted(set(tab.c) | {1.0}) if c > 0}

            def matrix(coef: Coefficient) -> Tensor | None:
                if not coef:
                    return None
                return (h * sum(w * phis[c][k] for (k, c), w in coef.items())).to(self.like)

            exps = [None if c == 0 else phis[c][0].to(self.like) for c in tab.c]
            a = [[matrix(x) for x in row] for row in tab.a]
            b = [matrix(x) for x in tab.b]
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[h] = (exps, a, b, phis[1.0][0].to(self.like))
        return self._cache[h]

    def apply(self, *terms: tuple[Tensor | None, Tensor]) -> Tensor:
        """Σ (A ⊗ I_P) x over the (A, x) pairs whose A is not None, shaped like the state (an
        ensemble's (K, P) too)."""
        out = None
        for matrix, x in terms:
            if matrix is None:
                continue
            part = matrix @ x.view(self.k, -1)
            out = part if out is None else out.add_(part)
        return out.view(self.like.shape)


@dataclass(frozen=True)
class Exponential(Integrator):
    """Krogstad's exponential RK4 on any vector-field term; on a ``Semilinear`` one
    (MomentumFlow's) its linear part is solved exactly, so a stiff damping costs nothing.

    **Arguments**

    - `rtol`, `atol`: the error per step, ‖err / (atol + rtol·max(|y|, |y⁺|))‖ ≤ 1 in the
      term's ``error_norm`` (RMS; an ensemble's worst member), with the embedded
      fourth/third-order estimate (module docstring); ignored with `step_size`.
    - `step_size`: fixed steps of this size instead (the last one before a save time is cut
      short to land on it).
    - `first_step`: the first trial step of the adaptive controller (None: from |y| and |N(y)|).
    - `max_steps`: accepted and rejected steps allowed before the run stops as diverged.

    It lands exactly on every save time (no interpolation), so save intervals shorter than
    its natural step cost extra steps. Its checkpoint at a save point holds the state, N there,
    the next step size and the counters, so a resumed run is the uninterrupted one bit for bit.
    """

    method: str = "krogstad"
    rtol: float = 1e-6
    atol: float = 1e-6
    step_size: float | None = None
    first_step: float | None = None
    max_steps: int = 1_000_000
    term = VectorField

    @property
    def order(self) -> int:
        return TABLEAUS[self.method].order

    def __post_init__(self) -> None:
        if self.method not in TABLEAUS:
            raise ConfigError(f"integrator.method: got {self.method!r}; expected one of {', '.join(TABLEAUS)}")
        check_field(self, "integrator", "rtol", minimum=0.0, exclusive_minimum=True)
        check_field(self, "integrator", "atol", minimum=0.0, exclusive_minimum=True)
        for name in ("step_size", "first_step"):
            if getattr(self, name) is not None:
                check_field(self, "integrator", name, minimum=0.0, exclusive_minimum=True)
        check_field(self, "integrator", "max_steps", integer=True, minimum=1)

    def check_dtype(self, dtype: torch.dtype) -> None:
        if self.step_size is None and dtype == torch.float32 and self.rtol < 1e-6:
            warnings.warn(
                f"integrator.rtol={self.rtol:g} is below what float32 can honour (about 1e-6); "
                "use dtype=torch.float64 for accuracy work",
                stacklevel=3,
            )

    def check_grid(self, grid: SaveGrid) -> None:
        check_fixed_step("integrator.step_size", self.step_size, grid, "a longer step would be cut to the interval")

    def solve(self, term: VectorField, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None) -> Iterator[SavePoint]:
        f = _Semilinear(term, TABLEAUS[self.method])

        def checkpoint(index: int) -> dict[str, Any]:
            return {"index": index, "y": y, "n1": n1, "h": h, "steps": steps, "attempts": attempts, "nfe": f.nfe}

        if start is None:
            y, n1, h, steps, attempts, first = term.y0, None, self.step_size, 0, 0, 1
            theta, velocity = term.split(y)
            yield SavePoint(grid.times[0], 0, 0, theta, velocity=velocity, checkpoint=checkpoint(0), stats={"rejected_steps": 0})
        else:
            y, n1, h, steps, attempts, f.nfe = (start[k] for k in ("y", "n1", "h", "steps", "attempts", "nfe"))
            first = start["index"] + 1
        t = grid.times[first - 1]
        for index in range(first, len(grid.times)):
            target = grid.times[index]
            while t < target:
                if attempts >= self.max_steps:
                    raise too_many_steps("Exponential", self.max_steps, t)
                attempts += 1
                if n1 is None:
                    n1 = f(t, y)
                    if h is None:
                        h = self.first_step or initial_step(y, n1, target - t, self.rtol, self.atol, term.error_norm)
                step = min(h, target - t)
                if target - t - step <= 1e-12 * max(1.0, abs(target)):
                    step = target - t
                y_new, n_new, error = self._step(f, t, y, n1, step)
                if self.step_size is not None:
                    if not torch.isfinite(y_new).all():
                        raise not_finite("Exponential", t, step)
                    accept = True
                else:
                    ratio = error_ratio(error, y, y_new, self.rtol, self.atol, term.error_norm)
                    accept, h = CONTROLLER.landing(step, h, ratio)
                    if h <= 1e-14 * max(1.0, abs(t)):
                        raise step_size_underflow("Exponential", h, t)
                if accept:
                    t = target if step == target - t else t + step
                    y, n1 = y_new, n_new
                    steps += 1
            theta, velocity = term.split(y)
            stats = {"rejected_steps": attempts - steps}
            yield SavePoint(target, steps, f.nfe, theta, velocity=velocity, checkpoint=checkpoint(index), stats=stats)

    @staticmethod
    def _step(f: _Semilinear, t: float, y: Tensor, n1: Tensor, h: float) -> tuple[Tensor, Tensor, Tensor]:
        """One step from (t, y) with N_1 = N(t, y): (y⁺, N(y⁺), error estimate)."""
        exps, a, b, e1 = f.weights(h)
        c = f.tableau.c
        n = [n1]
        for i in range(1, len(c)):
            stage = f.apply((exps[i], y), *zip(a[i - 1], n))
            n.append(f(t + c[i] * h, stage))
        y_new = f.apply((e1, y), *zip(b, n))
        n_new = f(t + h, y_new)
        return y_new, n_new, f.apply((b[f.tableau.estimate], n_new - n[f.tableau.estimate]))


__all__ = ["Exponential", "phi_functions"]
