"""The discrete step loop: true SGD, step by step, saving at the grid's steps."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor

from .base import Integrator, SaveGrid, SavePoint


@dataclass(frozen=True)
class Discrete(Integrator):
    """Runs a discrete dynamics (DiscreteSGD) exactly: θ_{k+1} = step(θ_k). At a save step k
    it records θ_k with the batch gradient and velocity of step k (those that move θ_k)."""

    runs = "discrete"

    def solve(self, dynamics, problem, theta0: Tensor, grid: SaveGrid, seed: int) -> Iterator[SavePoint]:
        state = dynamics.initial_state(problem, theta0)
        saves = iter(zip(grid.steps, grid.times))
        next_step, next_time = next(saves)
        k = 0
        while True:
            result = dynamics.step(problem, state, k, seed)
            if k == next_step:
                loss = result.batch_loss if result.full_batch else None
                yield SavePoint(next_time, k, k + 1, state.theta, result.grad, result.velocity, loss)
                following = next(saves, None)
                if following is None:
                    return
                next_step, next_time = following
            state = result.state
            k += 1
