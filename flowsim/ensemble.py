"""Ensembles: K independent copies of one run moved at once, θ a (K, P) batch.

Member k follows exactly the dynamics a run of its own would follow from θ0_k (same data, same
batch order, same hyper-parameters); only the initial parameters differ. The network's forward
pass is one ``torch.func.vmap`` over the stacked flat θ, and one backward pass gives all
gradients:

    (L_k, ĝ_k) = (L(θ_k), ∇_θ_k Σ_j L(θ_j)) = (L(θ_k), ∇L(θ_k)),  k = 0 … K−1.

``Ensemble(problem, K)`` is the problem as the K members see it: its ``loss_and_grad``,
``loss`` and ``loss_grad_hvp`` take θ of shape (K, P) and return (K,), (K, P); everything else
is the wrapped problem's. A dynamics written against ``Problem`` with elementwise updates
(GradientFlow, DiscreteSGD) therefore runs an ensemble unchanged, and the record gains the
``member`` dimension through the same mechanism as the SDE's paths (``Recorder(members=...)``).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from .dynamics import DiscreteSGD, Dynamics, GradientFlow, ModifiedFlow
from .errors import ConfigError, check_number
from .problem import Problem, _per_example_loss

#: the dynamics an ensemble runs: those that touch the problem only through the batched methods
#: below (``loss_and_grad``, ``loss``, ``loss_grad_hvp``) and update θ elementwise
ENSEMBLE_DYNAMICS: tuple[type[Dynamics], ...] = (GradientFlow, ModifiedFlow, DiscreteSGD)


class Ensemble:
    """`problem` seen by K members at once: θ is (K, P); the network's forward pass is vmapped
    over the members, and one backward pass of Σ_k L(θ_k) gives every member's gradient (the
    members share no parameter, so ∂/∂θ_k Σ_j L(θ_j) = ∇L(θ_k) exactly)."""

    #: the record's leading dimension over the members
    dim = "member"

    def __init__(self, problem: Problem, size: int) -> None:
        self.problem = problem
        self.members = (self.dim, size)
        self._forward_members = vmap(problem._forward, in_dims=(0, None))

    def __getattr__(self, name: str):
        return getattr(self.problem, name)

    def compiled_gradient(self) -> Ensemble:
        """Itself: an ensemble's vmapped forward pass and its one backward pass stay eager
        (``integrator.compile`` compiles single problems only; a warning says so)."""
        warnings.warn("compile: an ensemble evaluates its members' gradients eagerly (not compiled)", RuntimeWarning, stacklevel=2)
        return self

    def member_losses(self, theta: Tensor, index: Tensor | None = None) -> Tensor:
        """L(θ_k) on the examples in `index` for every row of θ (K, P): (K,), differentiable."""
        problem = self.problem
        X, y = (problem.X, problem.y) if index is None else (problem.X[index], problem.y[index])
        out = self._forward_members(theta, X)  # (K, n, ...)
        targets = y.expand(theta.shape[0], *y.shape).flatten(0, 1)
        return _per_example_loss(problem.loss_kind, out.flatten(0, 1), targets).view(theta.shape[0], -1).mean(1)

    def loss_and_grad(self, theta: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L(θ_k), ∇L(θ_k)) for every row θ_k of a (K, P) θ on the examples in `index`: (K,), (K, P).
        A single θ (P,) goes to the wrapped problem."""
        if theta.ndim == 1:
            return self.problem.loss_and_grad(theta, index)
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            losses = self.member_losses(leaf, index)
            (grad,) = torch.autograd.grad(losses.sum(), leaf)
        return losses.detach(), grad

    def loss(self, theta: Tensor, index: Tensor | None = None) -> Tensor:
        """L(θ_k) for every row: (K,)."""
        if theta.ndim == 1:
            return self.problem.loss(theta, index)
        with torch.no_grad():
            return self.member_losses(theta, index)

    def loss_grad_hvp(self, theta: Tensor, shift: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """(L(θ_k), ĝ_k, H_k (ĝ_k + shift·θ_k)) for every row, by one double backward of Σ_k L(θ_k)."""
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            losses = self.member_losses(leaf)
            (grad,) = torch.autograd.grad(losses.sum(), leaf, create_graph=True)
            direction = grad.detach().add(theta, alpha=shift) if shift else grad.detach()
            (hv,) = torch.autograd.grad(grad, leaf, direction)
        return losses.detach(), grad.detach(), hv

    def error_norm(self, ratio: Tensor) -> Tensor:
        """An adaptive ODE solver's error norm: the largest of the members' RMS norms, so every
        member meets the tolerance it would meet alone (the plain RMS over all K·P entries would
        let one member's error be diluted by the others)."""
        return ratio.reshape(self.members[1], -1).square().mean(1).sqrt().max()


def member_seed(seed: int, member: int) -> int:
    """The torch seed that draws member `member`'s initial parameters (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence((seed, member)).generate_state(1, np.uint64)[0] >> 1)


def initial_members(problem: Problem, size: int, seed: int = 0) -> Tensor:
    """θ0 of `size` members, (K, P): member 0 holds the model's current parameters; member k ≥ 1
    a fresh draw of the model's own initialisation (every module's ``reset_parameters()``, in
    ``modules()`` order) under ``torch.manual_seed(member_seed(seed, k))``."""
    size = check_number("run.ensemble", size, integer=True, minimum=1)
    rows = [problem.initial_theta()]
    model = copy.deepcopy(problem.model)
    resettable = [m for m in model.modules() if callable(getattr(m, "reset_parameters", None))]
    if size > 1 and not resettable:
        raise ConfigError("run.ensemble: the model has no module with reset_parameters(); pass the initial parameters (K, P)")
    params = dict(model.named_parameters())
    for k in range(1, size):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(member_seed(seed, k))
            for module in resettable:
                module.reset_parameters()
        rows.append(torch.cat([params[n].detach().reshape(-1) for n in problem.names]))
    return torch.stack(rows).to(device=problem.device, dtype=problem.dtype)


def check_ensemble(ensemble: int | Tensor | None, dynamics: Dynamics, problem: Problem) -> int | Tensor | None:
    """The ensemble argument of ``simulate``: None, a number of members K ≥ 1, or (K, P) initial parameters."""
    if ensemble is None:
        return None
    if not isinstance(dynamics, ENSEMBLE_DYNAMICS):
        names = ", ".join(d.__name__ for d in ENSEMBLE_DYNAMICS)
        raise ConfigError(f"run.ensemble: {dynamics.name} cannot run as an ensemble; expected one of {names}")
    if isinstance(ensemble, Tensor):
        if ensemble.ndim != 2 or ensemble.shape[0] < 1 or ensemble.shape[1] != problem.n_params or not ensemble.is_floating_point():
            raise ConfigError(
                f"run.ensemble: got a tensor of shape {tuple(ensemble.shape)}; expected (K, {problem.n_params}) floating initial parameters"
            )
        return ensemble
    return check_number("run.ensemble", ensemble, integer=True, minimum=1)


def ensemble_start(problem: Problem, ensemble: int | Tensor, seed: int) -> tuple[Ensemble, Tensor]:
    """The ensemble view of a bound `problem` and its (K, P) initial parameters."""
    if isinstance(ensemble, Tensor):
        theta0 = ensemble.detach().to(device=problem.device, dtype=problem.dtype).clone()
    else:
        theta0 = initial_members(problem, ensemble, seed)
    return Ensemble(problem, theta0.shape[0]), theta0
