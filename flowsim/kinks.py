"""Kinks: the branches a network's non-smooth operations take, recorded and replayed.

ReLU, leaky ReLU and max-pooling make the loss piecewise smooth and its gradient
discontinuous: it jumps where a pre-activation changes sign or a pool's maximum moves. With
every branch fixed (the masks x > 0, the pools' argmax), the network is one smooth *piece*:
relu(x) = x·m, leaky_relu(x) = x·(m + s(1 − m)), max_pool(x) = x at the recorded indices,
defined for every θ and equal to the network (value, gradient, Hessian) where those branches
are the ones taken. A piece keeps every symmetry the laws come from: the masks and indices do
not depend on θ, and x·m is as positively homogeneous as relu, so a rescaling, a translation of
the logits or a normalised layer's scale leaves a piece as invariant as the network; each
law's gradient is then orthogonal to the piece's loss gradient at every θ.

An implicit integrator whose stage equations have no solution across a jump (the iterates
cycle between two branches) solves them on a piece instead: ``Branches.record()`` notes the
branch of every such call in a forward (and backward) pass, in call order;
``Branches.replay()`` makes the same calls take those branches at any θ (in every forward
pass it encloses). Other non-smooth
operations (abs, clamp, maximum, hardtanh) are evaluated as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .errors import ModelError

RELU = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
LEAKY = {F.leaky_relu, F.leaky_relu_}
#: max-pools and their numbers of spatial dimensions
POOLS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
#: max_pool's arguments before return_indices (input, kernel_size, stride, padding, dilation, ceil_mode)
POOL_ARGS = 6


class Branches:
    """The branches of one forward pass's kinks (module docstring): ``record()`` them, then
    ``replay()`` them at another θ. Empty until recorded; ``empty`` says whether the recorded
    pass met any kink."""

    def __init__(self) -> None:
        self.taken: list[Tensor] = []

    @property
    def empty(self) -> bool:
        return not self.taken

    def same(self, other: Branches) -> bool:
        """Whether two recordings took the same branches everywhere."""
        return len(self.taken) == len(other.taken) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.taken, other.taken)
        )

    @contextmanager
    def record(self) -> Iterator[Branches]:
        self.taken = []
        with _Mode(self, replay=False):
            yield self

    @contextmanager
    def replay(self) -> Iterator[Branches]:
        with _Mode(self, replay=True):
            yield self


class _Mode(TorchFunctionMode):
    """Intercepts relu, leaky_relu and max_pool{1,2,3}d: notes their branches, or takes the
    noted ones (in call order; the forward passes of one record and of every replay meet the
    same calls)."""

    def __init__(self, branches: Branches, replay: bool) -> None:
        super().__init__()
        self.branches, self.replay, self.calls = branches, replay, 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in RELU or func in LEAKY:
            x = args[0]
            if func in LEAKY:
                slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
                factor = lambda m: torch.where(m, 1.0, slope).to(x.dtype)
            else:
                factor = lambda m: m.to(x.dtype)
            if not self.replay:
                self.branches.taken.append(x.detach() > 0)
                return func(*args, **kwargs)
            out = x * factor(self._next(lambda taken: taken.shape == x.shape))
            inplace = func in (F.relu_, torch.relu_, Tensor.relu_, F.leaky_relu_) or kwargs.get("inplace", False)
            return x.copy_(out) if inplace else out
        if func in POOLS:
            wanted = kwargs.pop("return_indices", args[POOL_ARGS] if len(args) > POOL_ARGS else False)
            args = args[:POOL_ARGS]
            x = args[0]
            if not self.replay:
                out, index = func(*args, return_indices=True, **kwargs)
                self.branches.taken.append(index)
            else:
                lead = x.dim() - POOLS[func]  # batch and channel dimensions
                index = self._next(lambda taken: taken.shape[:lead] == x.shape[:lead])
                out = x.flatten(lead).gather(lead, index.flatten(lead)).view(index.shape)
            return (out, index) if wanted else out
        return func(*args, **kwargs)

    def _next(self, fits: Callable[[Tensor], bool]) -> Tensor:
        """The next recorded branch, which must `fit` the call replaying it."""
        taken = self.branches.taken
        self.calls %= max(len(taken), 1)  # each forward pass under one replay starts over
        if not taken or not fits(taken[self.calls]):
            raise ModelError(
                "model: its ReLU/max-pool calls differ between two evaluations (data-dependent control flow?), "
                "so their branches cannot be replayed; use an explicit integrator"
            )
        self.calls += 1
        return taken[self.calls - 1]


__all__ = ["Branches"]
