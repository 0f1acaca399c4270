"""WHAT moves: the continuous models of training and true discrete SGD.

Time is t = k·η(1−d) for step k of SGD (learning rate η, dampening d); L_λ = L + (λ/2)|θ|²
with λ the problem's weight decay, and g = ĝ + λθ with ĝ the data-loss gradient.

| dynamics      | equation                                                             |
|---------------|----------------------------------------------------------------------|
| GradientFlow  | θ' = −g(θ)                                                           |
| DiscreteSGD   | v ← βv + (1−d)(ĝ_B + λθ)  (v ← ĝ_B + λθ on the first step);           |
|               | θ ← θ − η v  (Nesterov: θ ← θ − η(ĝ_B + λθ + βv)); PyTorch's SGD     |
| ModifiedFlow  | θ' = −∇L̃, L̃ = L_λ + (η/4)|g|²: θ' = −g − (η/2)(H + λ)g, g = ĝ + λθ    |
| MomentumFlow  | (h/2)(1+β)θ'' + (1−β)θ' = −g, h = η(1−d); state (θ, v = θ')           |
| SGDNoise      | dθ = b dt + √η G dW, G Gᵀ = (c/S) Cov_i[∇ℓ_i], b = −g or −∇L̃         |

Bound to a problem and θ0, a dynamics hands its integrator a *term* (flowsim.terms):
``term_type`` says which kind before anything is bound, ``term(problem, theta0)`` builds it.
A flow gives a VectorField (``derivative``, ``split``), MomentumFlow a Semilinear one,
SGDNoise a Noise term, DiscreteSGD a StepMap. Which integrator runs a term by default is
flowsim.defaults' table.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, bad_value, check_field
from .kinks import Branches
from .problem import Problem
from .terms import Noise, Semilinear, StepMap, StepResult, Term, VectorField


class Dynamics(ABC):
    """Base class: hyper-parameters of one dynamics (frozen dataclasses)."""

    #: True when it runs a (K, P) batch of ensemble members through the problem's batched
    #: methods (``loss_and_grad``, ``loss``, ``loss_grad_hvp``), updating θ elementwise
    batched: ClassVar[bool] = False

    @property
    def term_type(self) -> type[Term]:
        """The kind of term it hands an integrator (known before any problem is bound)."""
        return VectorField

    @abstractmethod
    def term(self, problem: Problem, theta0: Tensor) -> Term:
        """Its term on `problem` from θ0 (a (K, P) θ0 for an ensemble)."""

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

    def state_size(self, problem: Problem) -> int:
        """Length of the state an integrator moves (θ alone: P)."""
        return problem.n_params


class ContinuousDynamics(Dynamics):
    """θ (and possibly a velocity) as one flat state y, moved by y' = derivative(t, y)."""

    def term(self, problem: Problem, theta0: Tensor) -> VectorField:
        return self._field(problem, self.initial_state(problem, theta0))

    def _field(self, problem: Problem, y0: Tensor) -> VectorField:
        """The term y' = derivative(problem, t, y) from y0, of type ``term_type`` with its
        ``_parts``; ``compiled()`` rebinds it to the problem's compiled gradient."""
        return self.term_type(
            f=functools.partial(self.derivative, problem),
            y0=y0,
            split=functools.partial(self.split, problem),
            members=problem.members,
            error_norm=problem.error_norm,
            compiled=lambda: self._field(problem.compiled_gradient(), y0),
            jvp=self.jvp(problem),
            kinks=Branches if problem.members is None else None,
            **self._parts(problem),
        )

    def jvp(self, problem: Problem) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        """(t, y, v) ↦ ∂derivative/∂y · v on `problem`, or None where the dynamics gives none."""
        return None

    def _parts(self, problem: Problem) -> dict[str, Any]:
        """What a term of ``term_type`` takes beyond a vector field's (a Semilinear one: M and N)."""
        return {}

    def initial_state(self, problem: Problem, theta0: Tensor) -> Tensor:
        return theta0.clone()

    @abstractmethod
    def derivative(self, problem: Problem, t: Tensor, y: Tensor) -> Tensor:
        """y'(t)."""

    def split(self, problem: Problem, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """(θ, velocity or None) as views of the state."""
        return y, None


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


class SemilinearDynamics(ContinuousDynamics):
    """y' = (M ⊗ I_P) y + N(t, y): the state is k stacked vectors of length P (θ, a velocity…)
    and M a k×k matrix, the linear and possibly stiff part that an exponential integrator
    (``integrators.Exponential``) solves exactly; N is the rest (the gradients)."""

    @property
    def term_type(self) -> type[Term]:
        return Semilinear

    def _parts(self, problem: Problem) -> dict[str, Any]:
        return {"linear": self.linear_part(problem), "nonlinear": functools.partial(self.nonlinear_part, problem)}

    @abstractmethod
    def linear_part(self, problem: Problem) -> Tensor:
        """M, float64 of shape (k, k)."""

    @abstractmethod
    def nonlinear_part(self, problem: Problem, t: Tensor, y: Tensor) -> Tensor:
        """N(t, y), shaped like y."""

    def derivative(self, problem: Problem, t: Tensor, y: Tensor) -> Tensor:
        linear = self.linear_part(problem).to(y)
        return (linear @ y.view(len(linear), -1)).view(-1) + self.nonlinear_part(problem, t, y)

    def state_size(self, problem: Problem) -> int:
        return len(self.linear_part(problem)) * problem.n_params


def _modified_gradient(problem: Problem, theta: Tensor, kappa: float) -> Tensor:
    """∇L̃ for L̃ = L_λ + (κ/2)|g|², g = ĝ + λθ: g + κ(H + λ)g = (1 + κλ)g + κ H(ĝ + λθ),
    one gradient and one Hessian-vector product (``Problem.loss_grad_hvp``)."""
    lam = problem.weight_decay
    _, grad, hg = problem.loss_grad_hvp(theta, shift=lam)
    g = grad.add(theta, alpha=lam) if lam else grad
    return g.mul_(1.0 + kappa * lam).add_(hg, alpha=kappa)


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
        return _modified_gradient(problem, y, 0.5 * self.lr).neg_()


#: why momentum β and dampening d stay below 1
_BELOW_ONE = {
    "momentum": "at β = 1 nothing damps the velocity and the heavy-ball flow is singular",
    "dampening": "at d = 1 a step advances the time t = kη(1−d) by nothing",
}


def _check_momentum(dynamics: Dynamics) -> None:
    """β (``momentum``) and d (``dampening``) in [0, 1)."""
    for name, why in _BELOW_ONE.items():
        check_field(dynamics, "dynamics", name)
        if not 0.0 <= getattr(dynamics, name) < 1.0:
            raise bad_value(f"dynamics.{name}", getattr(dynamics, name), f"a number in [0, 1) ({why})")


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
        _check_momentum(self)
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
            return _modified_gradient(problem, y, kappa).mul_(-1.0 / (1.0 - self.momentum))
        theta, _ = self.split(problem, y)
        _, grad = problem.loss_and_grad(theta)
        out = torch.zeros_like(y)
        out.view(2, -1)[1].copy_(grad).mul_(-1.0 / self.mass)
        return out


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
        _check_momentum(self)
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
        return _modified_gradient(problem, theta, 0.5 * self.lr).neg_()

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
    """∇_θ [Σ_i w_i ℓ_i + β |∇L_λ|²] = Σ_i w_i ∇ℓ_i + 2β H_λ g, g = ∇L_λ, by one forward and a
    double backward (the fused step of the modified drift)."""
    with torch.enable_grad():
        leaf = theta.detach().requires_grad_(True)
        losses = problem.per_example_losses(leaf)
        (grad,) = torch.autograd.grad(losses.mean(), leaf, create_graph=True)
        grad = grad + problem.weight_decay * leaf
        (total,) = torch.autograd.grad(losses @ weights + beta * grad.square().sum(), leaf)
    return total


def _per_example_gradients(problem: Problem, theta: Tensor) -> Tensor:
    """J[i] = ∇_θ ℓ_i(θ) for all N examples, (N, P): each example alone (torch.func.vmap of
    grad), or, when BatchNorm couples the examples, the Jacobian of the full-batch losses (N
    backward passes through all N examples, vectorised in chunks)."""
    theta = theta.detach()
    if problem.batch_coupled:
        return torch.func.jacrev(problem.per_example_losses, chunk_size=32)(theta)
    one = torch.func.grad(lambda th, i: problem.per_example_losses(th, i[None])[0])
    return torch.func.vmap(one, in_dims=(None, 0), chunk_size=256)(theta, torch.arange(problem.n_examples, device=theta.device))


#: the dynamics a config may name
DYNAMICS: dict[str, type[Dynamics]] = {
    "GradientFlow": GradientFlow,
    "ModifiedFlow": ModifiedFlow,
    "MomentumFlow": MomentumFlow,
    "DiscreteSGD": DiscreteSGD,
    "SGDNoise": SGDNoise,
}
