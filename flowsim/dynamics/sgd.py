"""True discrete SGD: PyTorch's torch.optim.SGD, step by step, on seeded mini-batches."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, bad_value, check_field
from ..problem import Problem
from ..terms import StepMap, StepResult, Term
from .base import Dynamics, check_momentum


@dataclass
class SGDState:
    """θ_k and PyTorch's momentum buffer v_k (None before the first step or without momentum)."""

    theta: Tensor
    buffer: Tensor | None = None


#: how DiscreteSGD draws its batches: reshuffled each epoch (a DataLoader), or afresh every step
SAMPLINGS = ("epoch", "independent")


@dataclass(frozen=True)
class DiscreteSGD(Dynamics):
    """PyTorch's ``torch.optim.SGD`` (weight decay from the problem), mini-batches drawn
    without replacement each epoch in a seeded order (the last batch of an epoch may be
    smaller, as with a DataLoader); ``batch_size=None`` is full-batch gradient descent.

    ``sampling="independent"`` draws every step's batch afresh: S distinct examples, uniformly,
    independently of the other steps. That is the SGD the SGD-noise SDE (``SGDNoise``) models;
    epoch reshuffling ("epoch", the default) has far less noise over an epoch."""

    lr: float
    batch_size: int | None = None
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    sampling: str = "epoch"
    batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_field(self, "dynamics", "lr", minimum=0.0, exclusive_minimum=True)
        if self.batch_size is not None:
            check_field(self, "dynamics", "batch_size", integer=True, minimum=1)
        check_momentum(self)
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"dynamics.nesterov: got {self.nesterov!r}; expected true or false")
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ConfigError("dynamics.nesterov: Nesterov momentum needs momentum > 0 and dampening = 0")
        if self.sampling not in SAMPLINGS:
            raise bad_value("dynamics.sampling", self.sampling, f"one of {', '.join(SAMPLINGS)}")

    @property
    def time_step(self) -> float:
        """Δt = η(1 − d): the time one SGD step advances."""
        return self.lr * (1.0 - self.dampening)

    def coords(self) -> dict[str, float | int]:
        coords = super().coords()
        coords["batch_size"] = -1 if self.batch_size is None else self.batch_size
        return coords

    def check(self, problem: Problem) -> None:
        if self.batch_size is not None and self.batch_size > problem.n_examples:
            raise ConfigError(
                f"dynamics.batch_size: got {self.batch_size}; expected at most the {problem.n_examples} "
                "examples of the data (or None for full batch)"
            )

    @property
    def term_type(self) -> type[Term]:
        return StepMap

    def term(self, problem: Problem, theta0: Tensor) -> StepMap:
        """The step map of ``step`` from θ0 (no momentum buffer yet)."""
        return StepMap(init=SGDState(theta0.clone()), step=functools.partial(self.step, problem), members=problem.members)

    def batch(self, problem: Problem, k: int, seed: int) -> Tensor | None:
        """Example indices of step k: epoch e = k // batches_per_epoch is a permutation drawn
        from seed (seed, e), so the batch of any step is known without replaying the run
        (``sampling="independent"``: S distinct examples drawn from seed (seed, k))."""
        n = problem.n_examples
        if self.batch_size is None or self.batch_size >= n:
            return None
        if self.sampling == "independent":
            chosen = np.random.default_rng([seed, k]).choice(n, self.batch_size, replace=False)
            return torch.as_tensor(chosen, device=problem.device)
        per_epoch = -(-n // self.batch_size)
        epoch, j = divmod(k, per_epoch)
        return _epoch_order(n, seed, epoch, problem.device)[j * self.batch_size : (j + 1) * self.batch_size]

    def step(self, problem: Problem, state: SGDState, k: int, seed: int) -> StepResult:
        """One step of torch.optim.SGD from θ_k (StepResult: v_{k+1} moves θ_k to θ_{k+1} = θ_k − η v_{k+1})."""
        index = problem.batch_indices(self, k, seed)  # an ensemble with member seeds: one batch per member
        loss, grad = problem.loss_and_grad(state.theta, index)
        d_p = grad.add(state.theta, alpha=problem.weight_decay) if problem.weight_decay else grad
        buffer, velocity = None, None
        if self.momentum:
            if state.buffer is None:
                buffer = d_p.clone()
            else:
                buffer = state.buffer.mul(self.momentum).add_(d_p, alpha=1.0 - self.dampening)
            velocity = d_p.add(buffer, alpha=self.momentum) if self.nesterov else buffer
            d_p = velocity
        theta = state.theta.add(d_p, alpha=-self.lr)
        return StepResult(SGDState(theta, buffer), grad, velocity, loss, index is None)


@functools.lru_cache(maxsize=64)  # an ensemble with member seeds asks for one order per member
def _epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The order in which epoch `epoch` visits the n examples: a permutation seeded by (seed, epoch)."""
    return torch.as_tensor(np.random.default_rng([seed, epoch]).permutation(n), device=device)
