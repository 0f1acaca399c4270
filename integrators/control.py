"""The step-size control every adaptive loop uses: the controller (RK's host and device loops,
Exponential, GaussLegendre), and the error ratio and first step of the loops that land on every
save time (Exponential, GaussLegendre)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepSizeController:
    """The next step size after a step of size h whose error ratio is r (the step is accepted
    when r ≤ 1; Hairer, Nørsett & Wanner I, §II.4, as torchdiffeq's ``_optimal_step_size``):

        h ← h · min(ifactor, max(safety · r^(−1/order), dfactor)),   dfactor → 1 when r < 1,
        h ← h · ifactor when r = 0,

    so an accepted step never shrinks the next and a rejected one never grows it."""

    order: int
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2

    def next(self, h: float, ratio: float) -> float:
        """The next step size, in Python floats (a host loop)."""
        if ratio == 0:
            return h * self.ifactor
        dfactor = 1.0 if ratio < 1 else self.dfactor
        return h * min(self.ifactor, max(self.safety / ratio ** (1.0 / self.order), dfactor))

    def landing(self, step: float, planned: float, ratio: float) -> tuple[bool, float]:
        """(accepted, the next step size) after a step of length `step` with error ratio `ratio`,
        in a loop that lands on every save time: `planned` was its step before it was cut
        short to land there, and a step cut short does not shrink the next one. A ratio that is
        not finite rejects the step and cuts it by dfactor."""
        accept = ratio <= 1.0  # False for NaN
        proposal = self.next(step, ratio) if math.isfinite(ratio) else step * self.dfactor
        return accept, max(planned, proposal) if accept and step < planned else proposal

    def next_on_device(self, h: Tensor, ratio: Tensor) -> Tensor:
        """The same as 0-d float64 tensors on the device: no host synchronisation."""
        floor = torch.where(ratio < 1, ratio.new_ones(()), ratio.new_full((), self.dfactor))
        factor = (self.safety / ratio.pow(1.0 / self.order)).maximum(floor)
        return h * torch.where(ratio == 0, self.ifactor, factor.clamp(max=self.ifactor))


def error_ratio(
    error: Tensor, y: Tensor, y_new: Tensor, rtol: float, atol: float, norm: Callable[[Tensor], Tensor] | None = None
) -> float:
    """‖e / (atol + rtol·max(|y|, |y_new|))‖: the RMS over every entry, or `norm` (a term's own,
    e.g. an ensemble's worst member); the step is accepted when it is at most 1."""
    scaled = error / torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
    return float(norm(scaled) if norm is not None else scaled.square().mean().sqrt())


def initial_step(
    y: Tensor, f0: Tensor, span: float, rtol: float, atol: float, norm: Callable[[Tensor], Tensor] | None = None
) -> float:
    """Hairer's first guess 0.01·|y|/|f(y)| in the error norm's scale (the RMS, or `norm` as in
    ``error_ratio``), at most `span`."""
    scale = y.abs().mul(rtol).add_(atol)
    size = norm if norm is not None else (lambda x: x.square().mean().sqrt())
    d0 = float(size(y / scale))
    d1 = float(size(f0 / scale))
    guess = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    return min(guess, span)


__all__ = ["StepSizeController", "error_ratio", "initial_step"]
