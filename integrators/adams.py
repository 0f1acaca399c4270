"""Adams–Bashforth: the explicit linear multistep methods of orders 1–4, at a fixed step."""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from flowsim.errors import ConfigError, check_field
from flowsim.terms import VectorField

from .base import Integrator, SaveGrid, SavePoint, check_fixed_step, not_finite
from .rk import RK
from .tableaus import TABLEAUS

#: b_j of the k-step method, y_{n+1} = y_n + h Σ_j b_j f_{n−j} (Hairer, Nørsett & Wanner I, §III.1, Table 1.1)
COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@dataclass(frozen=True, kw_only=True)
class AdamsBashforth(Integrator):
    """The explicit k-step Adams–Bashforth method on a continuous dynamics, at a fixed step h
    (Hairer, Nørsett & Wanner, *Solving ODEs I*, §III.1)::

        y_{n+1} = y_n + h Σ_{j=0}^{k−1} b_j f(t_{n−j}, y_{n−j})

        k = 1: b = (1)                         (explicit Euler)
        k = 2: b = (3, −1)/2
        k = 3: b = (23, −16, 5)/12
        k = 4: b = (55, −59, 37, −9)/24

    Order k. Cost: one evaluation of the field per step, after a start-up of k − 1 steps
    (y_1 … y_{k−1}) by the fixed-step ``RK`` method of order ≥ k with the fewest stages
    (midpoint, heun3, rk4), s evaluations a step, and the k − 1 history values f_0 … f_{k−2} at
    their start-up points. Its stability interval on the real axis is short: h·λ ≤ 2, 1, 6/11,
    3/10 for k = 1 … 4 (λ the flow's stiffest rate, e.g. the loss Hessian's largest eigenvalue
    for gradient flow).

    **Arguments**

    - `order`: k, 1 … 4.
    - `dt`: the step h. It must divide every save interval (save_every, and the last interval
      to t1): a multistep method cannot shorten a step to land on a save time.

    Its checkpoint after a save point holds the step n, y_n, the past derivatives
    f_{n−1} … f_{n−k+1}, the start-up values not yet reached and the evaluation count; the time
    is a function of n and the grid, so a resumed run is the uninterrupted one bit for bit.

    **Raises** ConfigError for a bad `order` or `dt`; while solving, IntegrationError when the
    state becomes NaN/Inf.
    """

    order: int = 4
    dt: float
    term: ClassVar[type[VectorField]] = VectorField

    def __post_init__(self) -> None:
        check_field(self, "integrator", "order", integer=True, minimum=1, maximum=max(COEFFICIENTS))
        check_field(self, "integrator", "dt", minimum=0.0, exclusive_minimum=True)

    @property
    def starter(self) -> str:
        """The start-up method: the fixed-step RK tableau of order ≥ k with the fewest stages."""
        fixed = [t for t in TABLEAUS.values() if not t.adaptive and t.order >= self.order]
        return min(fixed, key=lambda t: t.stages).name

    def check_grid(self, grid: SaveGrid) -> None:
        self.interval_steps(grid)

    def interval_steps(self, grid: SaveGrid) -> list[int]:
        """m_i = (t_{i+1} − t_i)/dt, the steps of each save interval; ConfigError naming
        integrator.dt unless each is a whole number. The times (k·save_every, t1) and dt are
        each within a rounding of the intended values, so the computed ratio is within
        ε(|t_i| + |t_{i+1}|)/dt + 2ε·ratio of it; the check allows 4× that."""
        check_fixed_step("integrator.dt", self.dt, grid, "a multistep method cannot shorten a step to land on a save time")
        eps, counts = sys.float_info.epsilon, []
        for a, b in zip(grid.times, grid.times[1:]):
            ratio = (b - a) / self.dt
            m = round(ratio)
            if m < 1 or abs(ratio - m) > 4 * eps * ((abs(a) + abs(b)) / self.dt + 2 * ratio):
                raise ConfigError(
                    f"integrator.dt: got {self.dt:g}, which is {ratio:.6g} steps of the save interval from t={a:g} to "
                    f"t={b:g}; expected a step that divides every save interval (save_every, and the last one to t1), "
                    f"e.g. dt = {(b - a) / max(m, 1):.6g}"
                )
            counts.append(m)
        return counts

    def solve(self, term: VectorField, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None) -> Iterator[SavePoint]:
        """Step n of save interval i starts at t_i + j·dt (its j-th step; t_i exactly at j = 0)."""
        counts = self.interval_steps(grid)
        k, h, b = self.order, self.dt, COEFFICIENTS[self.order]
        if start is None:
            y, n, past, first = term.y0, 0, [], 1
            ahead, nfe = self._start_up(term, grid, seed, counts)
            theta, velocity = term.split(y)
            checkpoint = {"index": 0, "step": n, "nfe": nfe, "y": y, "past": past, "ahead": ahead}
            yield SavePoint(grid.times[0], n, nfe, theta, velocity=velocity, checkpoint=checkpoint)
        else:
            y, n, past, first = start["y"], start["step"], list(start["past"]), start["index"] + 1
            ahead, nfe = list(start["ahead"]), start["nfe"]
        for index in range(first, len(grid.times)):
            t_start = grid.times[index - 1]
            for j in range(counts[index - 1]):
                t = t_start + j * h
                f = term.f(torch.tensor(t, dtype=torch.float64), y)
                nfe += 1
                if ahead:  # a start-up step: y_{n+1} is known, f_n joins the history
                    y, ahead = ahead[0], ahead[1:]
                else:
                    increment = f * b[0]
                    for b_j, f_j in zip(b[1:], past):
                        increment.add_(f_j, alpha=b_j)
                    y = torch.add(y, increment, alpha=h)
                if not torch.isfinite(y).all():
                    raise not_finite("AdamsBashforth", t, h)
                past, n = [f, *past][: k - 1], n + 1
            theta, velocity = term.split(y)
            # new lists and tensors every step: the checkpoint's are never written again
            checkpoint = {"index": index, "step": n, "nfe": nfe, "y": y, "past": past, "ahead": ahead}
            yield SavePoint(grid.times[index], n, nfe, theta, velocity=velocity, checkpoint=checkpoint)

    def _start_up(self, term: VectorField, grid: SaveGrid, seed: int, counts: list[int]) -> tuple[list[Tensor], int]:
        """(y_1 … y_m, the evaluations made) for the m = min(k − 1, all steps) start-up steps,
        by ``RK(starter)`` on the times of the run's first m steps (counted in the first save
        point's nfe)."""
        m = min(self.order - 1, sum(counts))
        if m == 0:
            return [], 0
        starts = (a + j * self.dt for a, steps in zip(grid.times, counts) for j in range(steps))
        times = list(itertools.islice(starts, m + 1))
        if len(times) == m:  # the run is the start-up: its last step ends at t1
            times.append(grid.times[-1])
        whole = dataclasses.replace(term, split=lambda y: (y, None))  # RK's save points carry the whole state
        points = list(RK(self.starter, compile=False).solve(whole, SaveGrid(tuple(times)), seed))
        return [p.theta for p in points[1:]], points[-1].nfe


__all__ = ["AdamsBashforth", "COEFFICIENTS"]
