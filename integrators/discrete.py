"""The discrete step loop: true SGD, step by step, saving at the grid's steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from flowsim.terms import StepMap

from .base import Integrator, SaveGrid, SavePoint


@dataclasses.dataclass(frozen=True)
class Discrete(Integrator):
    """Runs a step map (DiscreteSGD) exactly: state_{k+1} = step(state_k, k, seed). At a save
    step k it records θ_k with the batch gradient and velocity of step k (those that move θ_k).
    It has no order: the step map is the dynamics itself.

    Its checkpoint after save step k is ``{"index", "step": k + 1, "state"}``, the fields of the
    state dataclass after step k (θ_{k+1}, the momentum buffer); the batches are a pure
    function of (seed, step), so nothing else is needed to go on."""

    term = StepMap
    order = None

    def solve(self, term: StepMap, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None) -> Iterator[SavePoint]:
        state = term.init
        first, k = 0, 0
        if start is not None:
            first, k = start["index"] + 1, start["step"]
            state = dataclasses.replace(state, **start["state"])
        for index in range(first, len(grid.times)):
            result = term.step(state, k, seed)
            while k < grid.steps[index]:
                state, k = result.state, k + 1
                result = term.step(state, k, seed)
            loss = result.batch_loss if result.full_batch else None
            fields = {f.name: getattr(result.state, f.name) for f in dataclasses.fields(result.state)}
            checkpoint = {"index": index, "step": k + 1, "state": fields}
            yield SavePoint(grid.times[index], k, k + 1, state.theta, result.grad, result.velocity, loss, checkpoint)
            state, k = result.state, k + 1
