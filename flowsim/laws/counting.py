"""Count every conservation law of a model numerically: the rank of a Lie algebra of fields.

For a model f(x; θ) with D parameters, a function h(θ) is conserved by the gradient flow of
*every* loss Σ_i ℓ(f(x_i; θ), y_i) if and only if ∇h is orthogonal to the fields

    χ_{x,w}(θ) = ∂_θ f(x; θ)ᵀ w        (one vector-Jacobian product)

for all inputs x and output directions w, and to every Lie bracket of them,
[X, Y](θ) = DY(θ) X(θ) − DX(θ) Y(θ). So near a generic θ the number of independent laws is

    n_laws = D − dim Lie(W)(θ),     W = span{χ_{x,w}}

(Marcotte, Gribonval & Peyré, "Abide by the law and follow the flow: conservation laws for
gradient flows", NeurIPS 2023). For a softmax cross-entropy the directions are those its
gradient can take, Σ_k w_k = 0; that is what makes the translation laws laws.

The algorithm, at a random θ in float64 (random inputs shaped like the given ones, random
directions w):

1. the values of about 2D fields χ_{x,w}(θ) (one vmapped vector-Jacobian product) span W(θ);
   a greedy Gram–Schmidt keeps a vector when the part of it outside the span exceeds `rtol`
   times the size of the terms it was computed from (float64 round-off is far below);
2. brackets of depth ℓ = 2, 3, …: random right-nested brackets [[A1, A2], …, Aℓ] of fresh
   random fields, by nested Jacobian-vector products (``torch.func.jvp`` over ``grad``), a
   chunk at a time; each raises the rank or not. A bracket is polynomial in the random inputs
   and directions, so once a random bracket of depth ℓ adds nothing, none of that depth does
   (almost surely): a depth ends after `confirm` such misses, and the search ends at the first
   depth that adds nothing. Random brackets, not the ones kept by value: two fields with the
   same value at θ can have different brackets;
3. cheap bounds come with it:

    D − rank W(θ)  ≥  n_laws  ≥  n_known = rank of the Jacobian of the detected exact laws,

   so equal bounds prove the detected laws complete without any bracket (step 2 is skipped).

Laws marked inexact (normalisation eps > 0) are not laws of the model as given and are not
counted in n_known. Every exact detected law is checked to be orthogonal to the fields: one
that is not is named in a warning and the count is not complete. At a degenerate θ (a ReLU
unit off for every input) the count is too high; the random inputs are centred with at least
unit spread to make that unlikely, and `seed` picks another point.

LayerNorm and BatchNorm are evaluated by their formula, (x − mean) / √(var + eps) · γ + β,
not by torch's fused kernels: the forward-mode derivative of the fused kernels' backward is
wrong at third order (torch 2.x), which would make brackets of depth ≥ 3 wrong.
"""

from __future__ import annotations

import copy
import math
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.modules.batchnorm import _NormBase

from ..errors import ModelError, bad_value, check_number
from ..problem import LOSSES, _flat_network
from .detection import detect
from .law import Law, LawSet

#: the most float64 numbers one dense matrix of the count may hold (160 MB)
MEMORY = 20_000_000

@dataclass(frozen=True)
class LawCount:
    """How many independent conservation laws a model has at a random parameter point.

    - `n_params` D; `lie_rank` dim Lie(W)(θ) and `n_laws` = D − lie_rank (None when the model
      was too large for the bracket computation);
    - `n_known`: the rank of the Jacobian of the detected exact laws (None: too large to form);
    - `complete`: n_known == n_laws (or == `first_order_bound` when those meet) and every
      detected law checked; None when the bounds do not decide it;
    - `first_order_bound` = D − rank W(θ) ≥ n_laws, from the fields alone;
    - `gap`: the smallest part outside the span of a field that was kept over the largest of
      one that was not (relative sizes): how clearly the rank was decided.
    """

    n_params: int
    lie_rank: int | None
    n_laws: int | None
    n_known: int | None
    complete: bool | None
    first_order_bound: int
    gap: float
    note: str = ""

    def __str__(self) -> str:
        laws = "?" if self.n_laws is None else self.n_laws
        return (
            f"{self.n_params} parameters, {laws} laws (first-order bound {self.first_order_bound}), "
            f"{self.n_known} known, complete: {self.complete}" + (f" ({self.note})" if self.note else "")
        )


class _Span:
    """An orthonormal basis grown greedily: `add` keeps a vector when the part of it outside
    the span exceeds rtol · scale (scale: the size of the terms the vector was computed from,
    so round-off in a difference of large terms is not mistaken for a new direction)."""

    def __init__(self, dim: int, rtol: float, like: Tensor, capacity: int) -> None:
        self.basis = torch.zeros(capacity, dim, dtype=like.dtype, device=like.device)
        self.rank, self.rtol = 0, rtol
        self.smallest_kept, self.largest_dropped = math.inf, 0.0

    def add(self, vector: Tensor, scale: float) -> bool:
        if scale == 0.0 or self.rank == len(self.basis):
            return False
        rest = vector
        for _ in range(2):  # twice is enough (Gram–Schmidt re-orthogonalisation)
            rest = rest - self.basis[: self.rank].T @ (self.basis[: self.rank] @ rest)
        size = float(rest.norm()) / scale
        if size <= self.rtol:
            self.largest_dropped = max(self.largest_dropped, size)
            return False
        self.smallest_kept = min(self.smallest_kept, size)
        self.basis[self.rank] = rest / rest.norm()
        self.rank += 1
        return True

    @property
    def gap(self) -> float:
        return self.smallest_kept / max(self.largest_dropped, torch.finfo(self.basis.dtype).tiny)


def _functional(model: nn.Module, generator: torch.Generator) -> tuple[Callable[[Tensor, Tensor], Tensor], list, Tensor]:
    """f(θ, x) on a float64 copy of `model` (normalisation from the batch, no running stats),
    its (name, shape) list, and a random point θ: each tensor N(0, s²), s its RMS (at least 0.1)."""
    net = copy.deepcopy(model).to(torch.float64)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if not named:
        raise ModelError("model: has no trainable parameters")
    names = tuple(n for n, _ in named)
    sizes = tuple(p.numel() for _, p in named)
    net, _, _ = _flat_network(net, names, sizes)
    for module in net.modules():
        if isinstance(module, (nn.LayerNorm, _NormBase)):
            module.forward = types.MethodType(_explicit_norm, module)
    layout = [(n, p.shape) for n, p in named]
    theta = torch.cat(
        [torch.randn(p.numel(), generator=generator, dtype=torch.float64) * max(float(p.detach().square().mean().sqrt()), 0.1) for _, p in named]
    )

    def f(theta: Tensor, x: Tensor) -> Tensor:
        params = {n: t.view(s) for (n, s), t in zip(layout, theta.split(sizes))}
        return functional_call(net, params, (x,))

    return f, layout, theta


def _explicit_norm(self: nn.Module, x: Tensor) -> Tensor:
    """(x − mean) / √(var + eps) · γ + β over the normalised axes (the last ones for a
    LayerNorm; all but the channel axis 1 for a BatchNorm, batch statistics), op by op."""
    if isinstance(self, nn.LayerNorm):
        dims = tuple(range(-len(self.normalized_shape), 0))
        shape = self.normalized_shape
    else:
        dims = (0, *range(2, x.ndim))
        shape = (-1, *(1,) * (x.ndim - 2))
    centred = x - x.mean(dims, keepdim=True)
    out = centred / (centred.square().mean(dims, keepdim=True) + self.eps).sqrt()
    if self.weight is not None:
        out = out * self.weight.reshape(shape)
    return out if self.bias is None else out + self.bias.reshape(shape)


def _random_inputs(inputs: Tensor, n: int, batch: int, generator: torch.Generator) -> Tensor:
    """(n, batch, *inputs.shape[1:]) inputs shaped like the given ones: centred Gaussians with
    at least unit spread (so every ReLU is on for some inputs and off for others), or integers
    drawn from the range of the given ones."""
    shape = (n, batch, *inputs.shape[1:])
    if inputs.is_floating_point():
        spread = max(float(inputs.double().square().mean().sqrt()), 1.0)
        return spread * torch.randn(shape, generator=generator, dtype=torch.float64)
    low, high = int(inputs.min()), int(inputs.max())
    return torch.randint(low, high + 1, shape, generator=generator)


def _directions(shape: torch.Size, n: int, loss: str, generator: torch.Generator) -> Tensor:
    """(n, *shape) random output directions w; for cross-entropy Σ_k w_k = 0 (over classes)."""
    w = torch.randn((n, *shape), generator=generator, dtype=torch.float64)
    return w - w.mean(-1, keepdim=True) if loss == "cross_entropy" else w


def count(
    model: nn.Module,
    inputs: Tensor,
    loss: str = "cross_entropy",
    *,
    laws: Sequence[Law] | None = None,
    n_fields: int | None = None,
    batch: int | None = None,
    rtol: float = 1e-8,
    max_params: int = 1000,
    seed: int = 0,
    chunk_size: int = 16,
    confirm: int = 4,
) -> LawCount:
    """The number of independent conservation laws of `model` under `loss`, and whether the
    detected ones are all of them (see the module docstring).

    **Main arguments**

    - `inputs`: example inputs, batch first: they fix the shape, dtype and range of the random
      inputs the fields are drawn at.
    - `loss`: ``"cross_entropy"`` (output directions summing to zero) or ``"mse"``.
    - `laws`: the known laws (``flowsim.laws.detect(model, loss, inputs)`` by default).

    **Other arguments**

    - `n_fields`: fields for the first-order span (2D by default); `batch`: inputs per field (1,
      or 8 for models with BatchNorm, whose output depends on the whole batch); `rtol`: rank
      tolerance; `seed`: the random point, inputs and directions; `chunk_size`: brackets
      evaluated together by ``torch.func.vmap``; `confirm`: misses that end a depth.
    - `max_params`: above this many parameters no bracket is computed: the result has
      ``n_laws=None`` and the bounds only (the first-order one from as many fields as fit in
      memory), and a warning says so.

    **Returns** a ``LawCount``. **Raises** ModelError or ConfigError for bad arguments.
    """
    if loss not in LOSSES:
        raise bad_value("problem.loss", loss, f"one of {', '.join(LOSSES)}")
    if not isinstance(inputs, Tensor) or inputs.ndim < 2 or len(inputs) == 0:
        raise bad_value("inputs", getattr(inputs, "shape", type(inputs).__name__), "a tensor of example inputs, batch first", ModelError)
    rtol = check_number("rtol", rtol, minimum=0.0, exclusive_minimum=True)
    max_params = check_number("max_params", max_params, integer=True, minimum=1)
    chunk_size = check_number("chunk_size", chunk_size, integer=True, minimum=1)
    confirm = check_number("confirm", confirm, integer=True, minimum=1)
    generator = torch.Generator().manual_seed(seed)
    f, layout, theta = _functional(model, generator)
    dim = theta.numel()
    too_large = dim > max_params
    n_fields = check_number("n_fields", n_fields, integer=True, minimum=1) if n_fields is not None else 2 * min(dim, max_params)
    if batch is None:
        batch = 8 if any(isinstance(m, _NormBase) for m in model.modules()) else 1
    batch = check_number("batch", batch, integer=True, minimum=1)

    xs = _random_inputs(inputs, n_fields, batch, generator)
    with torch.no_grad():
        out = f(theta, xs[0])
    ws = _directions(out.shape, n_fields, loss, generator)

    def field(theta: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """χ_{x,w}(θ) = ∂_θ f(x; θ)ᵀ w."""
        return grad(lambda t: (f(t, x) * w).sum())(theta)

    # 1. the span of the fields' values: the first-order bound
    if too_large:
        n_fields = max(1, min(n_fields, MEMORY // dim))
        xs, ws = xs[:n_fields], ws[:n_fields]
    values = vmap(field, in_dims=(None, 0, 0), chunk_size=64)(theta, xs, ws)
    span = _Span(dim, rtol, theta, capacity=min(dim, n_fields) if too_large else dim)
    for value in values:
        span.add(value, float(value.norm()))
    first_order_bound = dim - span.rank

    # the detected laws: their rank, and whether each is orthogonal to every field
    if laws is None:
        laws = detect(model, loss=loss, inputs=inputs)
    exact = [law for law in laws if law.exact]
    n_known, notes = _known_rank(exact, layout, theta, values)
    if n_known is None:
        notes.append("too many law components × parameters for the rank of their Jacobian")
    if too_large:
        notes.append(f"{dim} parameters > max_params={max_params}: brackets not computed, bounds only")
        warnings.warn(f"flowsim.laws.count: {notes[-1]}", UserWarning, stacklevel=2)
        complete = True if n_known == first_order_bound and len(notes) == 1 else None
        return LawCount(dim, None, None, n_known, complete, first_order_bound, span.gap, "; ".join(notes))

    # 2. brackets, depth by depth, unless equal bounds already prove the count
    depth = 2 if n_known < first_order_bound else 0
    while depth and span.rank < dim:
        terms = vmap(_outer_bracket_terms(field, depth, theta))
        rank, misses = span.rank, 0
        while misses < confirm and span.rank < dim:
            x = _random_inputs(inputs, chunk_size * depth, batch, generator).reshape(chunk_size, depth, *xs.shape[1:])
            w = _directions(ws.shape[1:], chunk_size * depth, loss, generator).reshape(chunk_size, depth, *ws.shape[1:])
            d_field, d_bracketed = terms(x, w)
            for first, second in zip(d_field, d_bracketed):
                misses += not span.add(first - second, float(first.norm() + second.norm()))
        depth = depth + 1 if span.rank > rank else 0
    n_laws = dim - span.rank
    if n_known > n_laws:
        notes.append(f"the detected laws have rank {n_known} > {n_laws}: rtol is too loose for this model")
    for note in notes:
        warnings.warn(f"flowsim.laws.count: {note}", UserWarning, stacklevel=2)
    return LawCount(dim, span.rank, n_laws, n_known, n_known == n_laws and not notes, first_order_bound, span.gap, "; ".join(notes))


def _known_rank(laws: list[Law], layout: list, theta: Tensor, values: Tensor) -> tuple[int | None, list[str]]:
    """The rank of the Jacobian of `laws` at θ (None if too large to form), and a note for each
    law with a component not orthogonal to the fields' values (relative 1e-8)."""
    if not laws:
        return 0, []
    law_set = LawSet(laws, [n for n, _ in layout], [s for _, s in layout])
    if law_set.size * theta.numel() > MEMORY:
        return None, []
    jacobian = law_set.jacobian(theta)
    unit = jacobian / jacobian.norm(dim=1, keepdim=True).clamp_min(torch.finfo(theta.dtype).tiny)
    along = (unit @ (values / values.norm(dim=1, keepdim=True).clamp_min(torch.finfo(theta.dtype).tiny)).T).abs().amax(1)
    notes, start = [], 0
    for law in laws:
        worst = float(along[start : start + law.size].max())
        start += law.size
        if worst > 1e-8:
            notes.append(f"{law.kind} at {law.site} is not conserved by this model (part {worst:.1e} along a field)")
    return int(torch.linalg.matrix_rank(jacobian, rtol=1e-10)), notes


def _outer_bracket_terms(field: Callable[[Tensor, Tensor, Tensor], Tensor], depth: int, theta: Tensor):
    """(X, W) ↦ (DA(θ) Z(θ), DZ(θ) A(θ)) for Z = [[A1, A2], …, A(ℓ−1)] and A = Aℓ, the fields
    of inputs X[i] and directions W[i]: their difference is the bracket [Z, A](θ) of depth ℓ."""
    inner = _nested(field, depth - 1)

    def terms(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        z = lambda t: inner(t, x[:-1], w[:-1])  # noqa: E731
        a = lambda t: field(t, x[-1], w[-1])  # noqa: E731
        return jvp(a, (theta,), (z(theta),))[1], jvp(z, (theta,), (a(theta),))[1]

    return terms


def _nested(field: Callable[[Tensor, Tensor, Tensor], Tensor], level: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Z(θ, X, W) = [[χ_{X0,W0}, χ_{X1,W1}], …, χ_{X(ℓ−1),W(ℓ−1)}](θ), brackets by nested
    Jacobian-vector products: [Z, G](θ) = DG(θ) Z(θ) − DZ(θ) G(θ)."""
    if level == 1:
        return lambda t, x, w: field(t, x[0], w[0])
    inner = _nested(field, level - 1)

    def bracket(t: Tensor, x: Tensor, w: Tensor) -> Tensor:
        z = lambda s: inner(s, x[:-1], w[:-1])  # noqa: E731
        g = lambda s: field(s, x[-1], w[-1])  # noqa: E731
        return jvp(g, (t,), (z(t),))[1] - jvp(z, (t,), (g(t),))[1]

    return bracket


__all__ = ["LawCount", "count"]
