"""What every integrator shares: the base class, its solve contract and its checks (the save
grid it is asked for and the points it yields are flowsim.terms').

**The checkpoint contract** (every integrator; `simulate` relies on it to resume a run):

1. Every `SavePoint` that `solve` yields carries ``checkpoint``: a dict of tensors, numbers,
   strings, None and lists of these (what ``torch.load(weights_only=True)`` reads back) that
   holds everything needed to go on after this point, with ``checkpoint["index"]`` the grid
   index of the point. It is taken at every save point, so it must be cheap: references, not
   copies, to tensors the integrator never modifies in place afterwards.
2. ``solve(..., start=checkpoint)`` continues after that point as if the run had never
   stopped: it yields the points ``index + 1, index + 2, …`` with the same values (bit for bit
   on the same device and dtype for deterministic integrators) and the same ``step``/``nfe``
   counts, which continue from the checkpoint's.
3. Randomness (mini-batches, Brownian increments) is a pure function of ``(seed, position)``
   (e.g. the batch of SGD step k), or its generator state is in the checkpoint,
   so a resumed run draws the same numbers.

An integrator that cannot continue yields ``checkpoint=None``; a resumed run then starts over
from t = 0 (correct, only slower), and `solve` is never called with ``start``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, ClassVar

import torch

from flowsim.errors import ConfigError, IntegrationError
from flowsim.terms import SaveGrid, SavePoint, Term


#: the most steps a fixed-step integrator or SGD may take in one run (a run that would need more
#: never ends in practice: t1 or the step is a slip)
MAX_STEPS = 10**10


# ------------------------------------------------------------------------ why a solve cannot go on
# Every integrator raises its IntegrationErrors through these, so one failure reads the same
# whichever integrator meets it: "<integrator>: <what> at/from t=…; <what to do>".


def step_size_underflow(name: str, h: float, t: float, detail: str = "") -> IntegrationError:
    """The adaptive step size of `name` fell to `h` (no longer moves t) at time `t`."""
    why = f"; {detail}" if detail else ""
    return IntegrationError(f"{name}: step size underflow (h={h:.3g}) at t={t:g}: the flow is stiff or non-smooth there{why}")


def not_finite(name: str, t: float, h: float | None = None) -> IntegrationError:
    """The state or the derivative of `name` turned NaN/Inf in the step of size `h` from `t`
    (`h` None: in an evaluation at `t`)."""
    where = f"at t={t:g}" if h is None else f"in the step from t={t:g} (h={h:.3g})"
    return IntegrationError(f"{name}: the state or its derivative became non-finite (NaN/Inf) {where}")


def too_many_steps(name: str, max_steps: int, t: float) -> IntegrationError:
    """`name` took its `max_steps` steps (accepted and rejected) by time `t`."""
    return IntegrationError(
        f"{name}: integrator.max_steps = {max_steps} steps taken by t={t:g}; "
        "raise integrator.max_steps or take fewer steps (looser rtol/atol, a longer step_size)"
    )


def not_converged(name: str, t: float, h: float, detail: str) -> IntegrationError:
    """The implicit stage equations of `name` (fixed point, then Newton) did not converge in the
    step of size `h` from `t`."""
    return IntegrationError(
        f"{name}: the stage equations did not converge in the step from t={t:g} (h={h:.3g}): {detail}; take a smaller step_size"
    )


def solver_stopped(name: str, solver: str, t: float, detail: str, save_time: float | None = None) -> IntegrationError:
    """The library `solver` that `name` drives gave up at time `t` (before `save_time`), saying `detail`."""
    before = "" if save_time is None else f", before the save time t={save_time:g}"
    return IntegrationError(f"{name}: {solver} stopped at t={t:g}{before}: {detail}")


# ------------------------------------------------------------------------ private names of a library
# torchdiffeq and torchsde publish whole solves only (odeint, sdeint); streaming save points and
# resuming from a checkpoint need their solver objects. Each is driven by one adapter, in the one
# file that needs it (ode.py: Torchdiffeq, sde.py: Torchsde), which reads its names through these.


def upstream_changed(package: str, versions: str, what: str) -> str:
    """The message for a `package` whose private internals, which flowsim drives, differ from
    those of the `versions` (pyproject.toml's range) its adapter is written against."""
    try:
        installed = f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        installed = f"this {package}"
    return (
        f"flowsim drives private internals of {package}, and {installed} has changed them: {what}; "
        f"flowsim is written against {package}{versions} (pyproject.toml): install a release in that range"
    )


def upstream_names(package: str, names: dict[str, tuple[str, ...]], versions: str) -> dict[str, Any]:
    """{name: object} for the private `names` ({module: (name, …)}) of `package`; ImportError
    (``upstream_changed``) naming every one the installed release lacks."""
    found, missing = {}, []
    for module_name, attributes in names.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing += [f"{module_name}.{name}" for name in attributes]
            continue
        for name in attributes:
            if hasattr(module, name):
                found[name] = getattr(module, name)
            else:
                missing.append(f"{module_name}.{name}")
    if missing:
        raise ImportError(upstream_changed(package, versions, f"no {', '.join(missing)}"))
    return found


def check_fixed_step(field: str, step: float | None, grid: SaveGrid, why: str) -> None:
    """Raise ConfigError if a fixed step (`field`: integrator.step_size or integrator.dt) is
    longer than the longest save interval of `grid` (`why` says what that step would become), or
    so short that the run would take more than MAX_STEPS steps."""
    if step is None:
        return
    interval = max((b - a for a, b in zip(grid.times, grid.times[1:])), default=0.0)
    if interval and step > interval * (1 + 1e-9):
        raise ConfigError(
            f"{field}: got {step:g}; expected at most the save interval {interval:g} ({why}); "
            "take a smaller step or save less often"
        )
    if grid.times[-1] / step > MAX_STEPS:
        raise ConfigError(
            f"{field}: got {step:g}, which takes {grid.times[-1] / step:.3g} steps to t1 = {grid.times[-1]:g}; "
            f"expected at most {MAX_STEPS:.0e} steps"
        )


class Integrator(ABC):
    """HOW the dynamics move: integrates a term (flowsim.terms) of the type it declares in
    `term`, yielding a SavePoint at every time of the grid, in order. `order` is its order of
    convergence (None: none applies, e.g. the step map that is the dynamics itself)."""

    #: the term type it integrates (a subclass of it too: a Semilinear term is a VectorField)
    term: ClassVar[type[Term]]
    #: its order of convergence in the step size
    order: ClassVar[int | None]

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__, **asdict(self)}

    def settle(self, term: Term, grid: SaveGrid, start: dict[str, Any] | None = None) -> Integrator:
        """This integrator as it runs `term` on `grid`, with what its arguments leave to the
        library (RK's compile="auto") decided once, before the first step, from these inputs
        (never from timing); with `start` (the checkpoint a resumed run goes on from) as the run
        it continues decided it. ``simulate`` records its ``describe()``. Most leave nothing
        open: themselves."""
        return self

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise ConfigError (or warn) if this integrator cannot honour its settings in `dtype`."""

    def check_size(self, size: int) -> None:
        """Raise ConfigError if this integrator cannot run a state of `size` numbers."""

    def check_device(self, device: torch.device) -> None:
        """Raise ConfigError if this integrator cannot run on `device`."""

    def check_grid(self, grid: SaveGrid) -> None:
        """Raise ConfigError if this integrator cannot save on `grid` as asked (a fixed step
        longer than the save interval)."""

    @abstractmethod
    def solve(self, term: Term, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None) -> Iterator[SavePoint]:
        """Move the term's state from t = grid.times[0] and yield it at every grid time; with
        `start` (a yielded ``SavePoint.checkpoint``), go on after that point instead (an
        integrator whose points carry no checkpoint is never given one)."""
