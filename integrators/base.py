"""What every integrator shares: the save grid it is asked for and the points it yields.

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
   (e.g. ``DiscreteSGD.batch(problem, k, seed)``), or its generator state is in the checkpoint,
   so a resumed run draws the same numbers.

An integrator that cannot continue yields ``checkpoint=None``; a resumed run then starts over
from t = 0 (correct, only slower), and `solve` is never called with ``start``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from flowsim.errors import ConfigError


@dataclass(frozen=True)
class SaveGrid:
    """Where to save: `times` (t = k·lr units), and for discrete dynamics the step index of each."""

    times: tuple[float, ...]
    steps: tuple[int, ...] | None = None


@dataclass
class SavePoint:
    """The state at one save time, with what the integrator already knows there.

    `grad` is ĝ (the data-loss gradient without weight decay) that moves θ from here, `velocity`
    the velocity that moves it, `loss` the full-data loss at θ; each is None when the
    integrator does not have it for free (the recorder then computes what it needs).
    `step` counts the integrator's steps so far, `nfe` its evaluations of the dynamics.
    For a dynamics with ``members = (dim, K)`` (SGDNoise's paths) θ, grad, velocity and loss
    carry a leading batch dimension of K independent members: θ is (K, P).
    `checkpoint` is the integrator's state after this point (see the module docstring)."""

    time: float
    step: int
    nfe: int
    theta: Tensor
    grad: Tensor | None = None
    velocity: Tensor | None = None
    loss: Tensor | None = None
    checkpoint: dict[str, Any] | None = None


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
    """HOW the dynamics move: yields a SavePoint at every time of the grid, in order."""

    #: the kind of dynamics it runs: "continuous" (deterministic ODE), "discrete", "sde"
    runs: ClassVar[str]

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__, **asdict(self)}

    def check(self, dynamics, dtype: torch.dtype) -> None:
        """Raise ConfigError if this integrator cannot run `dynamics` in `dtype`."""
        kind = "discrete" if not dynamics.continuous else getattr(dynamics, "kind", "continuous")
        if kind != self.runs:
            raise ConfigError(
                f"integrator: {type(self).__name__} integrates {self.runs} dynamics, but "
                f"{dynamics.name} is {kind}; leave integrator=None for its default "
                f"({type(dynamics.default_integrator()).__name__})"
            )

    def check_problem(self, dynamics, problem) -> None:
        """Raise ConfigError if this integrator cannot run `dynamics` on `problem` (its size…)."""

    def check_device(self, device: torch.device) -> None:
        """Raise ConfigError if this integrator cannot run on `device`."""

    def check_grid(self, grid: SaveGrid) -> None:
        """Raise ConfigError if this integrator cannot save on `grid` as asked (a fixed step
        longer than the save interval)."""

    @abstractmethod
    def solve(
        self, dynamics, problem, theta0: Tensor, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None
    ) -> Iterator[SavePoint]:
        """Move from θ0 at t=grid.times[0] and yield the state at every grid time; with `start`
        (a yielded ``SavePoint.checkpoint``), go on after that point instead."""
