"""Deterministic flows on torchdiffeq's solvers, streamed save point by save point."""

from __future__ import annotations

import collections
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS, _check_inputs
from torchdiffeq._impl.rk_common import _RungeKuttaState
from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver, FixedGridODESolver

from flowsim.errors import ConfigError, IntegrationError, check_field
from flowsim.terms import VectorField

from .base import Integrator, SaveGrid, SavePoint, check_fixed_step

#: torchdiffeq's methods: adaptive ones take rtol/atol, fixed-grid ones a step_size
ADAPTIVE = tuple(m for m, s in SOLVERS.items() if issubclass(s, AdaptiveStepsizeODESolver) and m != "scipy_solver")
FIXED = tuple(m for m, s in SOLVERS.items() if issubclass(s, FixedGridODESolver))

#: the smallest rtol a dtype can honour, in machine epsilons (float32: 9.5e-7, float64: 1.8e-15)
RTOL_EPSILONS = 8


def _options_of(method: str) -> tuple[str, ...]:
    """The options torchdiffeq's `method` takes (its solver classes' keyword arguments)."""
    names = {"norm"}
    for cls in SOLVERS[method].__mro__:
        if "__init__" in cls.__dict__:
            params = inspect.signature(cls.__init__).parameters.values()
            names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return tuple(sorted(names - {"self", "func", "y0", "rtol", "atol"}))


class _Counted(torch.nn.Module):
    """y' = f(t, y) of a vector-field term, counting evaluations, accepted and attempted steps,
    and stopping the run after `max_steps` attempted steps."""

    def __init__(self, term: VectorField, max_steps: int | None = None) -> None:
        super().__init__()
        self.field, self.max_steps = term.f, max_steps
        self.nfe = self.accepted = self.attempted = 0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        return self.field(t, y)

    def count_step(self, *_: Tensor) -> None:
        self.accepted += 1

    def count_attempt(self, t0: Tensor, *_: Tensor) -> None:
        self.attempted += 1
        if self.max_steps is not None and self.attempted > self.max_steps:
            raise IntegrationError(
                f"integrator.max_steps = {self.max_steps} steps taken by t={float(t0):g}; raise max_steps "
                "or loosen rtol/atol to go on"
            )

    def counts(self) -> dict[str, int]:
        return {"nfe": self.nfe, "accepted": self.accepted, "attempted": self.attempted}

    def restore(self, counts: dict[str, Any]) -> None:
        self.nfe, self.accepted, self.attempted = counts["nfe"], counts["accepted"], counts["attempted"]


def check_rtol(rtol: float, dtype: torch.dtype) -> None:
    """An adaptive method's rtol must be resolvable in `dtype` (at least RTOL_EPSILONS machine
    epsilons: float32 cannot honour rtol below about 1e-6); ConfigError otherwise."""
    smallest = RTOL_EPSILONS * torch.finfo(dtype).eps
    if rtol < smallest:
        name = str(dtype).removeprefix("torch.")
        raise ConfigError(
            f"integrator.rtol: got {rtol:g}; expected at least {smallest:.2g} in {name} "
            f"({RTOL_EPSILONS} machine epsilons: a smaller relative error cannot be resolved); "
            + ("use dtype=float64 for accuracy work" if dtype == torch.float32 else "loosen rtol")
        )


@dataclass(frozen=True)
class ODE(Integrator):
    """torchdiffeq's ``method`` on a continuous dynamics.

    Adaptive methods (dopri5, dopri8, bosh3, adaptive_heun, fehlberg2) control the local error
    to ``atol + rtol·|y|``; fixed-grid methods (euler, midpoint, heun2, heun3, rk4, the Adams
    methods) take ``step_size`` (None: one step per save interval). `order` is the method's. ``max_steps`` caps the steps
    (accepted or rejected) of the whole run: reaching it ends the run as "diverged". ``options``
    passes any other torchdiffeq option of the method (e.g. ``max_num_steps`` per save interval,
    ``first_step``); unknown ones are refused.

    Checkpoint (integrators.base): adaptive methods keep torchdiffeq's whole Runge–Kutta state
    (y, f, t0, t1, the next dt, the interpolation coefficients) and fixed-grid ones the grid node
    before the current step, its y and the Adams history, with the counters, so a resumed run
    is bit for bit the uninterrupted one.
    """

    method: str = "dopri5"
    rtol: float = 1e-7
    atol: float = 1e-9
    step_size: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    max_steps: int | None = None
    term = VectorField

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in ADAPTIVE + FIXED:
            raise ConfigError(f"integrator.method: got {self.method!r}; expected one of {', '.join(ADAPTIVE + FIXED)}")
        check_field(self, "integrator", "rtol", minimum=0.0, exclusive_minimum=True)
        check_field(self, "integrator", "atol", minimum=0.0, exclusive_minimum=True)
        if self.step_size is not None:
            check_field(self, "integrator", "step_size", minimum=0.0, exclusive_minimum=True)
            if self.method in ADAPTIVE:
                raise ConfigError(
                    f"integrator.step_size: {self.method} chooses its own steps; give step_size only "
                    f"to a fixed-grid method ({', '.join(FIXED)})"
                )
        if self.max_steps is not None:
            check_field(self, "integrator", "max_steps", integer=True, minimum=1)
        if not isinstance(self.options, dict):
            raise ConfigError(f"integrator.options: got {self.options!r}; expected a table of torchdiffeq options")
        known = _options_of(self.method)
        if "step_size" in self.options:
            raise ConfigError("integrator.options.step_size: given as an option; expected it as integrator.step_size")
        for key in self.options:
            if key not in known:
                raise ConfigError(f"integrator.options.{key}: unknown option of {self.method}; expected one of {', '.join(known)}")
        if self.options.get("interp", "linear") != "linear":
            raise ConfigError(
                f"integrator.options.interp: got {self.options['interp']!r}; flowsim interpolates fixed-grid "
                'solutions linearly ("linear")'
            )
        try:  # a dry construction on a one-number state: torchdiffeq checks the option values
            self._solver(lambda t, y: -y, torch.zeros(1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64))
        except ConfigError as exc:
            raise ConfigError(f"integrator.options: got {self.options!r}; {exc}") from exc

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE

    @property
    def order(self) -> int | None:
        """The method's order; None for the Adams methods, whose order grows with their history up
        to max_order (12 by default; torchdiffeq labels them 4)."""
        return None if "adams" in self.method else SOLVERS[self.method].order

    def check_dtype(self, dtype: torch.dtype) -> None:
        """An adaptive method's rtol must be resolvable in `dtype` (at least 8 machine epsilons:
        float32 cannot honour rtol below about 1e-6)."""
        if self.adaptive:
            check_rtol(self.rtol, dtype)

    def check_grid(self, grid: SaveGrid) -> None:
        why = "save points inside a longer step are linear interpolations of it"
        check_fixed_step("integrator.step_size", self.step_size, grid, why)

    def _solver(self, f, y0: Tensor, t: Tensor, norm=None):
        """torchdiffeq's solver object for `method` on y' = f(t, y) from y0 (`norm`: the error
        norm when the term has its own, as an ensemble's worst member has)."""
        options = dict(self.options)
        if self.step_size is not None:
            options["step_size"] = self.step_size
        if norm is not None and "norm" not in options:
            options["norm"] = norm
        try:
            _, func, y0, t, rtol, atol, method, options, _, _ = _check_inputs(
                f, y0, t, self.rtol, self.atol, self.method, options, None, SOLVERS
            )
            return SOLVERS[method](func=func, y0=y0, rtol=rtol, atol=atol, **options)
        except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
            raise ConfigError(f"integrator.options: torchdiffeq refused them ({type(exc).__name__}: {exc})") from exc

    def solve(self, term: VectorField, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None) -> Iterator[SavePoint]:
        f = _Counted(term, self.max_steps)
        if self.adaptive:  # torchdiffeq calls these before every step and after every accepted one
            f.callback_step, f.callback_accept_step = f.count_attempt, f.count_step
        t = torch.tensor(grid.times, dtype=torch.float64, device=term.y0.device)
        solver = self._solver(f, term.y0, t, term.error_norm)  # an ensemble: every member meets the tolerance
        states = self._adaptive(solver, t, f, start) if self.adaptive else self._fixed(solver, t, f, start)
        for index, y, checkpoint in states:
            theta, velocity = term.split(y)
            stats = {"rejected_steps": f.attempted - f.accepted}
            yield SavePoint(grid.times[index], f.accepted, f.nfe, theta, velocity=velocity, checkpoint=checkpoint, stats=stats)

    @staticmethod
    def _adaptive(solver, t: Tensor, f: _Counted, start: dict[str, Any] | None) -> Iterator[tuple[int, Tensor, dict]]:
        """solver.integrate, yielding (index, y, checkpoint) at each save time as it is reached."""
        solver._before_integrate(t)

        def checkpoint(index: int) -> dict[str, Any]:
            rk = solver.rk_state
            return {
                "index": index,
                **{name: getattr(rk, name) for name in ("y1", "f1", "t0", "t1", "dt")},
                "interp_coeff": list(rk.interp_coeff),
                "next_step_index": solver.next_step_index,
                "next_jump_index": solver.next_jump_index,
                **f.counts(),
            }

        if start is None:
            first = 1
            yield 0, solver.y0, checkpoint(0)
        else:
            first = start["index"] + 1
            solver.rk_state = _RungeKuttaState(
                start["y1"], start["f1"], start["t0"], start["t1"], start["dt"], list(start["interp_coeff"])
            )
            solver.next_step_index, solver.next_jump_index = start["next_step_index"], start["next_jump_index"]
            f.restore(start)
        for index in range(first, len(t)):
            try:
                y = solver._advance(t[index])
            except AssertionError as exc:  # torchdiffeq reports failures by assert
                raise IntegrationError(
                    f"torchdiffeq stopped at t={float(solver.rk_state.t1):g}, before the save time "
                    f"t={float(t[index]):g}: {exc}"
                ) from exc
            yield index, y, checkpoint(index)

    @staticmethod
    def _fixed(solver, t: Tensor, f: _Counted, start: dict[str, Any] | None) -> Iterator[tuple[int, Tensor, dict]]:
        """FixedGridODESolver.integrate, yielding (index, y, checkpoint) at each save time as it is
        passed. A checkpoint holds the grid node before the step that passed it (its y, the
        counters and an Adams method's history there): resuming takes that step again."""
        grid = solver.grid_constructor(solver.func, solver.y0, t)
        adams = hasattr(solver, "prev_f")
        if start is None:
            node, y0, first = 0, solver.y0, 1
            yield 0, y0, {"index": 0, "node": 0, "y": y0, **f.counts(), **({"prev_f": [], "prev_t": None} if adams else {})}
        else:
            node, y0, first = start["node"], start["y"], start["index"] + 1
            f.restore(start)
            if adams:
                solver.prev_f = collections.deque(start["prev_f"], maxlen=solver.prev_f.maxlen)
                solver.prev_t = start["prev_t"]
        j = first
        for n in range(node, len(grid) - 1):
            t0, t1 = grid[n], grid[n + 1]
            before = {"node": n, "y": y0, **f.counts()}
            if adams:
                before.update(prev_f=list(solver.prev_f), prev_t=solver.prev_t)
            f.count_attempt(t0)
            dy, _ = solver._step_func(solver.func, t0, t1 - t0, t1, y0)
            y1 = y0 + dy
            f.count_step()
            while j < len(t) and t1 >= t[j]:
                yield j, solver._linear_interp(t0, t1, y0, y1, t[j]), {"index": j, **before}
                j += 1
            y0 = y1
