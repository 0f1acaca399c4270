"""The step-size controller every adaptive loop uses (RK's host and device loops, Exponential)."""

from __future__ import annotations

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

    def next_on_device(self, h: Tensor, ratio: Tensor) -> Tensor:
        """The same as 0-d float64 tensors on the device: no host synchronisation."""
        floor = torch.where(ratio < 1, ratio.new_ones(()), ratio.new_full((), self.dfactor))
        factor = (self.safety / ratio.pow(1.0 / self.order)).maximum(floor)
        return h * torch.where(ratio == 0, self.ifactor, factor.clamp(max=self.ifactor))


__all__ = ["StepSizeController"]
