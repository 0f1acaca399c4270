"""WHAT moves: the continuous models of training and true discrete SGD.

Time is t = k·η(1−d) for step k of SGD (learning rate η, dampening d); L_λ = L + (λ/2)|θ|²
with λ the problem's weight decay, and g = ĝ + λθ with ĝ the data-loss gradient.

| dynamics      | equation                                                             |
|---------------|----------------------------------------------------------------------|
| GradientFlow  | θ' = −g(θ)                                                           |
| DiscreteSGD   | v ← βv + (1−d)(ĝ_B + λθ)  (v ← ĝ_B + λθ on the first step);           |
|               | θ ← θ − η v  (Nesterov: θ ← θ − η(ĝ_B + λθ + βv)); PyTorch's SGD     |

A continuous dynamics gives an ODE integrator ``initial_state``, ``derivative`` and ``split``
(state → θ and velocity); a discrete one gives the step loop ``initial_state`` and ``step``.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, check_number
from .problem import Problem


class Dynamics(ABC):
    """Base class: hyper-parameters of one dynamics (frozen dataclasses)."""

    continuous: ClassVar[bool]

    @property
    def name(self) -> str:
        return type(self).__name__

    def describe(self) -> dict[str, Any]:
        """JSON-ready hyper-parameters (the Dataset's ``dynamics`` attribute)."""
        return {"name": self.name, **asdict(self)}

    def coords(self) -> dict[str, float | int]:
        """Hyper-parameters that vary between runs, stored as scalar coords of the record."""
        return {k: v for k, v in asdict(self).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def check(self, problem: Problem) -> None:
        """Raise ConfigError if these hyper-parameters cannot run on `problem`."""

    @abstractmethod
    def default_integrator(self):
        """The integrator used when ``simulate(integrator=None)``."""


class ContinuousDynamics(Dynamics):
    """θ (and possibly a velocity) as one flat state y, moved by y' = derivative(t, y)."""

    continuous = True

    def initial_state(self, problem: Problem, theta0: Tensor) -> Tensor:
        return theta0.clone()

    @abstractmethod
    def derivative(self, problem: Problem, t: Tensor, y: Tensor) -> Tensor:
        """y'(t)."""

    def split(self, problem: Problem, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """(θ, velocity or None) as views of the state."""
        return y, None

    def default_integrator(self):
        """dopri5 at rtol = atol = 1e-6: ReLU-type networks make the flow non-smooth, and an
        adaptive solver pays for every kink it resolves; tighten it for accuracy work."""
        from flowsim.integrators import ODE

        return ODE("dopri5", rtol=1e-6, atol=1e-6)


@dataclass(frozen=True)
class GradientFlow(ContinuousDynamics):
    """θ' = −∇L_λ(θ) = −(ĝ(θ) + λθ), on the full data."""

    def derivative(self, problem: Problem, t: Tensor, y: Tensor) -> Tensor:
        _, grad = problem.loss_and_grad(y)
        if problem.weight_decay:
            grad = grad.add(y, alpha=problem.weight_decay)
        return grad.neg_()


@dataclass
class SGDState:
    """θ_k and PyTorch's momentum buffer v_k (None before the first step or without momentum)."""

    theta: Tensor
    buffer: Tensor | None = None


@dataclass
class StepResult:
    """What step k used and made: ĝ_k on its batch, the velocity v_{k+1} that moves θ_k to
    θ_{k+1} (θ_{k+1} = θ_k − η v_{k+1}; None without momentum), the batch loss, and whether the
    batch was the full data (then that loss is L(θ_k))."""

    state: SGDState
    grad: Tensor
    velocity: Tensor | None
    batch_loss: Tensor
    full_batch: bool


@dataclass(frozen=True)
class DiscreteSGD(Dynamics):
    """PyTorch's ``torch.optim.SGD`` (weight decay from the problem), mini-batches drawn
    without replacement each epoch in a seeded order (the last batch of an epoch may be
    smaller, as with a DataLoader); ``batch_size=None`` is full-batch gradient descent."""

    lr: float
    batch_size: int | None = None
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    continuous: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_number("dynamics.lr", self.lr, minimum=0.0, exclusive_minimum=True)
        if self.batch_size is not None:
            check_number("dynamics.batch_size", self.batch_size, integer=True, minimum=1)
        check_number("dynamics.momentum", self.momentum, minimum=0.0, maximum=1.0)
        check_number("dynamics.dampening", self.dampening, minimum=0.0, maximum=1.0)
        if self.dampening >= 1.0:
            raise ConfigError(f"dynamics.dampening: got {self.dampening}; expected a number in [0, 1)")
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"dynamics.nesterov: got {self.nesterov!r}; expected true or false")
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ConfigError("dynamics.nesterov: Nesterov momentum needs momentum > 0 and dampening = 0")

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

    def default_integrator(self):
        from flowsim.integrators import Discrete

        return Discrete()

    def initial_state(self, problem: Problem, theta0: Tensor) -> SGDState:
        return SGDState(theta0.clone())

    def batch(self, problem: Problem, k: int, seed: int) -> Tensor | None:
        """Example indices of step k: epoch e = k // batches_per_epoch is a permutation drawn
        from seed (seed, e), so the batch of any step is known without replaying the run."""
        n = problem.n_examples
        if self.batch_size is None or self.batch_size >= n:
            return None
        per_epoch = -(-n // self.batch_size)
        epoch, j = divmod(k, per_epoch)
        return _epoch_order(n, seed, epoch, problem.device)[j * self.batch_size : (j + 1) * self.batch_size]

    def step(self, problem: Problem, state: SGDState, k: int, seed: int) -> StepResult:
        """One step of torch.optim.SGD from θ_k."""
        index = self.batch(problem, k, seed)
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


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The order in which epoch `epoch` visits the n examples: a permutation seeded by (seed, epoch)."""
    return torch.as_tensor(np.random.default_rng([seed, epoch]).permutation(n), device=device)


#: the dynamics a config may name
DYNAMICS: dict[str, type[Dynamics]] = {"GradientFlow": GradientFlow, "DiscreteSGD": DiscreteSGD}
