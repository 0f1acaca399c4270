"""Euler–Maruyama for the SGD-noise SDE with drift and noise in one backward pass per path."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from flowsim.errors import check_field
from flowsim.terms import Noise

from .base import Integrator, SaveGrid, SavePoint, check_fixed_step
from .brownian import brownian_increments, fixed_steps


@dataclass(frozen=True)
class FusedEulerMaruyama(Integrator):
    """θ_{k+1} = θ_k + b(θ_k) h + √η G(θ_k) ΔW_k on every path, with steps h ≤ `dt` that land
    on every save time (h = dt when save_every is a whole number of steps). Weak order 1.

    With exact noise a step is one backward pass of the re-weighted loss Σ_i a_i ℓ_i,
    a_i = −h/N + √(η c/(S N))(ΔW_i − mean ΔW): the cost of one full-data gradient
    (the term's ``increment``). ΔW_k of path p is a pure function of (seed, p, k)
    (``flowsim.integrators.brownian``), so a run is replayed, or resumed at a save step, exactly.
    Its `order` is the weak order; the strong order is ½ (1 without noise).
    """

    dt: float
    term = Noise
    order = 1

    def __post_init__(self) -> None:
        check_field(self, "integrator", "dt", minimum=0.0, exclusive_minimum=True)

    def check_grid(self, grid: SaveGrid) -> None:
        check_fixed_step("integrator.dt", self.dt, grid, "a longer step would be cut to the interval")

    def solve(self, term: Noise, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None) -> Iterator[SavePoint]:
        """Its checkpoint at save index i is ``{"index": i, "step": k, "theta": θ_k}``: the
        increments are a pure function of (seed, path, step), so nothing else is needed."""
        size = term.noise_size
        if start is None:
            theta, k, first = term.y0.expand(term.paths, -1).clone(), 0, 1
            yield SavePoint(grid.times[0], 0, 0, theta, checkpoint={"index": 0, "step": 0, "theta": theta})
        else:
            theta, k, first = start["theta"], start["step"], start["index"] + 1
        for index in range(first, len(grid.times)):
            n, h = fixed_steps(grid.times[index - 1], grid.times[index], self.dt)
            for _ in range(n):
                dw = brownian_increments(seed, term.paths, k, size, h, theta.dtype, theta.device)
                theta = torch.stack([term.increment(th, h, w) for th, w in zip(theta, dw)])
                k += 1
            yield SavePoint(grid.times[index], k, k, theta, checkpoint={"index": index, "step": k, "theta": theta})
