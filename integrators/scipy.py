"""scipy.integrate's ODE solvers (solve_ivp's methods) as a float64 reference and for stiff flows.

The solver object is stepped directly (what ``solve_ivp`` does inside), so save points stream
out as the run goes: a save time passed by a step is read off the step's dense output. Each
evaluation crosses the torch↔numpy bridge once: the float64 state goes to the state's
device as one tensor, the derivative comes back as one array.

The implicit methods (Radau, BDF, LSODA) need the Jacobian of the vector field, a dense S×S
matrix for a state of size S. scipy takes it only as a matrix (an array, or a sparse one with
a known pattern, which a dense network does not have): no Jacobian-vector product can replace
it. flowsim lets scipy build it by finite differences, S evaluations per Jacobian, plus an
O(S³) factorisation, so these methods are refused above ``max_jacobian_size`` (2,000 by
default). For a stiff flow of a larger network use
``integrators.Exponential``, which needs no Jacobian.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.integrate
import torch
from torch import Tensor

from flowsim.errors import ConfigError, check_field
from flowsim.terms import VectorField

from .base import Integrator, SaveGrid, SavePoint, not_finite, solver_stopped

EXPLICIT = ("RK45", "DOP853", "RK23")
IMPLICIT = ("Radau", "BDF", "LSODA")
METHODS = EXPLICIT + IMPLICIT
#: the order of each method's propagated solution (BDF and LSODA vary theirs)
ORDERS = {"RK45": 5, "DOP853": 8, "RK23": 3, "Radau": 5, "BDF": None, "LSODA": None}


class _Bridge:
    """A vector-field term as scipy's f(t, y) on float64 arrays; counts evaluations."""

    def __init__(self, term: VectorField) -> None:
        self.field, self.like = term.f, term.y0
        self.nfe = 0

    def to_torch(self, y: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(y)).to(device=self.like.device, dtype=self.like.dtype)

    def __call__(self, t: float, y: np.ndarray) -> np.ndarray:
        self.nfe += 1
        dy = self.field(torch.tensor(t, dtype=torch.float64), self.to_torch(y))
        out = dy.detach().cpu().numpy()
        if not np.isfinite(out).all():
            raise not_finite("SciPy", t)
        return out


@dataclass(frozen=True)
class SciPy(Integrator):
    """``scipy.integrate``'s `method` (RK45, DOP853, RK23, Radau, BDF, LSODA) in float64.

    **Arguments**

    - `method`: the solve_ivp method. Explicit: RK45, DOP853 (order 8, the reference), RK23.
      Implicit, for stiff flows: Radau, BDF, LSODA (finite-difference Jacobian, see below).
    - `rtol`, `atol`: scipy's local error tolerances.
    - `max_jacobian_size`: the largest state an implicit method accepts (its dense Jacobian
      costs that many evaluations and its factorisation the cube).
    - `first_step`, `max_step`: scipy's step bounds (None: scipy's choice).

    **Raises** ConfigError before any work for an unknown method, float32 (scipy computes in
    float64), or an implicit method on a state larger than `max_jacobian_size`;
    IntegrationError (the run ends "diverged") when scipy fails or a derivative is not finite.
    """

    method: str = "DOP853"
    rtol: float = 1e-10
    atol: float = 1e-12
    max_jacobian_size: int = 2000
    first_step: float | None = None
    max_step: float | None = None
    term = VectorField

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"integrator.method: got {self.method!r}; expected one of {', '.join(METHODS)}")
        check_field(self, "integrator", "rtol", minimum=0.0, exclusive_minimum=True)
        check_field(self, "integrator", "atol", minimum=0.0, exclusive_minimum=True)
        check_field(self, "integrator", "max_jacobian_size", integer=True, minimum=1)
        for name in ("first_step", "max_step"):
            if getattr(self, name) is not None:
                check_field(self, "integrator", name, minimum=0.0, exclusive_minimum=True)

    @property
    def order(self) -> int | None:
        """The order of the propagated solution (None for BDF and LSODA, whose order varies)."""
        return ORDERS[self.method]

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype != torch.float64:
            raise ConfigError(f"run.dtype: got {str(dtype).removeprefix('torch.')}; the SciPy integrator computes in float64")

    def check_size(self, size: int) -> None:
        if self.method in IMPLICIT and size > self.max_jacobian_size:
            raise ConfigError(
                f"integrator.method: {self.method} needs a dense {size}×{size} Jacobian ({size} evaluations "
                f"and an O(n³) factorisation each), above integrator.max_jacobian_size = {self.max_jacobian_size}; "
                "raise that limit, or use an explicit method (RK45, DOP853) or integrators.Exponential for stiff flows"
            )

    def solve(self, term: VectorField, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None) -> Iterator[SavePoint]:
        """No checkpoints (scipy's solver state is its own): a resumed run starts over."""
        y0 = term.y0
        f = _Bridge(term)
        options = {k: getattr(self, k) for k in ("first_step", "max_step") if getattr(self, k) is not None}
        solver_class = getattr(scipy.integrate, self.method)
        times = grid.times
        solver = solver_class(
            f, times[0], y0.detach().cpu().numpy().astype(np.float64), times[-1], rtol=self.rtol, atol=self.atol, **options
        )
        theta, velocity = term.split(y0)
        yield SavePoint(times[0], 0, 0, theta, velocity=velocity)
        j, steps = 1, 0
        while j < len(times):
            message = solver.step()
            if solver.status == "failed":
                raise solver_stopped("SciPy", f"scipy's {self.method}", solver.t, message)
            steps += 1
            dense = None
            while j < len(times) and times[j] <= solver.t:  # the last step ends exactly at times[-1]
                if times[j] == solver.t:
                    y = solver.y
                else:
                    dense = solver.dense_output() if dense is None else dense
                    y = dense(times[j])
                theta, velocity = term.split(f.to_torch(y))
                yield SavePoint(times[j], steps, f.nfe, theta, velocity=velocity)
                j += 1


__all__ = ["SciPy", "METHODS", "EXPLICIT", "IMPLICIT"]
