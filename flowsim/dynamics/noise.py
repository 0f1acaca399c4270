"""The SGD-noise SDE (stochastic modified equation), its noise exact and matrix-free."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, bad_value, check_field
from ..problem import Problem, gradient_and_hvp
from ..terms import Noise, Term
from .base import Dynamics, modified_gradient


#: the drifts and noises SGDNoise offers
DRIFTS = ("gradient", "modified")
NOISES = ("exact", "diagonal")


@dataclass(frozen=True)
class SGDNoise(Dynamics):
    """The SGD-noise SDE (stochastic modified equation, Li, Tai & E 2017), in time t = k·η:

        dθ = b(θ) dt + √η G(θ) dW,    G Gᵀ = Σ = (c/S) Cov_i[∇ℓ_i],  c = (N − S)/(N − 1)

    the covariance of one step of SGD with batches of S distinct examples drawn uniformly and
    independently each step (``DiscreteSGD(sampling="independent")``). Weight decay is drift.

    - ``drift="gradient"``: b = −∇L_λ (weak order 1 in η);
      ``"modified"``: b = −∇L̃, L̃ = L_λ + (η/4)|∇L_λ|², so b = −g − (η/2) H_λ g (weak order 2).
    - ``noise="exact"``: G = √(c/(S·N)) [∇ℓ_i − ∇L]_{i=1..N} (P × N) with W an N-dimensional
      Brownian motion. G is never formed: G w = √(c/(S·N)) ∇_θ Σ_i (w_i − w̄) ℓ_i(θ), one
      backward pass. It lies in the span of the per-example gradients, so it respects every
      symmetry of the loss. ``"diagonal"``: G = diag(√Σ_pp) with W P-dimensional; it breaks
      the symmetries and exists to show the difference.
    - ``paths``: independent paths from the same θ0, recorded along a ``path`` dimension.

    The default integrator is ``FusedEulerMaruyama(dt=lr)`` (flowsim.defaults): with the gradient
    drift its step is θ − η g + η G ξ, Gaussian SGD.
    """

    lr: float
    batch_size: int
    drift: str = "gradient"
    noise: str = "exact"
    paths: int = 1

    def __post_init__(self) -> None:
        check_field(self, "dynamics", "lr", minimum=0.0, exclusive_minimum=True)
        check_field(self, "dynamics", "batch_size", integer=True, minimum=1)
        check_field(self, "dynamics", "paths", integer=True, minimum=1)
        if self.drift not in DRIFTS:
            raise bad_value("dynamics.drift", self.drift, f"one of {', '.join(DRIFTS)}")
        if self.noise not in NOISES:
            raise bad_value("dynamics.noise", self.noise, f"one of {', '.join(NOISES)}")

    @property
    def term_type(self) -> type[Term]:
        return Noise

    @property
    def time_step(self) -> float:
        """η: the time one SGD step advances (FusedEulerMaruyama's default step)."""
        return self.lr

    def term(self, problem: Problem, theta0: Tensor) -> Noise:
        """The SDE on `paths` paths from θ0, its increment fused (``euler_maruyama_step``)."""
        return Noise(
            y0=theta0,
            paths=self.paths,
            noise_size=self.noise_size(problem),
            drift=functools.partial(self.drift_at, problem),
            diffusion=functools.partial(self.diffusion, problem),
            increment=functools.partial(self.euler_maruyama_step, problem),
        )

    def coords(self) -> dict[str, float | int | str]:
        return {**super().coords(), "drift": self.drift, "noise": self.noise}

    def check(self, problem: Problem) -> None:
        if self.batch_size > problem.n_examples:
            raise ConfigError(
                f"dynamics.batch_size: got {self.batch_size}; expected at most the {problem.n_examples} examples of the data"
            )

    # ------------------------------------------------------------------ the SDE, one path θ (P,)
    def noise_size(self, problem: Problem) -> int:
        """Dimension of W: N (exact) or P (diagonal)."""
        return problem.n_examples if self.noise == "exact" else problem.n_params

    def covariance_factor(self, problem: Problem) -> float:
        """c/S with c = (N − S)/(N − 1) (0 for full batches): Σ = (c/S) Cov_i[∇ℓ_i]."""
        n, s = problem.n_examples, self.batch_size
        return 0.0 if s >= n else (n - s) / ((n - 1) * s)

    def drift_at(self, problem: Problem, theta: Tensor) -> Tensor:
        """b(θ): −∇L_λ, or −∇L̃ = −g − (η/2) H_λ g for the modified drift."""
        if self.drift == "gradient":
            _, grad = problem.loss_and_grad(theta)
            return grad.add(theta, alpha=problem.weight_decay).neg_()
        return modified_gradient(problem, theta, 0.5 * self.lr).neg_()

    def diffusion(self, problem: Problem, theta: Tensor, w: Tensor) -> Tensor:
        """√η G(θ) w: exact, √(η c/(S N)) ∇_θ Σ_i (w_i − w̄) ℓ_i (one backward pass); diagonal,
        √(η Σ_pp) w_p from the per-example gradients."""
        if self.noise == "exact":
            scale = math.sqrt(self.lr * self.covariance_factor(problem) / problem.n_examples)
            return problem.weighted_grad(theta, w - w.mean()).mul_(scale)
        variance = _per_example_gradients(problem, theta).var(0, correction=0)
        return (self.lr * self.covariance_factor(problem) * variance).sqrt_().mul_(w)

    def euler_maruyama_step(self, problem: Problem, theta: Tensor, dt: float, dw: Tensor) -> Tensor:
        """θ + b(θ) Δt + √η G(θ) ΔW. With exact noise drift and noise are one backward pass:

            θ + ∇_θ Σ_i a_i ℓ_i − Δt λ θ  [− Δt (η/4) ∇_θ |∇L_λ|²  for the modified drift],
            a_i = −Δt/N + √(η c/(S N)) (ΔW_i − mean ΔW)

        the cost of one full-data gradient (plus a double backward for the modified drift)."""
        if self.noise == "diagonal":
            return theta + self.drift_at(problem, theta) * dt + self.diffusion(problem, theta, dw)
        n = problem.n_examples
        a = (dw - dw.mean()).mul_(math.sqrt(self.lr * self.covariance_factor(problem) / n)).sub_(dt / n)
        if self.drift == "gradient":
            step = problem.weighted_grad(theta, a)
        else:
            step = _penalised_weighted_grad(problem, theta, a, -dt * self.lr / 4)
        return step.add_(theta, alpha=1.0 - dt * problem.weight_decay)


def _penalised_weighted_grad(problem: Problem, theta: Tensor, weights: Tensor, beta: float) -> Tensor:
    """∇_θ [Σ_i w_i ℓ_i + β |∇L_λ|²] = Σ_i w_i ∇ℓ_i + 2β (H + λ) g, g = ∇L_λ = ĝ + λθ (the
    fused step of the modified drift): flowsim's one Hessian-vector product (``gradient_and_hvp``)
    on the per-example losses ℓ, whose double backward also carries the weights w. With
    ∇Σℓ = N ĝ and ∇²Σℓ = N H, the direction 2β g/N gives 2β H g: one forward, one backward and
    one double backward, as differentiating the penalised loss itself would take."""
    n, lam = problem.n_examples, problem.weight_decay
    along = lambda grad: grad.div(n).add_(theta, alpha=lam).mul_(2 * beta / n)  # noqa: E731
    _, grad, total = gradient_and_hvp(problem.per_example_losses, theta, along, weights)
    return total.add_(grad.div_(n).add_(theta, alpha=lam), alpha=2 * beta * lam) if lam else total


def _per_example_gradients(problem: Problem, theta: Tensor) -> Tensor:
    """J[i] = ∇_θ ℓ_i(θ) for all N examples, (N, P): each example alone (torch.func.vmap of
    grad), or, when BatchNorm couples the examples, the Jacobian of the full-batch losses (N
    backward passes through all N examples, vectorised in chunks)."""
    theta = theta.detach()
    if problem.batch_coupled:
        return torch.func.jacrev(problem.per_example_losses, chunk_size=32)(theta)
    one = torch.func.grad(lambda th, i: problem.per_example_losses(th, i[None])[0])
    return torch.func.vmap(one, in_dims=(None, 0), chunk_size=256)(theta, torch.arange(problem.n_examples, device=theta.device))
