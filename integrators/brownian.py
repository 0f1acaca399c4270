"""Brownian increments as a pure function of (seed, path, step), and the fixed-step grid that
the SDE integrators share.

The contract (what makes a run replayable and resumable): over step k of a fixed-step solve,
path p moves with the increment

    ΔW_{p,k} = √h_k · ξ,   ξ ~ N(0, I_m) drawn by a generator seeded with (seed, p, k) alone,

where h_k is the step's length. Nothing else (the number of paths, the steps before, the save
grid's other intervals) changes it, so a run resumed at step k draws the same increments as the
uninterrupted run, and path p of a run with K paths is the same path in a run with K' > p paths.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def increment_seed(seed: int, path: int, step: int) -> int:
    """The 64-bit seed of path `path`'s increment over step `step` (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence((seed, path, step)).generate_state(1, np.uint64)[0])


def brownian_increments(
    seed: int, paths: int, step: int, size: int, dt: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """ΔW of step `step` for paths 0…paths−1: shape (paths, size), each row N(0, dt·I)."""
    rows = []
    for path in range(paths):
        generator = torch.Generator(device=device).manual_seed(increment_seed(seed, path, step))
        rows.append(torch.randn(size, generator=generator, dtype=dtype, device=device))
    return torch.stack(rows).mul_(math.sqrt(dt))


def fixed_steps(t0: float, t1: float, dt: float) -> tuple[int, float]:
    """(n, h): n = ⌈(t1 − t0)/dt⌉ equal steps h = (t1 − t0)/n ≤ dt that land on t1 exactly
    (h = dt whenever the save interval is a whole number of steps)."""
    n = max(1, math.ceil((t1 - t0) / dt - 1e-9))
    return n, (t1 - t0) / n
