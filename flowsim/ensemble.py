"""Ensembles: K independent copies of one run moved at once, θ a (K, P) batch.

Member k follows exactly the dynamics a run of its own would follow from θ0_k (same data, same
hyper-parameters, the batch order of the run's seed, or of its own seed s_k when the members are
given ``member_seeds``); only the initial parameters (and those seeds) differ. The network's forward
pass is one ``torch.func.vmap`` over the stacked flat θ (or, for a plain stack of Linear
layers and elementwise activations, the same batching written out: ``StackedLayers``), and one
backward pass gives all gradients:

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
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from .dynamics import Dynamics
from .errors import ConfigError, ModelError, bad_value, check_fits_memory, check_number, check_seed
from .problem import BatchSampler, Problem, _per_example_loss, gradient_and_hvp


def check_batched(dynamics: Dynamics, field: str) -> None:
    """ConfigError (naming `field`) unless `dynamics` runs members at once (``Dynamics.batched``)."""
    if not dynamics.batched:
        raise ConfigError(
            f"{field}: {dynamics.name} cannot run as an ensemble; expected a dynamics that touches the problem only "
            "through its batched gradients (one whose class sets batched = True: GradientFlow, DiscreteSGD, …)"
        )


class Ensemble(Problem):
    """`problem` seen by K members at once: θ is (K, P); the network's forward pass is vmapped
    over the members (batched by hand for MLPs: `StackedLayers`), and one backward pass of
    Σ_k L(θ_k) gives every member's gradient (the members share no parameter, so
    ∂/∂θ_k Σ_j L(θ_j) = ∇L(θ_k) exactly). It is that problem (its network, data, loss and
    layout, shared, not copied) with ``members = ("member", K)`` and the batched methods below;
    a single θ (P,) goes to the wrapped problem."""

    #: the record's leading dimension over the members
    dim = "member"

    def __init__(self, problem: Problem, size: int, member_seeds: tuple[int, ...] | None = None) -> None:
        self.__dict__.update(problem.__dict__)  # the same problem: no second copy of the network or data
        self.problem = problem
        self.members = (self.dim, size)
        #: member k's own seed of its mini-batches (``batch_indices``), or None: all use the run's seed
        self.member_seeds = member_seeds
        self._forward_members = vmap(problem._forward, in_dims=(0, None))
        self._forward_each = vmap(problem._forward, in_dims=(0, 0))
        #: the hand-batched forward pass of an MLP-like network, or None (vmap)
        self.stacked = StackedLayers.of(problem)

    def batch_indices(self, sampler: BatchSampler, k: int, seed: int) -> Tensor | None:
        """Step k's mini-batch: the run's, drawn from `seed` and shared by the members (S,); with
        ``member_seeds``, every member's own, drawn as its own run draws it (K, S); None for full batch."""
        if self.member_seeds is None:
            return sampler.batch(self.problem, k, seed)
        rows = [sampler.batch(self.problem, k, s) for s in self.member_seeds]
        return None if rows[0] is None else torch.stack(rows)

    def compiled_gradient(self) -> Ensemble:
        """Itself: an ensemble's vmapped forward pass and its one backward pass stay eager
        (``integrator.compile`` compiles single problems only; a warning says so)."""
        warnings.warn("compile: an ensemble evaluates its members' gradients eagerly (not compiled)", RuntimeWarning, stacklevel=2)
        return self

    def member_losses(self, theta: Tensor, index: Tensor | None = None) -> Tensor:
        """L(θ_k) on the examples in `index` for every row of θ (K, P): (K,), differentiable.
        `index` is one batch for all members (S,) or one per member (K, S)."""
        problem = self.problem
        X, y = (problem.X, problem.y) if index is None else (problem.X[index], problem.y[index])
        each = index is not None and index.ndim == 2  # member k on its own batch X[index[k]]
        if self.stacked is not None:
            out = self.stacked(self.problem.unflatten(theta), X, shared=not each)
        else:
            out = (self._forward_each if each else self._forward_members)(theta, X)  # (K, n, ...)
        targets = y.flatten(0, 1) if each else y.expand(theta.shape[0], *y.shape).flatten(0, 1)
        out = out.flatten(0, 1)
        if problem.loss_kind == "cross_entropy" and out.ndim == 2 and not targets.is_floating_point():
            losses = _cross_entropy_long(out, targets)
        else:
            losses = _per_example_loss(problem.loss_kind, out, targets)
        return losses.view(theta.shape[0], -1).mean(1)

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
        along = (lambda grad: grad.add(theta, alpha=shift)) if shift else (lambda grad: grad)
        return gradient_and_hvp(self.member_losses, theta, along)

    def error_norm(self, ratio: Tensor) -> Tensor:
        """An adaptive ODE solver's error norm: the largest of the members' RMS norms, so every
        member meets the tolerance it would meet alone (the plain RMS over all K·P entries would
        let one member's error be diluted by the others)."""
        return ratio.reshape(self.members[1], -1).square().mean(1).sqrt().max()


def _cross_entropy_long(logits: Tensor, labels: Tensor) -> Tensor:
    """ℓ_i = m_i + log Σ_c exp(z_ic − m_i) − z_{i,y_i}, m_i = max_c z_ic, for (M, C) logits: the
    reductions run over a (C, M) view, along the long axis of the K·n rows of an ensemble
    (``cross_entropy``'s log_softmax over a short class axis is its slowest step there)."""
    columns = logits.T
    peak = columns.detach().amax(0)
    return (columns - peak).exp().sum(0).log() + peak - logits.gather(1, labels[:, None])[:, 0]


#: parameter-free modules that act on every entry alone, so they apply to a (K, n, f) batch as they are
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Identity, nn.GELU, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus)


class StackedLayers:
    """The K members' forward pass of an ``nn.Sequential`` of ``nn.Flatten`` modules, then
    ``nn.Linear`` layers and elementwise activations (the zoo's ``mlp``), batched by hand:

        H_1 = X [W1_1; …; W1_K]ᵀ + b1   (one GEMM: the members share X),
        H_l = baddbmm(b_l, H_{l−1}, W_lᵀ)  (one batched GEMM over the members),

    the activations applied to the (K, n, f) batch as they are. This is what vmap computes,
    without its per-operation dispatch, and with the first layer as one GEMM instead of K small
    ones (vmap expands X and calls bmm). `of(problem)` returns None for any other network."""

    def __init__(self, prefix: list[nn.Module], layers: list[tuple[str, nn.Module]]) -> None:
        self.prefix, self.layers = prefix, layers

    @classmethod
    def of(cls, problem: Problem) -> StackedLayers | None:
        net = problem._net
        if not isinstance(net, nn.Sequential):
            return None
        children = list(net.named_children())
        n_prefix = next((i for i, (_, m) in enumerate(children) if not isinstance(m, nn.Flatten)), len(children))
        prefix, layers = [m for _, m in children[:n_prefix]], children[n_prefix:]
        if any(m.start_dim != 1 or m.end_dim != -1 for m in prefix):
            return None
        if not layers or not isinstance(layers[0][1], nn.Linear) or not all(isinstance(m, (nn.Linear, *ELEMENTWISE)) for _, m in layers):
            return None
        linear_params = [f"{name}.{p}" for name, m in layers if isinstance(m, nn.Linear) for p, _ in m.named_parameters()]
        if sorted(linear_params) != sorted(problem.names):  # a frozen parameter: let vmap handle it
            return None
        features = nn.Sequential(*prefix)(problem.X[:1])
        return cls(prefix, layers) if features.ndim == 2 else None

    def __call__(self, params: dict[str, Tensor], X: Tensor, shared: bool = True) -> Tensor:
        """f(X; θ_k) for every member: `params` the (K, …) views of θ (``Problem.unflatten``),
        X the examples all members see (n, …), or (``shared=False``) one batch per member (K, n, …)."""
        size = next(iter(params.values())).shape[0]
        h = X if shared else X.flatten(0, 1)
        for module in self.prefix:
            h = module(h)
        if not shared:
            h = h.view(size, -1, h.shape[-1])
        for name, module in self.layers:
            if not isinstance(module, nn.Linear):
                h = module(h)
                continue
            weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
            if h.ndim == 2:  # (n, f) shared by the members: one GEMM, (n, K·out) → (K, n, out)
                stacked = weight.flatten(0, 1).T
                h = h @ stacked if bias is None else torch.addmm(bias.flatten(), h, stacked)
                h = h.view(h.shape[0], size, -1).transpose(0, 1)
            else:
                h = torch.bmm(h, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias[:, None], h, weight.transpose(1, 2))
        return h


def member_seed(seed: int, member: int) -> int:
    """The torch seed that draws member `member`'s initial parameters (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence((seed, member)).generate_state(1, np.uint64)[0] >> 1)


def initial_members(problem: Problem, size: int, seed: int = 0) -> Tensor:
    """θ0 of `size` members, (K, P): member 0 holds the model's current parameters; member k ≥ 1
    a fresh draw of the model's own initialisation (every module's ``reset_parameters()``, in
    ``modules()`` order) under ``torch.manual_seed(member_seed(seed, k))``. The draws are made on
    the CPU, so that the members are the same on every device (a CUDA generator draws other
    numbers), and every generator's state is restored afterwards."""
    size = check_number("run.ensemble", size, integer=True, minimum=1)
    rows = [problem.initial_theta()]
    model = copy.deepcopy(problem.model).cpu()
    resettable = [m for m in model.modules() if callable(getattr(m, "reset_parameters", None))]
    if size > 1 and not resettable:
        raise ConfigError("run.ensemble: the model has no module with reset_parameters(); pass the initial parameters (K, P)")
    params = dict(model.named_parameters())
    for k in range(1, size):
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(member_seed(seed, k))
            for module in resettable:
                module.reset_parameters()
        rows.append(torch.cat([params[n].detach().reshape(-1) for n in problem.names]).to(problem.device))
    return torch.stack(rows).to(dtype=problem.dtype)


def check_ensemble(ensemble: int | Tensor | None, dynamics: Dynamics, problem: Problem) -> int | Tensor | None:
    """The ensemble argument of ``simulate``: None, a number of members K ≥ 1, or (K, P) initial parameters."""
    if ensemble is None:
        return None
    check_batched(dynamics, "run.ensemble")
    if isinstance(ensemble, Tensor):
        if ensemble.ndim != 2 or ensemble.shape[0] < 1 or ensemble.shape[1] != problem.n_params or not ensemble.is_floating_point():
            raise ConfigError(
                f"run.ensemble: got a tensor of shape {tuple(ensemble.shape)}; expected (K, {problem.n_params}) floating initial parameters"
            )
        if ensemble.device.type == "meta" or not bool(torch.isfinite(ensemble).all()):
            raise ModelError("run.ensemble: the initial parameters have non-finite entries (or none: meta); expected finite values")
        return ensemble
    members = check_number("run.ensemble", ensemble, integer=True, minimum=1)
    # eight (K, P) float64 buffers (θ, stages, gradients): a generous estimate
    check_fits_memory("run.ensemble", 64 * members * problem.n_params, f"{members} members of {problem.n_params} parameters", "fewer members")
    return members


def check_member_seeds(member_seeds: Sequence[int] | None, ensemble: int | Tensor | None) -> tuple[int, ...] | None:
    """The member_seeds argument of ``simulate``: None, or one seed ≥ 0 per member of `ensemble`."""
    if member_seeds is None:
        return None
    if ensemble is None:
        raise ConfigError("run.member_seeds: given without run.ensemble; expected None")
    size = ensemble.shape[0] if isinstance(ensemble, Tensor) else ensemble
    if isinstance(member_seeds, (str, bytes)) or not isinstance(member_seeds, Sequence) or len(member_seeds) != size:
        raise bad_value("run.member_seeds", member_seeds, f"a sequence of {size} seeds, one per member")
    return tuple(check_seed(f"run.member_seeds[{k}]", s) for k, s in enumerate(member_seeds))


def ensemble_start(
    problem: Problem, ensemble: int | Tensor, seed: int, member_seeds: tuple[int, ...] | None = None
) -> tuple[Ensemble, Tensor]:
    """The ensemble view of a bound `problem` and its (K, P) initial parameters."""
    if isinstance(ensemble, Tensor):
        theta0 = ensemble.detach().to(device=problem.device, dtype=problem.dtype).clone()
    else:
        theta0 = initial_members(problem, ensemble, seed)
    return Ensemble(problem, theta0.shape[0], member_seeds), theta0
