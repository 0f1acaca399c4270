"""What every dynamics is: the base classes, and the pieces several dynamics share."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, ClassVar

from torch import Tensor

from ..errors import bad_value, check_field
from ..kinks import Branches
from ..problem import Problem
from ..terms import Semilinear, Term, VectorField


class Dynamics(ABC):
    """Base class: hyper-parameters of one dynamics (frozen dataclasses)."""

    #: True when it runs a (K, P) batch of ensemble members through the problem's batched
    #: methods (``loss_and_grad``, ``loss``, ``loss_grad_hvp``), updating θ elementwise
    batched: ClassVar[bool] = False

    @property
    def term_type(self) -> type[Term]:
        """The kind of term it hands an integrator (known before any problem is bound)."""
        return VectorField

    @property
    def time_step(self) -> float:
        """Δt, the time one step advances: a step map's step (t = k·Δt) and the default SDE
        step. Each discrete or stochastic dynamics gives its own; a flow has none."""
        raise NotImplementedError(f"{self.name} has no time step: it is a flow")

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


def modified_gradient(problem: Problem, theta: Tensor, kappa: float) -> Tensor:
    """∇L̃ for L̃ = L_λ + (κ/2)|g|², g = ĝ + λθ: g + κ(H + λ)g = (1 + κλ)g + κ H(ĝ + λθ),
    one gradient and one Hessian-vector product (``Problem.loss_grad_hvp``)."""
    lam = problem.weight_decay
    _, grad, hg = problem.loss_grad_hvp(theta, shift=lam)
    g = grad.add(theta, alpha=lam) if lam else grad
    return g.mul_(1.0 + kappa * lam).add_(hg, alpha=kappa)


#: why momentum β and dampening d stay below 1
_BELOW_ONE = {
    "momentum": "at β = 1 nothing damps the velocity and the heavy-ball flow is singular",
    "dampening": "at d = 1 a step advances the time t = kη(1−d) by nothing",
}


def check_momentum(dynamics: Dynamics) -> None:
    """β (``momentum``) and d (``dampening``) in [0, 1)."""
    for name, why in _BELOW_ONE.items():
        check_field(dynamics, "dynamics", name)
        if not 0.0 <= getattr(dynamics, name) < 1.0:
            raise bad_value(f"dynamics.{name}", getattr(dynamics, name), f"a number in [0, 1) ({why})")
