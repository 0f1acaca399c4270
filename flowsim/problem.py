"""Problem: a model, its data, a loss and weight decay, seen as functions of one flat vector θ.

    L(θ)   = (1/N) Σ_i ℓ_i(θ)                  the data loss (``loss``)
    L_λ(θ) = L(θ) + (λ/2) |θ|²                  what the dynamics descend
    ĝ(θ)   = ∇L(θ) on the evaluated examples    (``loss_and_grad``; weight decay is added by
                                                 the dynamics, so records can use ĝ itself)

ℓ_i is PyTorch's per-example loss: cross-entropy, or for "mse" the mean over output components
of the squared error (so L equals ``F.mse_loss`` with its default reduction).

The network is always evaluated in training mode: a normalisation layer uses the statistics of
the evaluated examples (all N for the flows, the mini-batch for SGD) and its running statistics
are never read nor written (they are passed as ``None`` to ``torch.func.functional_call``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.modules.batchnorm import _NormBase

from .errors import DataError, ModelError, bad_value, check_number
from .terms import Members


def gradient_and_hvp(
    losses: Callable[[Tensor], Tensor],
    theta: Tensor,
    direction: Tensor | Callable[[Tensor], Tensor],
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(ℓ, ∇_θ Σℓ, ∇²_θ Σℓ · d) for ℓ = losses(θ) (a scalar, one loss per ensemble member, or
    one per example), by one forward, a backward that keeps its graph and a double backward: the
    one Hessian-vector product of flowsim. `direction` is d, or a function of the (detached)
    gradient giving it. With `weights` w (shaped like ℓ) the last entry is
    ∇²_θ Σℓ · d + ∇_θ Σ_j w_j ℓ_j: the double backward starts from both (SGDNoise's fused step).

    Double backward, not forward-over-reverse (``torch.func.jvp`` of the gradient needs the
    gradient first, so one more pass; ``benchmarks/hessian_vector.py``)."""
    with torch.enable_grad():
        leaf = theta.detach().requires_grad_(True)
        loss = losses(leaf)
        (grad,) = torch.autograd.grad(loss.sum(), leaf, create_graph=True)
        d = direction(grad.detach()) if callable(direction) else direction
        roots, cotangents = (grad, d) if weights is None else ((grad, loss), (d, weights))
        (hv,) = torch.autograd.grad(roots, leaf, cotangents)
    return loss.detach(), grad.detach(), hv


class BatchSampler(Protocol):
    """What draws mini-batches (``DiscreteSGD``): step k's example indices from `seed`."""

    def batch(self, problem: Problem, k: int, seed: int) -> Tensor | None: ...

LOSSES = ("cross_entropy", "mse")


def _per_example_loss(kind: str, output: Tensor, target: Tensor) -> Tensor:
    """ℓ_i for every example of ``output``: shape (n,)."""
    if kind == "cross_entropy":
        return nn.functional.cross_entropy(output, target, reduction="none")
    return (output - target).square().flatten(1).mean(1)


def _batch_loss(kind: str, output: Tensor, target: Tensor) -> Tensor:
    """L = mean_i ℓ_i by PyTorch's own reductions (what a plain training loop computes)."""
    if kind == "cross_entropy":
        return nn.functional.cross_entropy(output, target)
    return nn.functional.mse_loss(output, target)


def split_contraction(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for a (m, k) and b (k, n) on the CPU with a contraction long enough to give each
    of the T torch threads a slice at least max(m, n) long (k ≥ T·max(m, n), T ≥ 2):
    Σ_s a[:, K_s] b[K_s, :] over T equal slices K_s of the k axis, as one batched product and
    a sum. Other products: ``NotImplemented`` (make_fx keeps them as they are).

    A weight gradient δᵀH has a small output (out × in) and contracts over the N examples; the
    BLAS splits a product's output, not its contraction, across threads, and on 2 cores MKL
    runs these products little faster than on one. The batched product gives each thread its
    slice of the examples (the same sums in another order, equal to round-off; timings in the
    docs, ``benchmarks/compiled_gradient.py``). Where a slice per thread would be shorter than
    max(m, n) (many cores) the product is left to the BLAS."""
    (m, k), n = a.shape, b.shape[1]
    slices = torch.get_num_threads()
    if a.device.type != "cpu" or slices < 2 or k < slices * max(m, n) or k % slices:
        return NotImplemented
    return torch.bmm(a.view(m, slices, k // slices).transpose(0, 1), b.view(slices, k // slices, n)).sum(0)


class CompiledGradient:
    """θ ↦ (∇L(θ), L(θ)) on fixed data (X, y): torch.func's ``grad_and_value`` of the loss,
    traced at the first call into one ATen graph by ``make_fx`` and compiled by TorchInductor
    (``torch._inductor.compile``). On the CPU, products with a long contraction (the weight
    gradients) are traced as ``split_contraction``.

    Tracing uses fake tensors, so Python control flow that depends on values is refused (and
    the problem falls back to eager evaluation), never baked in. There is no TorchDynamo: the
    inputs keep their shape, dtype and device for the whole run, so there is nothing to guard
    (what Dynamo's guards cost: ``benchmarks/compiled_gradient.py``, docs "Integrators").
    """

    def __init__(self, loss: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        self.loss = loss
        self.graph: torch.fx.GraphModule | None = None  # the traced ATen graph, kept for inspection
        self.compiled: Callable[..., tuple[Tensor, Tensor]] | None = None

    def __call__(self, theta: Tensor, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(∇L(θ), L(θ)) on (X, y): compiled at the first call for their shapes, dtypes and device."""
        if self.compiled is None:
            import torch._inductor  # lazily: loading the compiler takes a second

            inputs = [theta, X, y]
            decompositions = {torch.ops.aten.mm.default: split_contraction}
            self.graph = make_fx(torch.func.grad_and_value(self.loss), decompositions, tracing_mode="fake")(*inputs)
            self.compiled = torch._inductor.compile(self.graph, inputs)
        return self.compiled(theta, X, y)


class Problem:
    """A model, its data, a loss and weight decay, seen as functions of a flat parameter vector.

    **Main arguments**

    - `model`: any ``nn.Module``; its trainable parameters, in ``named_parameters`` order, are θ.
    - `data`: ``(X, y)``; X has the examples on its first axis; y holds integer class labels
      (cross_entropy) or float targets with the model's output shape (mse).
    - `loss`: ``"cross_entropy"`` or ``"mse"``.
    - `weight_decay`: λ ≥ 0 in L_λ = L + (λ/2)|θ|².

    **Other arguments**

    - `chunk_size`: evaluate the full data in chunks of this many examples (exact for models
      whose examples are independent; refused for models with BatchNorm).

    **Raises** `DataError` or `ModelError` naming what is wrong, before anything is computed.
    """

    #: (dim, K) when θ is a (K, P) batch of independent members (``flowsim.ensemble.Ensemble``)
    members: Members | None = None
    #: an adaptive method's error norm when the members need their own (None: RMS over all entries)
    error_norm: Callable[[Tensor], Tensor] | None = None

    def __init__(
        self,
        model: nn.Module,
        data: tuple[Tensor, Tensor],
        loss: str = "cross_entropy",
        weight_decay: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise bad_value("model", type(model).__name__, "a torch.nn.Module", ModelError)
        if loss not in LOSSES:
            raise bad_value("problem.loss", loss, f"one of {', '.join(LOSSES)}")
        weight_decay = check_number("problem.weight_decay", weight_decay, minimum=0.0)
        self.model = model
        self.loss_kind = loss
        self.weight_decay = weight_decay
        self.batch_coupled = any(isinstance(m, _NormBase) for m in model.modules())
        if chunk_size is not None:
            chunk_size = check_number("problem.chunk_size", chunk_size, integer=True, minimum=1)
            if self.batch_coupled:
                raise ModelError(
                    f"problem.chunk_size: got {chunk_size}; a model with BatchNorm couples the examples of a "
                    "batch, so the full-data gradient cannot be chunked (use chunk_size=None)"
                )
        self.chunk_size = chunk_size

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ModelError("model: has no trainable parameters")
        self.check_parameters()
        self.names = tuple(n for n, _ in named)
        self.shapes = tuple(p.shape for _, p in named)
        self.sizes = tuple(p.numel() for _, p in named)
        reference = named[0][1]
        self.device, self.dtype = reference.device, reference.dtype
        self._net, self._flat, self._flat_grad = _flat_network(model, self.names, self.sizes)
        self._compiled_grad: CompiledGradient | None = None  # set on the twin that compiled_gradient() returns
        #: compiled gradients by what they depend on (``_compile_key``), shared with the copies `to`
        #: makes, so that every simulate call of this problem compiles once
        self._compiled_cache: dict[tuple, CompiledGradient] = {}

        self.X, self.y = self._check_data(data)
        self.output_shape = self._probe_output()
        self._check_targets()

    # ----------------------------------------------------------------------------- set-up
    def check_parameters(self) -> None:
        """Raise ModelError if a parameter of the model has no values (the meta device) or
        non-finite ones: a run would start diverged. ``simulate`` checks again, since the
        model's parameters may have changed since the problem was built."""
        for name, p in self.model.named_parameters():
            if p.device.type == "meta":
                raise ModelError(
                    f"model: parameter {name!r} is on the meta device (shape only, no values); "
                    "expected parameters with values (model.to_empty(device=...), then initialise them)"
                )
            bad = int(p.numel() - torch.isfinite(p.detach()).sum())
            if bad:
                entries = "entry" if bad == 1 else "entries"
                raise ModelError(f"model: parameter {name!r} has {bad} non-finite {entries}; expected finite initial parameters")

    def _check_data(self, data: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(data, Sequence) or len(data) != 2:
            raise bad_value("data", type(data).__name__, "a pair (X, y) of tensors", DataError)
        X, y = (torch.as_tensor(a) for a in data)
        if X.ndim < 2 or X.shape[0] == 0:
            raise bad_value("data.X", tuple(X.shape), "shape (N, ...) with N >= 1 examples", DataError)
        if y.ndim < 1 or y.shape[0] != X.shape[0]:
            raise DataError(
                f"data: X has {X.shape[0]} examples but y has {y.shape[0] if y.ndim else 'no axis of'} "
                "labels; expected the same number"
            )
        if X.is_floating_point():  # integer inputs (token ids for an nn.Embedding) stay integers
            if not torch.isfinite(X).all():
                raise DataError("data.X: contains NaN or Inf; expected finite inputs")
            X = X.to(dtype=self.dtype)
        elif X.is_complex():
            raise bad_value("data.X", str(X.dtype), "real inputs (floating, or integer token ids)", DataError)
        X = X.to(device=self.device)
        if self.loss_kind == "cross_entropy":
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise bad_value("data.y", str(y.dtype), "integer class labels for cross_entropy", DataError)
            if y.ndim != 1:
                raise bad_value("data.y", tuple(y.shape), "shape (N,) class labels", DataError)
            y = y.to(device=self.device, dtype=torch.long)
        else:
            if not y.is_floating_point():
                y = y.to(self.dtype)
            if not torch.isfinite(y).all():
                raise DataError("data.y: contains NaN or Inf; expected finite regression targets")
            y = y.to(device=self.device, dtype=self.dtype)
        return X, y

    def _probe_output(self) -> tuple[int, ...]:
        """Run the model on two examples twice, so a model that cannot take X fails here, and one
        whose output is random in training mode (dropout) is refused: its gradient would be a
        random vector, not ∇L. The caller's random state is left as it was."""
        theta, probe = self.initial_theta(), self.X[: min(2, len(self.X))]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                out, again = self._forward(theta, probe), self._forward(theta, probe)
        except Exception as exc:  # the user's model: any failure is a ModelError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelError(f"model: fails on inputs of shape {tuple(self.X.shape[1:])} ({type(exc).__name__}: {first})") from exc
        if not isinstance(out, Tensor):
            raise bad_value("model output", type(out).__name__, "one tensor", ModelError)
        if not torch.equal(out, again):
            raise ModelError(
                "model: gives different outputs for the same inputs and parameters in training mode (dropout or other "
                "randomness), so its gradient is not a function of θ; expected a deterministic model (dropout p=0)"
            )
        return tuple(out.shape[1:])

    def _check_targets(self) -> None:
        if self.loss_kind == "cross_entropy":
            if len(self.output_shape) != 1:
                raise bad_value("model output", self.output_shape, "(num_classes,) logits for cross_entropy", ModelError)
            n_classes = self.output_shape[0]
            lo, hi = int(self.y.min()), int(self.y.max())
            if lo < 0 or hi >= n_classes:
                raise DataError(
                    f"data.y: labels range over [{lo}, {hi}]; expected labels in [0, {n_classes - 1}] "
                    f"for a model with {n_classes} outputs"
                )
        else:
            if self.y.ndim == 1 and self.output_shape == (1,):
                self.y = self.y[:, None]
            if tuple(self.y.shape[1:]) != self.output_shape:
                raise DataError(
                    f"data.y: targets have shape {tuple(self.y.shape[1:])} per example; expected the "
                    f"model's output shape {self.output_shape} for mse"
                )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Problem:
        """A copy on `device` with floating tensors in `dtype` (the model is deep-copied); it shares
        this problem's compiled gradients (``compiled_gradient``)."""
        model = copy.deepcopy(self.model).to(device=device, dtype=dtype).train()
        X = self.X.to(device=device, dtype=dtype if self.X.is_floating_point() else None)
        y = self.y.to(device=device, dtype=dtype if self.y.is_floating_point() else None)
        bound = Problem(model, (X, y), self.loss_kind, self.weight_decay, self.chunk_size)
        bound._compiled_cache = self._compiled_cache
        return bound

    # ----------------------------------------------------------------------------- θ
    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    @property
    def n_examples(self) -> int:
        return self.X.shape[0]

    def initial_theta(self) -> Tensor:
        """A flat copy of the model's current trainable parameters."""
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of `theta` (..., P) shaped like the parameters; no copy."""
        lead = theta.shape[:-1]
        return {n: t.view((*lead, *s)) for n, t, s in zip(self.names, torch.split(theta, self.sizes, dim=-1), self.shapes)}

    def load_into_model(self, theta: Tensor) -> None:
        """Copy `theta` into the model's parameters (for users who continue in plain PyTorch)."""
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for n, v in self.unflatten(theta).items():
                params[n].copy_(v)

    # ----------------------------------------------------------------------------- evaluation
    def _forward(self, theta: Tensor, X: Tensor) -> Tensor:
        """f(X; θ) as a pure function of θ (for torch.func transforms and double backward)."""
        return functional_call(self._net, self.unflatten(theta), (X,))

    def per_example_losses(self, theta: Tensor, index: Tensor | None = None) -> Tensor:
        """ℓ_i(θ) for the examples in `index` (all by default), evaluated together."""
        X, y = (self.X, self.y) if index is None else (self.X[index], self.y[index])
        return _per_example_loss(self.loss_kind, self._forward(theta, X), y)

    def batch_indices(self, sampler: BatchSampler, k: int, seed: int) -> Tensor | None:
        """Step k's mini-batch as `sampler` draws it from `seed` (``DiscreteSGD.batch``); an
        ``Ensemble`` draws one per member when its members have their own seeds."""
        return sampler.batch(self, k, seed)

    def loss(self, theta: Tensor, index: Tensor | None = None) -> Tensor:
        """L(θ): mean data loss (no weight-decay penalty) over `index` (all examples by default)."""
        with torch.no_grad():
            self._flat.copy_(theta)
            return sum(self._mean_loss(chunk, weight) for chunk, weight in self._parts(index))

    def _parts(self, index: Tensor | None) -> list[tuple[Tensor | None, float]]:
        """The chunks that make up `index` (all examples by default), each with its share n_c / n."""
        if index is not None or self.chunk_size is None or self.chunk_size >= self.n_examples:
            return [(index, 1.0)]
        chunks = torch.arange(self.n_examples, device=self.device).split(self.chunk_size)
        return [(c, len(c) / self.n_examples) for c in chunks]

    def _mean_loss(self, index: Tensor | None, weight: float = 1.0) -> Tensor:
        """weight · mean_i∈index ℓ_i, evaluated by the flat-buffer network (PyTorch's reductions)."""
        X, y = (self.X, self.y) if index is None else (self.X[index], self.y[index])
        loss = _batch_loss(self.loss_kind, self._net(X), y)
        return loss if weight == 1.0 else loss * weight

    def loss_and_grad(self, theta: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L(θ), ĝ = ∇L(θ)) on the examples in `index` (all by default): one forward+backward
        of the network, whose parameters are views of one flat buffer holding θ; the gradient
        accumulates into views of one flat gradient buffer. On a ``compiled_gradient()`` twin
        the full-batch evaluation is the compiled function instead."""
        if self._compiled_grad is not None and index is None:
            try:
                grad, loss = self._compiled_grad(theta, self.X, self.y)
                return loss, grad
            except Exception as exc:  # any failure of the tracer or the compiler: carry on eagerly
                warnings.warn(
                    f"compile: compiling the gradient failed ({type(exc).__name__}: {exc}); evaluating it eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._compiled_grad = None
        self._load(theta)
        total = 0.0
        with torch.enable_grad():
            for chunk, weight in self._parts(index):
                loss = self._mean_loss(chunk, weight)
                loss.backward()
                total = total + loss.detach()
        return total, self._flat_grad.clone()

    def _load(self, theta: Tensor) -> None:
        """θ into the network's flat parameter buffer, its flat gradient buffer to zero."""
        with torch.no_grad():
            self._flat.copy_(theta)
            self._flat_grad.zero_()

    def compiled_gradient(self) -> Problem:
        """A twin of this problem (the same network, data and buffers) whose full-batch
        ``loss_and_grad`` is one compiled function θ ↦ (∇L, L) (``CompiledGradient``): the
        forward and backward passes as one graph, elementwise work fused, no copy of θ in or of
        ĝ out. Mini-batches stay eager; a chunked problem stays eager and warns. If tracing,
        compiling or running the compiled code fails, the twin warns once and evaluates eagerly
        from then on. Every such warning is a RuntimeWarning starting "compile:" (what
        ``RK(compile="auto")`` reads as a fallback)."""
        twin = copy.copy(self)
        if len(self._parts(None)) > 1:
            warnings.warn(
                f"compile: a problem evaluated in chunks (chunk_size={self.chunk_size}) evaluates its gradient eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            return twin
        key = self._compile_key()
        if key not in self._compiled_cache:

            def loss(theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
                return _batch_loss(self.loss_kind, self._forward(theta, X), y)

            self._compiled_cache[key] = CompiledGradient(loss)
        twin._compiled_grad = self._compiled_cache[key]
        return twin

    def _compile_key(self) -> tuple:
        """What a compiled gradient depends on beside θ, X and y (its inputs): their shapes,
        dtypes and device, the loss, the parameter layout, the values of every buffer and
        frozen parameter (traced into the graph as constants), and on the CPU torch's thread
        count (``split_contraction`` slices by it)."""
        constants = [(n, t) for n, t in self._net.named_buffers()]
        constants += [(n, p) for n, p in self._net.named_parameters() if n not in self.names]
        return (
            self.loss_kind, self.names, self.shapes, str(self.X.device), torch.get_num_threads() if self.X.device.type == "cpu" else 0,
            tuple(self.X.shape), self.X.dtype, tuple(self.y.shape), self.y.dtype,
            tuple((n, tuple(t.shape), t.dtype, hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest()) for n, t in constants),
        )

    def weighted_grad(self, theta: Tensor, weights: Tensor) -> Tensor:
        """∇_θ Σ_i w_i ℓ_i(θ) over all N examples: one forward+backward of the flat-buffer
        network, as ``loss_and_grad`` (not chunked: BatchNorm couples the examples)."""
        self._load(theta)
        with torch.enable_grad():
            (_per_example_loss(self.loss_kind, self._net(self.X), self.y) @ weights).backward()
        return self._flat_grad.clone()

    def hvp(self, theta: Tensor, v: Tensor, index: Tensor | None = None) -> Tensor:
        """H(θ) v with H = ∇²L (data loss, no penalty), by double backward."""
        return gradient_and_hvp(lambda leaf: self.per_example_losses(leaf, index).mean(), theta, v)[2]

    def loss_grad_hvp(self, theta: Tensor, shift: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """(L(θ), ĝ, H (ĝ + shift·θ)) on all examples, H = ∇²L: the gradient and the Hessian
        applied to it in one pass (``gradient_and_hvp``). A chunked problem takes two passes: the
        gradient, then H v chunk by chunk."""
        if self.chunk_size is not None and self.chunk_size < self.n_examples:
            loss, grad = self.loss_and_grad(theta)
            direction = grad.add(theta, alpha=shift) if shift else grad
            return loss, grad, sum(w * self.hvp(theta, direction, chunk) for chunk, w in self._parts(None))
        along = (lambda grad: grad.add(theta, alpha=shift)) if shift else (lambda grad: grad)
        return gradient_and_hvp(lambda leaf: self.per_example_losses(leaf).mean(), theta, along)

    # ----------------------------------------------------------------------------- metadata
    def describe(self) -> dict[str, Any]:
        """JSON-ready summary, stored in a Dataset's ``problem`` attribute."""
        return {
            "model": type(self.model).__name__,
            "n_params": self.n_params,
            "n_examples": self.n_examples,
            "input_shape": list(self.X.shape[1:]),
            "output_shape": list(self.output_shape),
            "loss": self.loss_kind,
            "weight_decay": self.weight_decay,
            "parameters": {n: list(s) for n, s in zip(self.names, self.shapes)},
        }

    def __repr__(self) -> str:
        return f"Problem({json.dumps(self.describe(), default=str)})"


def _flat_network(model: nn.Module, names: tuple[str, ...], sizes: tuple[int, ...]) -> tuple[nn.Module, Tensor, Tensor]:
    """A private copy of `model` in training mode whose trainable parameters are views of one
    flat buffer and whose gradients accumulate into views of another, so evaluating at a new θ
    is one copy and no concatenation. Normalisation layers stop tracking running statistics:
    they always normalise with the statistics of the evaluated batch and mutate nothing."""
    net = copy.deepcopy(model).train()
    for module in net.modules():
        if isinstance(module, _NormBase):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    params = dict(net.named_parameters())
    reference = params[names[0]]
    flat = torch.empty(sum(sizes), dtype=reference.dtype, device=reference.device)
    flat_grad = torch.zeros_like(flat)
    for name, view, grad_view in zip(names, flat.split(sizes), flat_grad.split(sizes)):
        p = params[name]
        view.copy_(p.detach().reshape(-1))
        p.data = view.view_as(p)
        p.grad = grad_view.view_as(p)
    return net, flat, flat_grad
