"""The observers a row is made of beside the laws: the sharpness (top Hessian eigenvalues,
warm-started from the last save point's subspace), evaluated per θ or per member."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..problem import Problem
from ..spectrum import HessianOperator, top_eigenpairs


def sharpness_tolerance(dtype: torch.dtype) -> float:
    """The sharpness observer's residual tolerance relative to |λ| (``flowsim.spectrum``): 1e-8,
    or 1000 ε of a dtype too coarse for it (float32: 1.2e-4), where the Hessian-vector product's
    own round-off would keep the residual above 1e-8."""
    return max(1e-8, 1000 * torch.finfo(dtype).eps)


def sharpness(problem: Problem, theta: Tensor, start: Tensor, k: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The top k eigenvalues of ∇²L at θ (P,), descending, by ``spectrum.top_eigenpairs`` started
    from `start` (P, b): (values (k,), the subspace to start from next (P, b), the Hessian-vector
    products taken, whether it converged), the last two as 0-d tensors (so members stack)."""
    found = top_eigenpairs(HessianOperator(problem, theta), start, k, tol=sharpness_tolerance(theta.dtype))
    return found.values, found.subspace, torch.tensor(found.matvecs), torch.tensor(found.converged)


def per_member(fn, theta: Tensor, *others: Tensor | None):
    """fn(θ, *others) for one θ (P,), or stacked over the members of a (K, P) batch (others are
    matched row by row; None stays None)."""
    if theta.ndim == 1:
        return fn(theta, *others)
    rows = [fn(t, *(None if o is None else o[i] for o in others)) for i, t in enumerate(theta)]
    if isinstance(rows[0], tuple):
        return tuple(torch.stack(column) for column in zip(*rows))
    return torch.stack(rows)


def all_finite(values: Iterable[Any]) -> bool:
    """Whether every number of the floating-point tensors among `values` is finite (one host
    synchronisation)."""
    peaks = [v.abs().amax() for v in values if isinstance(v, Tensor) and v.is_floating_point() and v.numel()]
    if not peaks:
        return True
    # max |x| is NaN or ∞ exactly when some x is (amax propagates NaN): fewer kernels than isfinite
    return math.isfinite(float(peaks[0] if len(peaks) == 1 else torch.stack(peaks).amax()))
