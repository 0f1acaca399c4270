"""The heavy-ball flow: the continuous model of GD with momentum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, check_field
from ..problem import Problem
from ..terms import Semilinear, Term, VectorField
from .base import SemilinearDynamics, check_momentum, modified_gradient


MOMENTUM_STARTS = ("rest", "matched")
MOMENTUM_FORMS = ("second_order", "reduced")


@dataclass(frozen=True)
class MomentumFlow(SemilinearDynamics):
    """The continuous model of heavy-ball GD (``DiscreteSGD(lr, momentum=β, dampening=d)``
    with full batches), with h = η(1−d) the time one step advances:

        (h/2)(1+β) θ'' + (1−β) θ' = −g,   i.e.   θ'' + τθ' = −g/m,
        m = h(1+β)/2 (``mass``),  τ = (1−β)/m = 2(1−β)/(h(1+β)) (``damping``).

    Derivation: PyTorch's buffer scaled by 1/(1−d), w_k = v_k/(1−d), obeys w_{k+1} = βw_k + g_k
    and θ_{k+1} = θ_k − h w_{k+1}, so θ_{k+1} − θ_k = β(θ_k − θ_{k−1}) − h g_k: heavy ball with
    step h. For a smooth θ(t), t = kh, the left side is (1−β)hθ' + (1+β)(h²/2)θ'' + O(h³).
    Dampening only shortens the time step.

    ``form="second_order"`` (default): the state is one flat vector y = (θ, v), v = θ', moved by
    θ' = v, v' = −τv − (λθ + ĝ)/m: linear part M = [[0, 1], [−λ/m, −τ]], stiff for small η
    (τ ∝ 1/η), nonlinear part (0, −ĝ/m). Its default integrator, ``integrators.Exponential``,
    solves M exactly, so its steps follow the slow motion, not 1/τ. The record's
    ``velocity_sq`` is the law form of v = θ' (SGD's v_{k+1} ≈ −(1−d)θ').

    ``start``: "rest" is v(0) = 0. "matched" makes the flow's start match SGD's first step,
    θ_1 = θ_0 − η g_0 (PyTorch's first buffer is undampened), and the transient it starts.
    With g frozen at g_0, SGD moves by θ_n − θ_0 = −nh g_0/(1−β) − h(w_1 − g_0/(1−β))(1−βⁿ)/(1−β),
    w_1 = g_0/(1−d), and the flow by θ(t) − θ_0 = −t g_0/(1−β) + (v(0) + g_0/(1−β))(1−e^{−τt})/τ.
    Both settle on the same line plus an offset; equal offsets give

        v(0) = −(1+d) / ((1+β)(1−d)) · g_0    (−g_0/(1+β) without dampening),

    which removes the O(h) offset that "rest" leaves (its measured errors against heavy-ball GD:
    docs, "Dynamics"; tests/test_modified_momentum.py).

    ``form="reduced"``: the first-order slow-manifold flow with its O(h) correction, the
    modified equation of heavy ball (found from (1−β)f + (1+β)(h/2)f′f = −g for θ' = f):

        θ' = −∇L̃/(1−β),  L̃ = L_λ + (κ/2)|∇L_λ|²,  κ = h(1+β)/(2(1−β)²),

    one Hessian-vector product per evaluation, no velocity, no stiffness; it cannot represent
    SGD's momentum transient, so it keeps an O(h) lag behind heavy-ball GD."""

    lr: float
    momentum: float
    dampening: float = 0.0
    start: str = "rest"
    form: str = "second_order"

    def __post_init__(self) -> None:
        check_field(self, "dynamics", "lr", minimum=0.0, exclusive_minimum=True)
        check_momentum(self)
        if self.start not in MOMENTUM_STARTS:
            raise ConfigError(f"dynamics.start: got {self.start!r}; expected one of {', '.join(MOMENTUM_STARTS)}")
        if self.form not in MOMENTUM_FORMS:
            raise ConfigError(f"dynamics.form: got {self.form!r}; expected one of {', '.join(MOMENTUM_FORMS)}")
        if self.form == "reduced" and self.start != "rest":
            raise ConfigError(
                f"dynamics.start: got {self.start!r}; the reduced form has no velocity to start, "
                'so it takes only start="rest" (use form="second_order")'
            )

    @property
    def time_step(self) -> float:
        """h = η(1 − d): the time one SGD step advances."""
        return self.lr * (1.0 - self.dampening)

    @property
    def mass(self) -> float:
        """m = h(1+β)/2."""
        return 0.5 * self.time_step * (1.0 + self.momentum)

    @property
    def damping(self) -> float:
        """τ = (1−β)/m, the damping coefficient of θ'' + τθ' = −g/m."""
        return (1.0 - self.momentum) / self.mass

    @property
    def term_type(self) -> type[Term]:
        """second_order: a Semilinear term (its default integrator, the exponential one, is exact
        on the stiff damping); reduced: a plain VectorField."""
        return VectorField if self.form == "reduced" else Semilinear

    def _parts(self, problem: Problem) -> dict[str, Any]:
        return {} if self.form == "reduced" else super()._parts(problem)

    def initial_state(self, problem: Problem, theta0: Tensor) -> Tensor:
        if self.form == "reduced":
            return theta0.clone()
        y = torch.zeros(2 * theta0.numel(), dtype=theta0.dtype, device=theta0.device)
        theta, velocity = self.split(problem, y)
        theta.copy_(theta0)
        if self.start == "matched":
            _, grad = problem.loss_and_grad(theta0)
            g0 = grad.add(theta0, alpha=problem.weight_decay) if problem.weight_decay else grad
            velocity.copy_(g0).mul_(-(1.0 + self.dampening) / ((1.0 + self.momentum) * (1.0 - self.dampening)))
        return y

    def split(self, problem: Problem, y: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.form == "reduced":
            return y, None
        theta, velocity = y.view(2, -1)
        return theta, velocity

    def linear_part(self, problem: Problem) -> Tensor:
        if self.form == "reduced":
            return torch.zeros(1, 1, dtype=torch.float64)
        return torch.tensor([[0.0, 1.0], [-problem.weight_decay / self.mass, -self.damping]], dtype=torch.float64)

    def nonlinear_part(self, problem: Problem, t: Tensor, y: Tensor) -> Tensor:
        if self.form == "reduced":
            kappa = self.time_step * (1.0 + self.momentum) / (2.0 * (1.0 - self.momentum) ** 2)
            return modified_gradient(problem, y, kappa).mul_(-1.0 / (1.0 - self.momentum))
        theta, _ = self.split(problem, y)
        _, grad = problem.loss_and_grad(theta)
        out = torch.zeros_like(y)
        out.view(2, -1)[1].copy_(grad).mul_(-1.0 / self.mass)
        return out
