"""Deterministic flows on torchdiffeq's solvers, streamed save point by save point.

**torchdiffeq's internals, behind one adapter.** torchdiffeq's public API (``odeint``, its
adjoint and event forms) returns a whole solution at once. Yielding each save point as it is
reached, and resuming from a checkpoint bit for bit, need its solver objects: an adaptive
solver's Runge–Kutta state (y1, f1, t0, t1, dt, the interpolation coefficients) and its
step/jump indices; a fixed-grid solver's grid, single step, interpolation and Adams history. RK
(integrators.rk, integrators.tableaus) takes torchdiffeq's very steps from its coefficients and
its initial step. No public name gives any of these, and solving save interval by save interval
with ``odeint`` would restart the step-size control at each one. So every private name of
torchdiffeq flowsim touches is read in ``Torchdiffeq`` below, and nowhere else: a release that
renames one fails at import (``upstream_names``), or in ``TORCHDIFFEQ.check()``
(tests/test_upstream.py), which drives each of them once, naming what changed. The adapter is
written against torchdiffeq ``TORCHDIFFEQ_VERSIONS`` (pyproject.toml's range: 0.2.4 brought the
step callbacks that count the steps, and 0.3 may change any private name). The step callbacks
(``callback_step``, ``callback_accept_step``) are torchdiffeq's public API.
"""

from __future__ import annotations

import collections
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flowsim.errors import ConfigError, check_field
from flowsim.terms import VectorField

from .base import (
    Integrator, SaveGrid, SavePoint, check_fixed_step, solver_stopped, too_many_steps, upstream_changed, upstream_names,
)  # fmt: skip

#: the torchdiffeq releases ``Torchdiffeq`` is written against (pyproject.toml's range)
TORCHDIFFEQ_VERSIONS = ">=0.2.4,<0.3"


class Torchdiffeq:
    """torchdiffeq's internals, the only ones flowsim touches (module docstring): the solver
    table, odeint's input normalisation and initial step; an adaptive solver's Runge–Kutta state;
    a fixed-grid solver's grid, step, interpolation and Adams history; the coefficients of its
    Runge–Kutta methods. Built once, at import (``TORCHDIFFEQ``)."""

    #: the private names it reads, by module
    NAMES = {
        "torchdiffeq._impl.odeint": ("SOLVERS", "_check_inputs"),
        "torchdiffeq._impl.misc": ("_select_initial_step", "_rms_norm"),
        "torchdiffeq._impl.rk_common": ("_RungeKuttaState", "RKAdaptiveStepsizeODESolver"),
        "torchdiffeq._impl.solvers": ("AdaptiveStepsizeODESolver", "FixedGridODESolver"),
    }

    def __init__(self) -> None:
        self.names = upstream_names("torchdiffeq", self.NAMES, TORCHDIFFEQ_VERSIONS)
        #: method name → solver class
        self.solvers: dict[str, type] = self.names["SOLVERS"]
        kinds = ("AdaptiveStepsizeODESolver", "FixedGridODESolver", "RKAdaptiveStepsizeODESolver")
        adaptive, fixed, rk = (self.names[kind] for kind in kinds)
        #: adaptive methods (rtol/atol), fixed-grid ones (step_size), the explicit adaptive Runge–Kutta ones
        self.adaptive = tuple(m for m, s in self.solvers.items() if issubclass(s, adaptive) and m != "scipy_solver")
        self.fixed = tuple(m for m, s in self.solvers.items() if issubclass(s, fixed))
        self.runge_kutta = tuple(m for m, s in self.solvers.items() if issubclass(s, rk))

    def solver(self, f, y0: Tensor, t: Tensor, rtol: float, atol: float, method: str, options: dict[str, Any]):
        """The solver object ``odeint`` would integrate with (`f` wrapped as odeint wraps it)."""
        _, func, y0, t, rtol, atol, method, options, _, _ = self.names["_check_inputs"](
            f, y0, t, rtol, atol, method, options, None, self.solvers
        )
        return self.solvers[method](func=func, y0=y0, rtol=rtol, atol=atol, **options)

    # ------------------------------------------------------------ an adaptive solver
    @staticmethod
    def begin(solver, t: Tensor) -> None:
        """f(t0, y0) and the initial step, before the first ``advance``."""
        solver._before_integrate(t)

    @staticmethod
    def advance(solver, time: Tensor) -> Tensor:
        """Step until `time` is inside the last step; y(time) by its interpolant."""
        return solver._advance(time)

    @staticmethod
    def reached(solver) -> float:
        """The end of the last accepted step."""
        return float(solver.rk_state.t1)

    @staticmethod
    def state(solver) -> dict[str, Any]:
        """Everything the solver carries between steps: its Runge–Kutta state and step/jump indices."""
        rk = solver.rk_state
        return {
            **{name: getattr(rk, name) for name in ("y1", "f1", "t0", "t1", "dt")},
            "interp_coeff": list(rk.interp_coeff),
            "next_step_index": solver.next_step_index,
            "next_jump_index": solver.next_jump_index,
        }

    def restore(self, solver, state: dict[str, Any]) -> None:
        """The solver as it was when ``state`` was taken."""
        fields = [state[name] for name in ("y1", "f1", "t0", "t1", "dt")]
        solver.rk_state = self.names["_RungeKuttaState"](*fields, list(state["interp_coeff"]))
        solver.next_step_index, solver.next_jump_index = state["next_step_index"], state["next_jump_index"]

    # ------------------------------------------------------------ a fixed-grid solver
    @staticmethod
    def grid(solver, t: Tensor) -> Tensor:
        """The grid nodes it steps through to cover the save times `t`."""
        return solver.grid_constructor(solver.func, solver.y0, t)

    @staticmethod
    def step(solver, t0: Tensor, t1: Tensor, y0: Tensor) -> Tensor:
        """y at grid node t1 from y0 at t0: one step."""
        dy, _ = solver._step_func(solver.func, t0, t1 - t0, t1, y0)
        return y0 + dy

    @staticmethod
    def interpolate(solver, t0: Tensor, t1: Tensor, y0: Tensor, y1: Tensor, time: Tensor) -> Tensor:
        """y(time) inside the step from (t0, y0) to (t1, y1): linear."""
        return solver._linear_interp(t0, t1, y0, y1, time)

    @staticmethod
    def history(solver) -> dict[str, Any] | None:
        """An Adams method's past derivatives and time (None: a one-step method keeps none)."""
        if not hasattr(solver, "prev_f"):
            return None
        return {"prev_f": list(solver.prev_f), "prev_t": solver.prev_t}

    @staticmethod
    def restore_history(solver, history: dict[str, Any]) -> None:
        solver.prev_f = collections.deque(history["prev_f"], maxlen=solver.prev_f.maxlen)
        solver.prev_t = history["prev_t"]

    # ------------------------------------------------------------ RK's use
    def initial_step(
        self, f: Callable[[Tensor, Tensor], Tensor], t0: Tensor, y0: Tensor, order: int, rtol: float, atol: float, f0: Tensor,
        norm: Callable[[Tensor], Tensor] | None = None,
    ) -> float:  # fmt: skip
        """torchdiffeq's first step (Hairer, Nørsett & Wanner I, §II.4) for a method of `order`,
        in `norm` (None: RMS), as its adaptive solvers choose it."""
        norm = norm if norm is not None else self.names["_rms_norm"]
        return float(self.names["_select_initial_step"](f, t0, y0, order - 1, rtol, atol, norm, f0=f0))

    def tableau(self, method: str) -> dict[str, Any]:
        """The Butcher tableau of the explicit adaptive Runge–Kutta `method`, as plain lists:
        order, alpha (c without c_0), beta (a's rows), c_sol (b), c_error (b − b̂), mid (y(t0 + h/2))."""
        solver = self.solvers[method]
        t = solver.tableau
        return {
            "order": solver.order,
            "alpha": t.alpha.tolist(),
            "beta": [row.tolist() for row in t.beta],
            "c_sol": t.c_sol.tolist(),
            "c_error": t.c_error.tolist(),
            "mid": solver.mid.tolist(),
        }

    # ------------------------------------------------------------ the check
    def check(self) -> list[str]:
        """Every method driven through this adapter on y' = −y from 1 (one float64 number) to
        t = 0.2, saving at 0.1: the adaptive ones stopped at 0.1, restored from their state and
        taken on; the fixed-grid ones stepped, interpolated and (Adams) their history restored;
        RK's initial step and tableaus. What failed, or gave a y(0.2) off e^(−0.2) by more than
        0.01, or counted no step, one line per method ([] when all is well)."""
        problems = []
        for method in self.adaptive + self.fixed:
            try:
                steps = []
                f = lambda t, y: -y  # noqa: E731
                if method in self.adaptive:  # as ODE counts its steps
                    f.callback_step, f.callback_accept_step = (lambda *_: None), (lambda *_: steps.append(1))
                t = torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64)
                options = {} if method in self.adaptive else {"step_size": 0.05}
                solver = self.solver(f, torch.ones(1, dtype=torch.float64), t, 1e-6, 1e-8, method, options)
                if method in self.adaptive:
                    self.begin(solver, t)
                    self.advance(solver, t[1])
                    state = self.state(solver)
                    self.restore(solver, state)
                    y, counted = self.advance(solver, t[2]), bool(steps)
                else:
                    nodes, y, history = self.grid(solver, t), solver.y0, self.history(solver)
                    for t0, t1 in zip(nodes[:-1], nodes[1:]):
                        if history is not None:
                            self.restore_history(solver, self.history(solver))
                        y, before = self.step(solver, t0, t1, y), y
                    y, counted = self.interpolate(solver, nodes[-2], nodes[-1], before, y, t[2]), len(nodes) > 2
                if not abs(float(y) - math.exp(-0.2)) < 1e-2 or not counted:
                    problems.append(f"{method}: y(0.2) = {float(y):.6g}, expected {math.exp(-0.2):.6g} with steps counted")
            except Exception as exc:  # noqa: BLE001 — each failure is reported, whatever it is
                problems.append(f"{method}: {type(exc).__name__}: {exc}")
        try:
            one = torch.ones(1, dtype=torch.float64)
            if not self.initial_step(lambda t, y: -y, torch.tensor(0.0, dtype=torch.float64), one, 5, 1e-6, 1e-8, -one) > 0:
                problems.append("the initial step is not positive")
            for method in self.runge_kutta:
                if abs(sum(self.tableau(method)["c_sol"]) - 1) > 1e-12:
                    problems.append(f"{method}: its tableau's weights do not sum to 1")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"RK's initial step or tableaus: {type(exc).__name__}: {exc}")
        return problems

    def changed(self, problems: list[str]) -> str:
        """The message for what ``check`` found."""
        return upstream_changed("torchdiffeq", TORCHDIFFEQ_VERSIONS, "; ".join(problems))


#: the adapter (built at import: a torchdiffeq without its names fails there, saying so)
TORCHDIFFEQ = Torchdiffeq()

#: torchdiffeq's methods: adaptive ones take rtol/atol, fixed-grid ones a step_size
ADAPTIVE = TORCHDIFFEQ.adaptive
FIXED = TORCHDIFFEQ.fixed

#: the smallest rtol a dtype can honour, in machine epsilons (float32: 9.5e-7, float64: 1.8e-15)
RTOL_EPSILONS = 8


def _options_of(method: str) -> tuple[str, ...]:
    """The options torchdiffeq's `method` takes (its solver classes' keyword arguments)."""
    names = {"norm"}
    for cls in TORCHDIFFEQ.solvers[method].__mro__:
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
            raise too_many_steps("ODE", self.max_steps, float(t0))

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
        return None if "adams" in self.method else TORCHDIFFEQ.solvers[self.method].order

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
            return TORCHDIFFEQ.solver(f, y0, t, self.rtol, self.atol, self.method, options)
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
        """The solver's integrate, yielding (index, y, checkpoint) at each save time as it is reached."""
        TORCHDIFFEQ.begin(solver, t)

        def checkpoint(index: int) -> dict[str, Any]:
            return {"index": index, **TORCHDIFFEQ.state(solver), **f.counts()}

        if start is None:
            first = 1
            yield 0, solver.y0, checkpoint(0)
        else:
            first = start["index"] + 1
            TORCHDIFFEQ.restore(solver, start)
            f.restore(start)
        for index in range(first, len(t)):
            try:
                y = TORCHDIFFEQ.advance(solver, t[index])
            except AssertionError as exc:  # torchdiffeq reports failures by assert
                raise solver_stopped("ODE", "torchdiffeq", TORCHDIFFEQ.reached(solver), str(exc), float(t[index])) from exc
            yield index, y, checkpoint(index)

    @staticmethod
    def _fixed(solver, t: Tensor, f: _Counted, start: dict[str, Any] | None) -> Iterator[tuple[int, Tensor, dict]]:
        """The fixed-grid solver's integrate, yielding (index, y, checkpoint) at each save time as
        it is passed. A checkpoint holds the grid node before the step that passed it (its y, the
        counters and an Adams method's history there): resuming takes that step again."""
        grid = TORCHDIFFEQ.grid(solver, t)
        history = TORCHDIFFEQ.history(solver)  # None: not an Adams method
        if start is None:
            node, y0, first = 0, solver.y0, 1
            yield 0, y0, {"index": 0, "node": 0, "y": y0, **f.counts(), **(history if history is not None else {})}
        else:
            node, y0, first = start["node"], start["y"], start["index"] + 1
            f.restore(start)
            if history is not None:
                TORCHDIFFEQ.restore_history(solver, start)
        j = first
        for n in range(node, len(grid) - 1):
            t0, t1 = grid[n], grid[n + 1]
            before = {"node": n, "y": y0, **f.counts(), **(TORCHDIFFEQ.history(solver) or {})}
            f.count_attempt(t0)
            y1 = TORCHDIFFEQ.step(solver, t0, t1, y0)
            f.count_step()
            while j < len(t) and t1 >= t[j]:
                yield j, TORCHDIFFEQ.interpolate(solver, t0, t1, y0, y1, t[j]), {"index": j, **before}
                j += 1
            y0 = y1
