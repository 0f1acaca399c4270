"""Deterministic flows on torchdiffeq's solvers, streamed save point by save point."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS, _check_inputs
from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver, FixedGridODESolver

from flowsim.errors import ConfigError, IntegrationError, check_number

from .base import Integrator, SaveGrid, SavePoint

#: torchdiffeq's methods: adaptive ones take rtol/atol, fixed-grid ones a step_size
ADAPTIVE = tuple(m for m, s in SOLVERS.items() if issubclass(s, AdaptiveStepsizeODESolver) and m != "scipy_solver")
FIXED = tuple(m for m, s in SOLVERS.items() if issubclass(s, FixedGridODESolver))


class _VectorField(torch.nn.Module):
    """y' = dynamics.derivative(t, y), counting evaluations and accepted steps."""

    def __init__(self, dynamics, problem) -> None:
        super().__init__()
        self.dynamics, self.problem = dynamics, problem
        self.nfe = 0
        self.accepted = 0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        return self.dynamics.derivative(self.problem, t, y)

    def count_step(self, *_: Tensor) -> None:
        self.accepted += 1


@dataclass(frozen=True)
class ODE(Integrator):
    """torchdiffeq's ``method`` on a continuous dynamics.

    Adaptive methods (dopri5, dopri8, bosh3, adaptive_heun, fehlberg2, implicit/explicit Adams…)
    control the local error to ``atol + rtol·|y|``; fixed-grid methods (euler, midpoint, heun2,
    heun3, rk4…) take ``step_size`` (None: one step per save interval). ``options`` passes any
    other torchdiffeq option (e.g. ``max_num_steps``, ``first_step``).
    """

    method: str = "dopri5"
    rtol: float = 1e-7
    atol: float = 1e-9
    step_size: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    runs = "continuous"

    def __post_init__(self) -> None:
        if self.method not in ADAPTIVE + FIXED:
            raise ConfigError(f"integrator.method: got {self.method!r}; expected one of {', '.join(ADAPTIVE + FIXED)}")
        check_number("integrator.rtol", self.rtol, minimum=0.0, exclusive_minimum=True)
        check_number("integrator.atol", self.atol, minimum=0.0, exclusive_minimum=True)
        if self.step_size is not None:
            check_number("integrator.step_size", self.step_size, minimum=0.0, exclusive_minimum=True)
            if self.method in ADAPTIVE:
                raise ConfigError(
                    f"integrator.step_size: {self.method} chooses its own steps; give step_size only "
                    f"to a fixed-grid method ({', '.join(FIXED)})"
                )
        if not isinstance(self.options, dict):
            raise ConfigError(f"integrator.options: got {self.options!r}; expected a table of torchdiffeq options")

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE

    def check(self, dynamics, dtype: torch.dtype) -> None:
        super().check(dynamics, dtype)
        if self.adaptive and dtype == torch.float32 and self.rtol < 1e-6:
            import warnings

            warnings.warn(
                f"integrator.rtol={self.rtol:g} is below what float32 can honour (about 1e-6); "
                "use dtype=torch.float64 for accuracy work",
                stacklevel=3,
            )

    def solve(self, dynamics, problem, theta0: Tensor, grid: SaveGrid, seed: int) -> Iterator[SavePoint]:
        f = _VectorField(dynamics, problem)
        if self.adaptive:  # torchdiffeq calls it after every accepted step
            f.callback_accept_step = f.count_step
        y0 = dynamics.initial_state(problem, theta0)
        t = torch.tensor(grid.times, dtype=torch.float64, device=y0.device)
        options = dict(self.options)
        if self.step_size is not None:
            options["step_size"] = self.step_size
        if hasattr(problem, "error_norm") and "norm" not in options:  # an ensemble: every member meets the tolerance
            options["norm"] = problem.error_norm
        try:
            _, func, y0, t, rtol, atol, method, options, _, _ = _check_inputs(
                f, y0, t, self.rtol, self.atol, self.method, options, None, SOLVERS
            )
            solver = SOLVERS[method](func=func, y0=y0, rtol=rtol, atol=atol, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"integrator.options: torchdiffeq refused them ({exc})") from exc
        states = self._adaptive(solver, t) if self.adaptive else self._fixed(solver, t, f)
        for time, y in zip(grid.times, states):
            theta, velocity = dynamics.split(problem, y)
            yield SavePoint(time, f.accepted, f.nfe, theta, velocity=velocity)

    @staticmethod
    def _adaptive(solver, t: Tensor) -> Iterator[Tensor]:
        yield solver.y0
        solver._before_integrate(t)
        for t_next in t[1:]:
            try:
                yield solver._advance(t_next)
            except AssertionError as exc:  # torchdiffeq reports failures by assert
                raise IntegrationError(f"torchdiffeq stopped before t={float(t_next):g}: {exc}") from exc

    @staticmethod
    def _fixed(solver, t: Tensor, f: _VectorField) -> Iterator[Tensor]:
        """FixedGridODESolver.integrate, yielding each save time as it is passed."""
        grid = solver.grid_constructor(solver.func, solver.y0, t)
        y0, j = solver.y0, 1
        yield y0
        for t0, t1 in zip(grid[:-1], grid[1:]):
            dy, _ = solver._step_func(solver.func, t0, t1 - t0, t1, y0)
            y1 = y0 + dy
            f.count_step()
            while j < len(t) and t1 >= t[j]:
                yield solver._linear_interp(t0, t1, y0, y1, t[j])
                j += 1
            y0 = y1
