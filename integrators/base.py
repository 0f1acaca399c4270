"""What every integrator shares: the save grid it is asked for and the points it yields."""

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
    carry a leading batch dimension of K independent members: θ is (K, P)."""

    time: float
    step: int
    nfe: int
    theta: Tensor
    grad: Tensor | None = None
    velocity: Tensor | None = None
    loss: Tensor | None = None


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

    @abstractmethod
    def solve(self, dynamics, problem, theta0: Tensor, grid: SaveGrid, seed: int) -> Iterator[SavePoint]:
        """Move from θ0 at t=grid.times[0] and yield the state at every grid time."""
