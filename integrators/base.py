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

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, ClassVar

import torch

from flowsim.errors import ConfigError
from flowsim.terms import SaveGrid, SavePoint, Term


#: the most steps a fixed-step integrator or SGD may take in one run (a run that would need more
#: never ends in practice: t1 or the step is a slip)
MAX_STEPS = 10**10


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
