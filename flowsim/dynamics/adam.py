"""True discrete Adam: PyTorch's torch.optim.Adam (or AdamW), step by step, on DiscreteSGD's
seeded mini-batches."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import bad_value, check_field, check_flag
from ..problem import Problem
from ..terms import StepMap, StepResult, Term
from .base import Dynamics
from .sgd import SAMPLINGS, DiscreteSGD


@dataclass
class AdamState:
    """θ_k and Adam's moment estimates m_k (``exp_avg``) and s_k (``exp_avg_sq``), zero at k = 0;
    the step count is the loop's k."""

    theta: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor


@dataclass(frozen=True)
class DiscreteAdam(Dynamics):
    """PyTorch's ``torch.optim.Adam`` (Kingma & Ba 2015), its single-tensor path, with the
    problem's weight decay λ; step k = 0, 1, … on the batch B_k, with n = k + 1:

        g = ĝ_B + λθ_k,  m ← β₁m + (1−β₁)g,  s ← β₂s + (1−β₂)g²,
        θ_{k+1} = θ_k − η (m/(1−β₁ⁿ)) / (√s/√(1−β₂ⁿ) + ε)

    ``decoupled=True`` is ``torch.optim.AdamW`` (Loshchilov & Hutter 2019): g = ĝ_B and
    θ_k(1 − ηλ) in place of θ_k in the update. Time t = k·η; the recorded velocity is v_{k+1}
    with θ_{k+1} = θ_k − η v_{k+1}. Batches are DiscreteSGD's (same `batch_size` and `sampling`,
    same seeds): ``batch_size=None`` is full batch."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    batch_size: int | None = None
    sampling: str = "epoch"
    decoupled: bool = False
    batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_field(self, "dynamics", "lr", minimum=0.0, exclusive_minimum=True)
        for name in ("beta1", "beta2"):
            check_field(self, "dynamics", name)
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad_value(f"dynamics.{name}", getattr(self, name), "a number in [0, 1) (the moments' decay rate)")
        check_field(self, "dynamics", "eps", minimum=0.0, exclusive_minimum=True)
        if self.batch_size is not None:
            check_field(self, "dynamics", "batch_size", integer=True, minimum=1)
        check_flag("dynamics.decoupled", self.decoupled)
        if self.sampling not in SAMPLINGS:
            raise bad_value("dynamics.sampling", self.sampling, f"one of {', '.join(SAMPLINGS)}")

    @functools.cached_property
    def _sampler(self) -> DiscreteSGD:
        """What draws the batches: DiscreteSGD of the same batch_size and sampling."""
        return DiscreteSGD(self.lr, self.batch_size, sampling=self.sampling)

    @property
    def time_step(self) -> float:
        """Δt = η: the time one Adam step advances."""
        return self.lr

    def coords(self) -> dict[str, float | int]:
        coords = super().coords()
        coords["batch_size"] = -1 if self.batch_size is None else self.batch_size
        return coords

    def check(self, problem: Problem) -> None:
        self._sampler.check(problem)

    @property
    def term_type(self) -> type[Term]:
        return StepMap

    def term(self, problem: Problem, theta0: Tensor) -> StepMap:
        """The step map of ``step`` from θ0, with zero moments."""
        init = AdamState(theta0.clone(), torch.zeros_like(theta0), torch.zeros_like(theta0))
        return StepMap(init=init, step=functools.partial(self.step, problem), members=problem.members)

    def batch(self, problem: Problem, k: int, seed: int) -> Tensor | None:
        """Example indices of step k: DiscreteSGD's (``DiscreteSGD.batch``)."""
        return self._sampler.batch(problem, k, seed)

    def step(self, problem: Problem, state: AdamState, k: int, seed: int) -> StepResult:
        """Step k of torch.optim.Adam from θ_k, in the order of torch's ``_single_tensor_adam``
        (foreach=False), out of place so that an earlier state is never changed."""
        index = problem.batch_indices(self, k, seed)  # an ensemble with member seeds: one batch per member
        loss, grad = problem.loss_and_grad(state.theta, index)
        lr, lam, n = self.lr, problem.weight_decay, float(k + 1)
        theta, g = state.theta, grad
        if lam and self.decoupled:
            theta = theta.mul(1 - lr * lam)
        elif lam:
            g = grad.add(theta, alpha=lam)
        exp_avg = state.exp_avg.lerp(g, 1 - self.beta1)
        exp_avg_sq = state.exp_avg_sq.mul(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        bias_correction1 = 1 - self.beta1**n
        bias_correction2_sqrt = (1 - self.beta2**n) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        theta = theta.addcdiv(exp_avg, denom, value=-(lr / bias_correction1))
        velocity = exp_avg.div(denom).div_(bias_correction1)
        if lam and self.decoupled:
            velocity.add_(state.theta, alpha=lam)
        return StepResult(AdamState(theta, exp_avg, exp_avg_sq), grad, velocity, loss, index is None)
