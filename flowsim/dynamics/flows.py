"""Gradient flow and the first-order modified flow of gradient descent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..errors import check_field
from ..problem import Problem
from .base import ContinuousDynamics, modified_gradient


@dataclass(frozen=True)
class GradientFlow(ContinuousDynamics):
    """θ' = −∇L_λ(θ) = −(ĝ(θ) + λθ), on the full data."""

    batched: ClassVar[bool] = True

    def derivative(self, problem: Problem, t: Tensor, y: Tensor) -> Tensor:
        _, grad = problem.loss_and_grad(y)
        if problem.weight_decay:
            grad = grad.add(y, alpha=problem.weight_decay)
        return grad.neg_()

    def jvp(self, problem: Problem) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        """J v = −(H + λ)v, H = ∇²L by double backward (``Problem.hvp``; one θ, so None for
        an ensemble's (K, P) batch)."""
        if problem.members is not None:
            return None
        return lambda t, y, v: problem.hvp(y, v).add_(v, alpha=problem.weight_decay).neg_()


@dataclass(frozen=True)
class ModifiedFlow(ContinuousDynamics):
    """The first-order modified flow of gradient descent with learning rate η (implicit
    gradient regularisation, Barrett & Dherin 2021):

        θ' = −∇L̃,  L̃ = L_λ + (η/4)|∇L_λ|²,  so  θ' = −g − (η/2)(H + λ)g,  g = ĝ + λθ,

    with H = ∇²L the data-loss Hessian: weight decay is inside the modified loss. GD's
    iterates stay within O(η²) of it at a fixed time (gradient flow: O(η)). One gradient and
    one Hessian-vector product (double backward) per evaluation.

    Under it a translation law decays as s' = −(λ + ηλ²/2)s and a scale law obeys
    h' = −(2λ + ηλ²)h + η|ĝ_A|² (ĝ the data-loss gradient, ``grad_sq`` in the record): with
    λ = 0, translation laws are conserved and d|θ_A|²/dt = η|ĝ_A|² exactly."""

    lr: float
    batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_field(self, "dynamics", "lr", minimum=0.0, exclusive_minimum=True)

    def derivative(self, problem: Problem, t: Tensor, y: Tensor) -> Tensor:
        return modified_gradient(problem, y, 0.5 * self.lr).neg_()
