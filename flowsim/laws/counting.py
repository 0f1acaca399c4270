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

1. the values of about 2D fields χ_{x,w}(θ) (one vmapped vector-Jacobian product) span W(θ).
   Every rank is numerical: the vectors computed, each divided by the size of the terms it
   was computed from, have as many singular values above √N · ``ROUNDOFF`` (N vectors, each
   allowed a relative round-off of ``ROUNDOFF`` = 1e-12);
2. brackets of depth ℓ = 2, 3, …: random right-nested brackets [[A1, A2], …, Aℓ] of fresh
   random fields, by nested Jacobian-vector products (``torch.func.jvp`` over ``grad``), a
   chunk at a time; a greedy Gram–Schmidt says whether each adds to the span (its part
   outside it above `rtol` times the size of its terms) or is a miss. A bracket is
   polynomial in the random inputs and directions, so once a random bracket of depth ℓ adds
   nothing, none of that depth does (almost surely): a depth ends after `confirm` misses, and
   the search ends at the first depth that does not raise the rank. Random brackets, not the
   ones kept by value: two fields with the same value at θ can have different brackets. The
   search stops at `max_depth` and after `max_seconds` (before a chunk predicted to overrun
   them): its count is then an upper bound (``stopped`` says which cap);
3. cheap bounds come with it:

    D − rank W(θ)  ≥  n_laws  ≥  n_known = rank of the Jacobian of the detected exact laws,

   so equal bounds prove the detected laws complete without any bracket (step 2 is skipped).

**Points.** The rank is that of a generic θ only where θ is not degenerate: a ReLU unit that
is off for every random input (its weights get no field), or on for every one (it is linear
there), adds laws that are not laws, and so does one positive on too few of the ~2D inputs for
its weights' fields to span (a ReLU MLP gave 21, 19, 34 at seeds 0, 1, 2 for its true 19: one
unit on 1 % of the inputs at seed 0). So at each point, site by site in call order, the bias
that adds to every ReLU / leaky-ReLU input (module or function; the last module run before it
with a bias of the right size) is shifted so that each unit (a feature: the last axis, the
channel axis after a convolution or for inputs of 4 or more axes) is positive on a random
fraction in [0.3, 0.7] of the random inputs; a point with a unit positive on under `MIXED`
(5 %) or over 1 − `MIXED` of them (no bias to shift) is drawn again, `tries` times, then used
with a note naming the units. The count is made at `points` points (seeds `seed`, `seed` + 1,
…) and decided by agreement: `n_laws` is their common value; where they disagree it is the
most common one (the smallest of a tie) among the points with every unit mixed (all points
where none is), `counts` lists every one, the note says so and ``complete`` is False.
Max-pooling is not checked.

Laws marked inexact (normalisation eps > 0) are not laws of the model as given and are not
counted in n_known. Every exact detected law is checked to be orthogonal to the fields: one
that is not is named in a warning and the count is not complete. A model torch.fx cannot
trace (so no law is detected) is counted with n_known = 0 and a note. Where the count finds
more laws than detected and detection found symmetries whose generator depends on θ (a shift
that a layer's bias undoes, b → b − W·shift: their laws are no flowsim Law), the note names
them.

Evaluation by formulas forward-mode AD supports: LayerNorm (the module or ``F.layer_norm``)
and BatchNorm by (x − mean) / √(var + eps) · γ + β, not torch's fused kernels (their
forward-mode derivative of the backward is wrong at third order, torch 2.x, which would make
brackets of depth ≥ 3 wrong); ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention`` with
``need_weights=False``, ``nn.TransformerEncoderLayer``) by softmax(q kᵀ · scale + mask) v
(attn_mask, is_causal, scale and enable_gqa honoured); ``torch._weight_norm`` (weight_norm,
parametrised or not) by v · g / ‖v‖. Dropout with p > 0 is refused (ModelError): the count
evaluates the model in training mode, as flowsim trains it, so dropout makes every field
random; use p = 0. A forward torch.func cannot differentiate (data-dependent Python control
flow, ``.item()``) is a ModelError naming the cause.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import time
import types
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.modules.batchnorm import _NormBase
from torch.overrides import TorchFunctionMode

from ..errors import ModelError, bad_value, check_number, check_seed
from ..problem import LOSSES, _flat_network
from .detection import detect, detect_with_hints
from .law import Law, LawSet

#: the most float64 numbers one dense matrix of the count may hold (160 MB)
MEMORY = 20_000_000


@dataclass(frozen=True)
class LawCount:
    """How many independent conservation laws a model has, decided at random parameter points.

    - `n_params` D; `lie_rank` dim Lie(W)(θ) and `n_laws` = D − lie_rank (None when the model
      was too large for the bracket computation): the value the points agree on (the most
      common one where they disagree), an upper bound where a cap stopped the search;
    - `n_known`: the rank of the Jacobian of the detected exact laws (None: too large to form);
    - `complete`: the points agree, n_known == n_laws (or == `first_order_bound` when those
      meet) and every detected law checked; None when the bounds do not decide it;
    - `first_order_bound` = D − rank W(θ) ≥ n_laws, from the fields alone (smallest over points);
    - `gap`: σ_r / σ_(r+1) at the decided rank r, σ the singular values of every field and
      bracket computed, each divided by the size of its terms (smallest over points): how
      clearly the rank was decided;
    - `counts`: n_laws at each point (None: bounds only), at the seeds `seeds`;
    - `stopped`: "" when every bracket search ended by itself, else the cap that stopped one
      ("max_depth" or "max_seconds"): n_laws is then only an upper bound.
    """

    n_params: int
    lie_rank: int | None
    n_laws: int | None
    n_known: int | None
    complete: bool | None
    first_order_bound: int
    gap: float
    note: str = ""
    counts: tuple[int | None, ...] = ()
    seeds: tuple[int, ...] = ()
    stopped: str = ""

    def __str__(self) -> str:
        laws = "?" if self.n_laws is None else ("≤ " if self.stopped else "") + str(self.n_laws)
        at = f" at {len(self.counts)} points {', '.join('?' if c is None else str(c) for c in self.counts)}" if len(self.counts) > 1 else ""
        return (
            f"{self.n_params} parameters, {laws} laws{at} (first-order bound {self.first_order_bound}), "
            f"{self.n_known} known, complete: {self.complete}" + (f" ({self.note})" if self.note else "")
        )


#: the relative round-off allowed in one computed field or bracket, divided by the size of the
#: terms it was computed from: float64's ε = 2.2e-16 about 4,500 times (on the zoo models the
#: singular values of round-off are ≈ 1e-15; the weakest real direction seen, which the eps of
#: the LayerNorms of a 2-layer post-norm encoder leaves, 2e-9)
ROUNDOFF = 1e-12


class _Rows:
    """Every vector the count computed, each divided by the size of the terms it came from (so
    of norm ≤ 1), and their numerical rank: the number of singular values above √N · ROUNDOFF.
    N rows each off by at most ROUNDOFF make a matrix off by E with ‖E‖₂ ≤ ‖E‖_F ≤ √N · ROUNDOFF,
    which moves no singular value by more (Weyl); compressing them by a QR factorisation adds
    about D · ε · √N, below that for D < 4,500. The rank is not read off the greedy span: a
    basis vector grown from a vector whose new part was barely above rtol carries that vector's
    round-off, magnified, into every later projection (a 2-layer post-norm encoder got ranks
    one too high at two of ten points, its vectors' singular values a gap of 1e5 apart there)."""

    def __init__(self) -> None:
        self.pending: list[Tensor] = []
        self.matrix: Tensor | None = None  # the rows so far, compressed to their R factor
        self.n = 0

    def add(self, vectors: Tensor, scales: Tensor) -> None:
        """Rows (n, D), each with the size of the terms it was computed from (n,); rows of size
        0 are left out."""
        kept = scales > 0
        self.pending.append(vectors[kept] / scales[kept, None])
        self.n += int(kept.sum())

    def rank(self) -> tuple[int, float]:
        """The numerical rank, and σ_r / σ_(r+1) there (how clearly it is decided)."""
        parts = ([] if self.matrix is None else [self.matrix]) + self.pending
        if not parts:
            return 0, math.inf
        matrix = torch.cat(parts)
        if len(matrix) > matrix.shape[1]:
            matrix = torch.linalg.qr(matrix, mode="r").R  # the same singular values, D × D
        self.matrix, self.pending = matrix, []
        sv = torch.linalg.svdvals(matrix)
        rank = int((sv > math.sqrt(self.n) * ROUNDOFF).sum())
        kept = float(sv[rank - 1]) if rank else math.inf
        dropped = float(sv[rank]) if rank < len(sv) else 0.0
        return rank, kept / max(dropped, torch.finfo(sv.dtype).tiny)


class _Span:
    """An orthonormal basis grown greedily: `add` keeps a vector when the part of it outside
    the span exceeds rtol · scale (scale: the size of the terms the vector was computed from,
    so round-off in a difference of large terms is not mistaken for a new direction). It
    decides when a depth of brackets has added nothing (`confirm` misses); the rank is
    ``_Rows``'."""

    def __init__(self, dim: int, rtol: float, like: Tensor, capacity: int) -> None:
        self.basis = torch.zeros(capacity, dim, dtype=like.dtype, device=like.device)
        self.rank, self.rtol = 0, rtol

    def add(self, vector: Tensor, scale: float) -> bool:
        if scale == 0.0 or self.rank == len(self.basis):
            return False
        rest = vector
        for _ in range(2):  # twice is enough (Gram–Schmidt re-orthogonalisation)
            rest = rest - self.basis[: self.rank].T @ (self.basis[: self.rank] @ rest)
        if float(rest.norm()) <= self.rtol * scale:
            return False
        self.basis[self.rank] = rest / rest.norm()
        self.rank += 1
        return True


# ----------------------------------------------------------------------------- evaluation
_KINKS = {"relu", "relu_", "leaky_relu", "leaky_relu_"}
_DROPOUTS = {"dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_", "feature_dropout", "feature_dropout_"}


def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """softmax(q kᵀ · scale + mask) v, op by op (``F.scaled_dot_product_attention`` at dropout 0)."""
    if enable_gqa and key.size(-3) != query.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        allowed = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1) @ value


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """v · g / ‖v‖ (norm over every axis but `dim`; over all of them for dim = −1), op by op."""
    if dim == -1:
        return v * (g / v.square().sum().sqrt())
    axes = [a for a in range(v.ndim) if a != dim % v.ndim]
    return v * (g / v.square().sum(axes, keepdim=True).sqrt())


def _argument(args: tuple, kwargs: dict, index: int, name: str, default):
    return kwargs[name] if name in kwargs else args[index] if len(args) > index else default


class _Evaluate(TorchFunctionMode):
    """Evaluates the model by formulas forward-mode AD supports (scaled-dot-product attention,
    weight norm), refuses dropout with p > 0, and, given a `watch` list, records for every
    ReLU / leaky-ReLU call which elements of its input are positive."""

    def __init__(self, watch: list | None = None, names: list | None = None, last_bias: list | None = None) -> None:
        super().__init__()
        self.watch, self.names, self.last_bias, self.used = watch, names, last_bias, set()

    def __enter__(self):
        # Python functions that call these from their own module (F.multi_head_attention_forward,
        # the weight-norm parametrisation) run with this mode suspended: patch their globals too
        if not _PATCHED:
            _PATCHED.update(sdpa=torch.nn.functional.scaled_dot_product_attention, weight_norm=torch._weight_norm)
            torch.nn.functional.scaled_dot_product_attention = self._sdpa
            torch._weight_norm = self._weight_norm
        _PATCHED["depth"] = _PATCHED.get("depth", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc):
        _PATCHED["depth"] -= 1
        if not _PATCHED["depth"]:
            torch.nn.functional.scaled_dot_product_attention = _PATCHED["sdpa"]
            torch._weight_norm = _PATCHED["weight_norm"]
            _PATCHED.clear()
        return super().__exit__(*exc)

    def _sdpa(self, *args, **kwargs) -> Tensor:
        if float(_argument(args, kwargs, 4, "dropout_p", 0.0)) > 0:
            raise ModelError("model: attention dropout (dropout_p > 0) makes the fields random, so its laws cannot be counted; use dropout 0")
        self.used.add("scaled_dot_product_attention")
        return _sdpa(*args, **kwargs)

    def _weight_norm(self, *args, **kwargs) -> Tensor:
        self.used.add("_weight_norm")
        return _weight_norm(*args, **kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "scaled_dot_product_attention":
            return self._sdpa(*args, **kwargs)
        if name == "_weight_norm":
            return self._weight_norm(*args, **kwargs)
        if name == "layer_norm":  # F.layer_norm called by the model itself (nn.LayerNorm's forward is replaced)
            self.used.add("layer_norm")
            return _layer_norm(*args, **kwargs)
        if name in _DROPOUTS:
            p = float(_argument(args, kwargs, 1, "p", 0.5))
            training = bool(_argument(args, kwargs, 2, "training", kwargs.get("train", True)))
            if p > 0 and training:
                raise ModelError(
                    f"model: {name} with p={p:g} makes the fields random, so its laws cannot be counted; the count runs the "
                    "model in training mode, as flowsim trains it: use p=0"
                )
        if self.watch is not None and name in _KINKS and isinstance(args[0], Tensor):
            self.watch.append((self.names[-1] if self.names else "", args[0].detach().clone(), self.last_bias[0]))
        return func(*args, **kwargs)


#: the functions _Evaluate replaced while it is entered (and how deep)
_PATCHED: dict = {}


def _functional(model: nn.Module) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor], list, list]:
    """A float64 training-mode copy of `model` (normalisation from the batch, no running stats),
    f(θ, x) on it, its (name, shape) list and the scale of each tensor (its RMS, at least 0.1)."""
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
    scales = [(p.numel(), max(float(p.detach().square().mean().sqrt()), 0.1)) for _, p in named]
    mode = {"explicit": True}

    def f(theta: Tensor, x: Tensor) -> Tensor:
        params = {n: t.view(s) for (n, s), t in zip(layout, theta.split(sizes))}
        if not mode["explicit"]:
            return functional_call(net, params, (x,))
        with _Evaluate():
            return functional_call(net, params, (x,))

    f.mode = mode  # type: ignore[attr-defined]
    return net, f, layout, scales


def _draw_theta(scales: list, generator: torch.Generator) -> Tensor:
    """A random point: each tensor N(0, s²), s its scale."""
    return torch.cat([torch.randn(n, generator=generator, dtype=torch.float64) * s for n, s in scales])


def _explicit_norm(self: nn.Module, x: Tensor) -> Tensor:
    """(x − mean) / √(var + eps) · γ + β over the normalised axes (the last ones for a
    LayerNorm; all but the channel axis 1 for a BatchNorm, batch statistics), op by op."""
    if isinstance(self, nn.LayerNorm):
        return _layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    dims = (0, *range(2, x.ndim))
    shape = (-1, *(1,) * (x.ndim - 2))
    centred = x - x.mean(dims, keepdim=True)
    out = centred / (centred.square().mean(dims, keepdim=True) + self.eps).sqrt()
    if self.weight is not None:
        out = out * self.weight.reshape(shape)
    return out if self.bias is None else out + self.bias.reshape(shape)


def _layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm``, (x − mean) / √(var + eps) · γ + β over the trailing axes of
    `normalized_shape`, op by op."""
    size = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(size), 0))
    centred = x - x.mean(dims, keepdim=True)
    out = centred / (centred.square().mean(dims, keepdim=True) + eps).sqrt()
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def _random_inputs(inputs: Tensor, n: int, batch: int, generator: torch.Generator) -> Tensor:
    """(n, batch, *inputs.shape[1:]) inputs shaped like the given ones: centred Gaussians with
    at least unit spread, or integers drawn from the range of the given ones."""
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


#: a unit is mixed when it is positive on between this fraction of the random inputs and 1 − it
MIXED = 0.05


def activation_patterns(net: nn.Module, f: Callable[[Tensor, Tensor], Tensor], theta: Tensor, xs: Tensor) -> list[tuple[str, str | None, Tensor]]:
    """For every ReLU / leaky-ReLU call of f(θ, ·) on the inputs `xs` (n, batch, …), in call
    order: the site (``module name #call``), the name of the bias that adds to its input (the
    last module run before it that has one of the right size; None if none) and its input as
    (units, samples). A unit is a feature: the last axis, or axis 1 (channels) for inputs of 4
    or more axes or after a convolution."""
    names: list[str] = []
    last_bias: list = [None]
    watch: list[tuple[str, Tensor]] = []
    handles = []

    def after(module: nn.Module, name: str) -> None:
        names.pop()
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor) and bias.ndim == 1:
            last_bias[0] = (name, bias.numel(), isinstance(module, nn.modules.conv._ConvNd))

    for name, module in net.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name or "model": names.append(name) and None))
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: after(m, name)))
    try:
        with torch.no_grad(), _Evaluate(watch, names, last_bias):
            chunks = [xs.flatten(0, 1)] if xs.shape[1] == 1 else list(xs[:64])
            for x in chunks:
                last_bias[0] = None
                f(theta, x)
    finally:
        for handle in handles:
            handle.remove()
    calls = len(watch) // len(chunks)
    patterns, seen = [], Counter()
    for i in range(calls):
        site, _, bias = watch[i]
        values = torch.cat([watch[i + j * calls][1] for j in range(len(chunks))])
        conv = bias is not None and bias[2]
        axis = 1 if values.ndim >= 4 or (conv and values.ndim >= 3) else -1
        values = values.movedim(axis, 0).flatten(1)
        seen[site] += 1
        patterns.append((f"{site} #{seen[site]}", bias[0] if bias is not None and bias[1] == len(values) else None, values))
    return patterns


def _degenerate(patterns: list) -> list[str]:
    """'site: k off, m on' for each site with units positive on fewer than MIXED of the inputs
    (off) or on more than 1 − MIXED (on: nearly linear)."""
    bad = []
    for site, _, values in patterns:
        fraction = (values > 0).double().mean(1)
        off, on = int((fraction < MIXED).sum()), int((fraction > 1 - MIXED).sum())
        if off or on:
            bad.append(f"{site}: {off} off, {on} on of {len(fraction)} units")
    return bad


def _mix(setup: types.SimpleNamespace, theta: Tensor, xs: Tensor, generator: torch.Generator) -> tuple[Tensor, list[str]]:
    """θ with the bias of every ReLU site shifted, site by site in call order, so each unit is
    positive on a random fraction in [0.3, 0.7] of the inputs; the sites still degenerate."""
    theta = theta.clone()
    offsets, start = {}, 0
    for name, shape in setup.layout:
        offsets[name] = (start, math.prod(shape))
        start += math.prod(shape)
    patterns = activation_patterns(setup.net, setup.f, theta, xs)
    for i in range(len(patterns)):
        _, bias, values = patterns[i]
        if bias is None or f"{bias}.bias" not in offsets:
            continue
        begin, size = offsets[f"{bias}.bias"]
        q = 0.3 + 0.4 * torch.rand(size, 1, generator=generator, dtype=torch.float64)
        sorted_values = values.sort(1).values
        position = q * (values.shape[1] - 1)
        low = position.floor().long()
        high = (low + 1).clamp_max(values.shape[1] - 1)
        weight = position - low
        shift = sorted_values.gather(1, low) * (1 - weight) + sorted_values.gather(1, high) * weight
        theta[begin : begin + size] -= shift[:, 0].to(theta.dtype)
        patterns = activation_patterns(setup.net, setup.f, theta, xs)
    return theta, _degenerate(patterns)


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
    points: int = 3,
    tries: int = 5,
    max_depth: int = 8,
    max_seconds: float = 120.0,
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
    - `points`: the count is made at this many random points (seeds `seed`, `seed` + 1, …)
      and decided where they agree; `tries`: draws of a point until every ReLU unit is mixed.
    - `max_depth`, `max_seconds`: caps on the bracket search (its depth; the wall time of the
      whole call): a capped count is an upper bound (``stopped``, a note, a warning).

    **Other arguments**

    - `n_fields`: fields for the first-order span (2D by default); `batch`: inputs per field (1,
      or 8 for models with BatchNorm, whose output depends on the whole batch); `rtol`: a
      bracket whose part outside the span is at most rtol times its terms' size is a miss
      (the rank itself is decided by singular values: module docstring); `chunk_size`:
      brackets evaluated together by ``torch.func.vmap``; `confirm`: misses that end a depth.
    - `max_params`: above this many parameters no bracket is computed: the result has
      ``n_laws=None`` and the bounds only (the first-order one from as many fields as fit in
      memory), and a warning says so.

    **Returns** a ``LawCount``. **Raises** ModelError or ConfigError for bad arguments, for
    dropout with p > 0 and for a forward torch.func cannot differentiate.
    """
    started = time.monotonic()
    if loss not in LOSSES:
        raise bad_value("problem.loss", loss, f"one of {', '.join(LOSSES)}")
    if not isinstance(inputs, Tensor) or inputs.ndim < 2 or len(inputs) == 0:
        raise bad_value("inputs", getattr(inputs, "shape", type(inputs).__name__), "a tensor of example inputs, batch first", ModelError)
    rtol = check_number("rtol", rtol, minimum=0.0, exclusive_minimum=True)
    max_params = check_number("max_params", max_params, integer=True, minimum=1)
    chunk_size = check_number("chunk_size", chunk_size, integer=True, minimum=1)
    confirm = check_number("confirm", confirm, integer=True, minimum=1)
    points = check_number("points", points, integer=True, minimum=1)
    tries = check_number("tries", tries, integer=True, minimum=1)
    max_depth = check_number("max_depth", max_depth, integer=True, minimum=1)
    max_seconds = check_number("max_seconds", max_seconds, minimum=0.0, exclusive_minimum=True)
    seed = check_seed("seed", seed)  # the points use seed, seed + 1, …: torch takes up to 2**64 − 1
    net, f, layout, scales = _functional(model)
    dim = sum(n for n, _ in scales)
    too_large = dim > max_params
    n_fields = check_number("n_fields", n_fields, integer=True, minimum=1) if n_fields is not None else 2 * min(dim, max_params)
    if too_large:
        n_fields = max(1, min(n_fields, MEMORY // dim))
    if batch is None:
        batch = 8 if any(isinstance(m, _NormBase) for m in model.modules()) else 1
    batch = check_number("batch", batch, integer=True, minimum=1)

    # a probe: refuses dropout, finds whether the explicit formulas are needed at all
    probe = _Evaluate()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad(), probe:
        out = functional_call(net, {n: t.view(s) for (n, s), t in zip(layout, _draw_theta(scales, generator).split([n for n, _ in scales]))}, (_random_inputs(inputs, 1, batch, generator)[0],))
    f.mode["explicit"] = bool(probe.used)  # type: ignore[attr-defined]

    notes: list[str] = []
    hints: list[str] = []  # symmetries detection finds whose laws no flowsim Law expresses
    if laws is None:
        try:
            laws, hints = detect_with_hints(model, loss=loss, inputs=inputs)
        except ModelError as error:
            laws = []
            notes.append(f"no law detected ({error}); n_known = 0")
    exact = [law for law in laws if law.exact]

    setup = types.SimpleNamespace(
        net=net, f=f, layout=layout, scales=scales, dim=dim, too_large=too_large, n_fields=n_fields, batch=batch, inputs=inputs, loss=loss,
        out_shape=out.shape, rtol=rtol, chunk_size=chunk_size, confirm=confirm, max_depth=max_depth, deadline=started + max_seconds, exact=exact,
    )
    results = []
    for i in range(points):
        if results and time.monotonic() >= setup.deadline:
            notes.append(f"only {len(results)} of {points} points within max_seconds={max_seconds:g}")
            break
        results.append(_count_at(setup, seed + i, tries))
    seeds = tuple(r.seed for r in results)
    for r in results:
        notes += [f"at seed {r.seed}: {note}" if len(results) > 1 else note for note in r.notes]
    law_notes = [note for r in results for note in r.law_notes]
    notes += list(dict.fromkeys(law_notes))
    known = [r.n_known for r in results]
    n_known = None if None in known else max(known)
    if n_known is None:
        notes.append("too many law components × parameters for the rank of their Jacobian")
    first_order_bound = min(r.first_order_bound for r in results)
    gap = min(r.gap for r in results)
    counts = tuple(r.n_laws for r in results)

    if too_large:
        notes.append(f"{dim} parameters > max_params={max_params}: brackets not computed, bounds only")
        for note in notes:
            warnings.warn(f"flowsim.laws.count: {note}", UserWarning, stacklevel=2)
        complete = True if n_known == first_order_bound and not law_notes and all(r.mixed for r in results) else None
        return LawCount(dim, None, None, n_known, complete, first_order_bound, gap, "; ".join(notes), counts, seeds)

    # a point with a ReLU unit off or on for nearly every input counts too many laws: where
    # the points disagree, those with every unit mixed decide
    trusted = [r.n_laws for r in results if r.mixed] or list(counts)
    frequency = Counter(trusted)
    n_laws = min(trusted, key=lambda c: (-frequency[c], c))
    agree = len(set(counts)) == 1
    if not agree:
        among = "" if len(trusted) == len(counts) else " of the points with every ReLU unit mixed"
        notes.append(f"the points disagree (n_laws {', '.join(map(str, counts))} at seeds {', '.join(map(str, seeds))}): n_laws is the most common{among}, not decided")
    stopped = next((r.stopped for r in results if r.stopped), "")
    if stopped:
        notes.append(f"the bracket search was stopped by {stopped}: n_laws ≤ {n_laws} is an upper bound")
    if n_known is not None and n_known > n_laws:
        notes.append(f"the detected laws have rank {n_known} > {n_laws}: the rank was decided too high (round-off above ROUNDOFF = {ROUNDOFF:g} in this model's fields?)")
    if hints and n_known is not None and n_laws > n_known:
        notes.append(
            "detection finds symmetries that depend on θ, whose laws (if any) no flowsim Law expresses and n_laws may "
            "count: " + "; ".join(hints)
        )
    for note in notes:
        warnings.warn(f"flowsim.laws.count: {note}", UserWarning, stacklevel=2)
    complete = agree and n_known == n_laws and not law_notes and not any(n.startswith("no law detected") for n in notes)
    return LawCount(dim, dim - n_laws, n_laws, n_known, complete, first_order_bound, gap, "; ".join(notes), counts, seeds, stopped)


def _count_at(setup: types.SimpleNamespace, seed: int, tries: int) -> types.SimpleNamespace:
    """The count at one point (seed `seed`): θ and inputs drawn until every ReLU unit is mixed."""
    s = setup
    generator = torch.Generator().manual_seed(seed)
    notes: list[str] = []
    best = None
    for attempt in range(tries):
        theta = _draw_theta(s.scales, generator)
        xs = _random_inputs(s.inputs, s.n_fields, s.batch, generator)
        theta, bad = _mix(s, theta, xs, generator)
        if best is None or len(bad) < len(best[2]):
            best = (theta, xs, bad)
        if not bad:
            break
    theta, xs, bad = best
    if bad:
        notes.append(f"no point with every ReLU unit mixed in {tries} tries ({'; '.join(bad)}): the count may be too high")
    ws = _directions(s.out_shape, s.n_fields, s.loss, generator)
    f = s.f

    def field(theta: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """χ_{x,w}(θ) = ∂_θ f(x; θ)ᵀ w."""
        return grad(lambda t: (f(t, x) * w).sum())(theta)

    # 1. the span of the fields' values: the first-order bound
    with _differentiable():
        values = vmap(field, in_dims=(None, 0, 0), chunk_size=64)(theta, xs, ws)
    rows = _Rows()
    rows.add(values, values.norm(dim=1))
    rank, gap = rows.rank()
    first_order_bound = s.dim - rank
    n_known, law_notes = _known_rank(s.exact, s.layout, theta, values)
    result = types.SimpleNamespace(seed=seed, notes=notes, law_notes=law_notes, n_known=n_known, first_order_bound=first_order_bound, mixed=not bad, stopped="", n_laws=None, gap=gap)
    if s.too_large:
        return result

    # 2. brackets, depth by depth, unless equal bounds already prove the count
    depth = 2 if n_known is None or n_known < first_order_bound else 0
    span = _Span(s.dim, s.rtol, theta, capacity=s.dim)
    for value in values if depth else ():
        span.add(value, float(value.norm()))
    last = 0.0  # seconds of the last chunk
    while depth and rank < s.dim:
        if depth > s.max_depth:
            result.stopped = "max_depth"
            notes.append("no bracket computed (max_depth=1)" if depth == 2 else f"depth {depth - 1} still raised the rank; stopped at max_depth={s.max_depth}")
            break
        terms = vmap(_outer_bracket_terms(field, depth, theta))
        before, misses, fresh = rank, 0, True
        while misses < s.confirm and span.rank < s.dim:
            if time.monotonic() + last * (4 if fresh else 1) > s.deadline:
                result.stopped = "max_seconds"
                notes.append(f"stopped at depth {depth} by max_seconds")
                break
            tic = time.monotonic()
            x = _random_inputs(s.inputs, s.chunk_size * depth, s.batch, generator).reshape(s.chunk_size, depth, *xs.shape[1:])
            w = _directions(ws.shape[1:], s.chunk_size * depth, s.loss, generator).reshape(s.chunk_size, depth, *ws.shape[1:])
            with _differentiable():
                d_field, d_bracketed = terms(x, w)
            scales = d_field.norm(dim=1) + d_bracketed.norm(dim=1)
            for bracket, scale in zip(d_field - d_bracketed, scales):
                misses += not span.add(bracket, float(scale))
            rows.add(d_field - d_bracketed, scales)
            last, fresh = time.monotonic() - tic, False
        rank, result.gap = rows.rank()
        if result.stopped:
            break
        depth = depth + 1 if rank > before else 0
    result.n_laws = s.dim - rank
    return result


class _differentiable:
    """Turns an error of torch.func on the model's forward into a ModelError naming it."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, (RuntimeError, NotImplementedError)) and not isinstance(error, ModelError):
            message = str(error).strip().splitlines()[0] if str(error).strip() else kind.__name__
            raise ModelError(
                f"model: torch.func cannot differentiate its forward ({kind.__name__}: {message}); the count needs a forward "
                "without data-dependent Python control flow (if on a tensor, .item(), .tolist()) and with forward-mode derivatives"
            ) from error
        return False


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




# ----------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class BlockCount:
    """The count of one block in isolation (``count(block, its inputs, "mse")``).

    `n_laws`, `n_known`, `complete`, `counts`: as in ``LawCount`` (None where the block has more
    than max_params parameters and was not counted); `same_as`: the block whose count this is
    (blocks of the same architecture and input shape are counted once); `seconds`: wall time
    of its count (0 when reused)."""

    name: str
    n_params: int
    n_laws: int | None
    n_known: int | None
    complete: bool | None
    note: str = ""
    counts: tuple[int | None, ...] = ()
    same_as: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class BlockLawCount:
    """The laws of a model counted block by block (``count_blocks``).

    - `blocks`: the ``BlockCount`` of each block; `n_params` D of the whole model,
      `n_block_params` those inside the blocks;
    - `n_stream`: the rank of the detected exact laws of the whole model beyond the blocks'
      own (laws across blocks or on parameters outside every block: the residual stream's
      rescales, shifts, the head's translation; and laws on one block's parameters that the
      block alone does not have), independent of the blocks' laws; `stream_laws` their
      labels (kind at site); None where too large to form;
    - `n_laws` = Σ blocks' n_laws + n_stream (None unless every block was counted): the laws
      this argument accounts for, a lower bound on the whole model's (see ``count_blocks``);
    - `complete`: every block complete (its detected laws are all its laws, at every point).
      It is *not* a claim that the whole model has no other laws;
    - `seconds`: wall time of the call; `note`: what the argument does not cover here."""

    n_params: int
    n_block_params: int
    blocks: tuple[BlockCount, ...]
    n_stream: int | None
    stream_laws: tuple[str, ...]
    n_laws: int | None
    complete: bool
    note: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        rows = [f"  {b.name}: {b.n_params} parameters, {b.n_laws if b.n_laws is not None else '?'} laws, {b.n_known} known, complete: {b.complete}" + (f" (= {b.same_as})" if b.same_as else "") for b in self.blocks]
        return (
            f"{self.n_params} parameters ({self.n_block_params} in {len(self.blocks)} blocks), "
            f"{'?' if self.n_laws is None else self.n_laws} laws accounted for ({self.n_stream} stream), "
            f"every block complete: {self.complete}, {self.seconds:.0f} s" + (f" ({self.note})" if self.note else "") + "\n" + "\n".join(rows)
        )


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_residual(module: nn.Module) -> bool:
    """A block that adds its input (through nn.Identity modules) to something: by its torch.fx
    graph, or its class (``*Block``, ``nn.TransformerEncoderLayer``/``DecoderLayer``)."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) or type(module).__name__.endswith("Block"):
        return True
    if type(module).__module__.startswith("torch.nn") or not any(True for _ in module.parameters()):
        return False
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001  (untraceable: not recognised as residual)
        return False
    same = {n for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(module.get_submodule(node.target), nn.Identity) and node.args and node.args[0] in same:
            same.add(node)
        elif (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in ("add", "add_")):
            if any(a in same for a in node.args):
                return True
    return False


def _default_blocks(model: nn.Module) -> list[str]:
    """The outermost residual submodules; where there are none, the children with parameters."""
    found: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if _is_residual(child):
                found.append(full)
            else:
                walk(child, full + ".")

    walk(model, "")
    if not found:
        found = [name for name, child in model.named_children() if any(p.requires_grad for p in child.parameters())]
    return found


def _prefixed(law: Law, prefix: str) -> Law:
    groups = tuple(tuple(dataclasses.replace(t, param=prefix + t.param) for t in g) for g in law.groups)
    return dataclasses.replace(law, site=prefix + law.site, groups=groups)


def _rowspace(laws: list[Law], names: list[str], shapes: list, theta: Tensor) -> Tensor:
    """An orthonormal basis (rank, P) of the rows of the Jacobian of `laws` at θ."""
    if not laws:
        return theta.new_zeros(0, theta.numel())
    jacobian = LawSet(laws, names, shapes).jacobian(theta)
    _, sv, vh = torch.linalg.svd(jacobian, full_matrices=False)
    rank = int((sv > sv[0] * 1e-10).sum()) if len(sv) and sv[0] > 0 else 0
    return vh[:rank]


def count_blocks(
    model: nn.Module,
    inputs: Tensor,
    loss: str = "cross_entropy",
    blocks: Sequence[str] | None = None,
    *,
    reuse: bool = True,
    seed: int = 0,
    **count_options,
) -> BlockLawCount:
    """The laws of a model too large for ``count``, counted block by block.

    Each block (a submodule) is counted *in isolation*: ``count(block, x, "mse", **count_options)``
    with x its inputs on `inputs` (captured by a forward pre-hook; only their shape and spread
    are used) and every output direction (mse: the block's output is read freely). `blocks`:
    module names; by default the outermost residual blocks (a submodule whose torch.fx graph
    adds its input to something, a ``*Block`` class, ``nn.TransformerEncoderLayer``), or where
    there are none the children with parameters. Blocks of the same architecture (same
    ``repr``, parameter shapes and input shape) are counted once and share the result
    (`same_as`), unless `reuse` is False: the count depends on nothing else (its points and
    inputs are random). A block above `max_params` (count's, 1000) is not counted: n_laws None,
    complete False, a note.

    **What is proven** (numerically, at count's random points): for each block, its detected
    laws (``detect(block, "mse")``) are all the laws of the block alone (``complete``), and
    each is a law of the whole model (a law of the block for every input and output direction
    is one wherever the block is used). The detected laws of the whole model beyond the
    blocks' own (the residual stream's rescale per unit, shift laws, the head's translation,
    laws on a block's parameters that come from its readers, such as its output biases' sums
    in a stream read only through LayerNorm) are checked orthogonal to 16 whole-model fields,
    and their rank beyond the blocks' laws is `n_stream`. So the whole model has at least
    `n_laws` = Σ blocks' n_laws + n_stream independent laws.

    **What is assumed** (the submodule theorem: Marcotte, Gribonval & Peyré, conservation laws
    of ResNets and Transformers): the laws of the model that depend only on one block's
    parameters are those of the block alone, and a residual block has the laws of the block
    without its skip (the count of a residual block is that of its branch: the skip adds no
    field). The theorem needs the block's output read freely by the rest of the network; a
    block whose output is read only through a LayerNorm has more laws on its own parameters
    (they are detected and counted in `n_stream`, and a note names the block). The theorem
    says nothing of laws that mix several blocks' parameters: that the detected ones (the
    stream's) are all of them is **not** proven here. So `complete` means *every block is
    complete*, never that the whole model is; only ``count`` on the whole model proves that.

    `loss` is the whole model's (for its detection); `seed` is passed to every block's count.
    Other keyword arguments go to ``count`` (points, max_params, max_depth, max_seconds, …).

    **Returns** a ``BlockLawCount``. **Raises** ModelError for a block name the model does not
    have, a block not called on `inputs` or called with anything but one tensor.
    """
    started = time.monotonic()
    if loss not in LOSSES:
        raise bad_value("problem.loss", loss, f"one of {', '.join(LOSSES)}")
    if not isinstance(inputs, Tensor) or inputs.ndim < 2 or len(inputs) == 0:
        raise bad_value("inputs", getattr(inputs, "shape", type(inputs).__name__), "a tensor of example inputs, batch first", ModelError)
    max_params = check_number("max_params", count_options.get("max_params", 1000), integer=True, minimum=1)
    names = list(_default_blocks(model) if blocks is None else blocks)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or name == "":
            raise bad_value("blocks", name, "names of submodules of the model", ModelError)
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise bad_value("blocks", f"{a} and {b}", "blocks that do not contain one another", ModelError)

    # the inputs of every block, on the real inputs
    captured: dict[str, object] = {}
    handles = [
        modules[n].register_forward_pre_hook(lambda m, args, kwargs, n=n: captured.setdefault(n, (args, kwargs)) and None, with_kwargs=True)
        for n in names
    ]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layout = [n for n, _ in params]
    shapes = [p.shape for _, p in params]
    generator = torch.Generator().manual_seed(seed)
    theta = torch.cat([torch.randn(p.numel(), generator=generator, dtype=torch.float64) * max(float(p.detach().double().square().mean().sqrt()), 0.1) for _, p in params])
    offsets, start = {}, 0
    for n, p in params:
        offsets[n] = torch.arange(start, start + p.numel())
        start += p.numel()
    dim = start

    notes: list[str] = []
    detected = True
    try:
        model_laws = [law for law in detect(model, loss=loss, inputs=inputs) if law.exact]
    except ModelError as error:
        model_laws, detected = [], False
        notes.append(f"no law of the whole model detected ({type(error).__name__}: {str(error)[:200]}): n_stream unknown")

    results: list[BlockCount] = []
    seen: dict[tuple, tuple[str, LawCount | None, list[Law], str]] = {}
    block_laws: dict[str, list[Law]] = {}
    n_block_params = 0
    for name in names:
        module = modules[name]
        if name not in captured:
            raise bad_value("blocks", name, "blocks the model calls on its inputs", ModelError)
        args, kwargs = captured[name]
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
            raise bad_value("blocks", name, "blocks called with one tensor (their input)", ModelError)
        x = args[0].detach()
        n_own = sum(p.numel() for p in module.parameters() if p.requires_grad)
        n_block_params += n_own
        key = (type(module).__qualname__, repr(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()), tuple(x.shape[1:]), x.dtype)
        tic = time.monotonic()
        if reuse and key in seen:
            first, result, laws, note = seen[key]
        else:
            first = ""
            try:
                laws = detect(module, loss="mse", inputs=x)
            except ModelError as error:
                laws = []
                note = f"no law detected ({error})"
            else:
                note = ""
            if n_own > max_params:
                result = None
                note = "; ".join(filter(None, [note, f"{n_own} parameters > max_params={max_params}: not counted"]))
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    result = count(module, x, "mse", laws=laws, seed=seed, **count_options)
                note = "; ".join(filter(None, [note, result.note]))
            seen.setdefault(key, (name, result, laws, note))
        prefix = name + "."
        block_laws[name] = [_prefixed(law, prefix) for law in laws if law.exact]
        results.append(
            BlockCount(
                name, n_own, None if result is None else result.n_laws, None if result is None else result.n_known,
                False if result is None else result.complete, note, () if result is None else result.counts, first,
                0.0 if first else time.monotonic() - tic,
            )
        )

    # the laws beyond the blocks' own: their rank outside the span of the blocks' laws
    inside = {name: [] for name in names}
    cross: list[Law] = []
    for law in model_laws:
        owner = next((name for name in names if all(p.startswith(name + ".") for p in law.parameters)), None)
        (inside[owner] if owner else cross).append(law)
    n_stream: int | None = 0 if detected else None
    labels = []
    bases = {}
    for name in names:
        own = [n for n in layout if n.startswith(name + ".")]
        index = torch.cat([offsets[n] for n in own]) if own else torch.zeros(0, dtype=torch.long)
        sub = theta[index]
        size = sum(law.size for law in block_laws[name] + inside[name])
        if size * max(len(sub), 1) > MEMORY:
            n_stream = None
            notes.append(f"{name}: too many law components × parameters to form its laws' Jacobian")
            continue
        sub_shapes = [shapes[layout.index(n)] for n in own]
        alone = _rowspace(block_laws[name], own, sub_shapes, sub)
        both = _rowspace(block_laws[name] + inside[name], own, sub_shapes, sub)
        bases[name] = (index, both)
        extra = len(both) - len(alone)
        if extra:
            n_stream = None if n_stream is None else n_stream + extra
            notes.append(f"{name}: {extra} detected law(s) of the model on its parameters that it does not have alone (its output is not read freely): counted in n_stream, not covered by the theorem")
            alone = {(law.kind, frozenset(law.parameters), law.size) for law in block_laws[name]}
            labels += [f"{law.kind} at {law.site}" for law in inside[name] if (law.kind, frozenset(law.parameters), law.size) not in alone]
    labels += [f"{law.kind} at {law.site}" for law in cross]
    if cross and n_stream is not None:
        size = sum(law.size for law in cross)
        if size * dim > MEMORY:
            n_stream = None
            notes.append("too many stream law components × parameters to form their Jacobian")
        else:
            jacobian = LawSet(cross, layout, shapes).jacobian(theta)
            for index, basis in bases.values():
                if len(basis):
                    part = jacobian[:, index]
                    jacobian[:, index] = part - (part @ basis.T) @ basis
            n_stream += int(torch.linalg.matrix_rank(jacobian, rtol=1e-10)) if size else 0
            # the stream laws are laws: orthogonal to fields of the whole model
            try:
                _, f, flayout, scales = _functional(model)
                order = [layout.index(n) for n, _ in flayout]
                point = torch.cat([theta[offsets[layout[i]]] for i in order])
                xs = _random_inputs(inputs, 16, 8 if any(isinstance(m, _NormBase) for m in model.modules()) else 1, generator)
                with torch.no_grad():
                    out = f(point, xs[0])
                ws = _directions(out.shape, 16, loss, generator)
                with _differentiable():
                    values = vmap(lambda x, w: grad(lambda t: (f(t, x) * w).sum())(point), chunk_size=4)(xs, ws)
                _, law_notes = _known_rank(cross, list(flayout), point, values)
            except ModelError as error:
                law_notes = [f"the stream laws were not checked against the fields ({error})"]
            if law_notes:
                n_stream = None
                notes += law_notes

    complete = all(b.complete is True for b in results)
    if not complete:
        notes.append("not every block is complete: " + ", ".join(b.name for b in results if b.complete is not True))
    n_laws = None if n_stream is None or any(b.n_laws is None for b in results) else sum(b.n_laws for b in results) + n_stream
    for note in notes:
        warnings.warn(f"flowsim.laws.count_blocks: {note}", UserWarning, stacklevel=2)
    return BlockLawCount(dim, n_block_params, tuple(results), n_stream, tuple(labels), n_laws, complete, "; ".join(notes), time.monotonic() - started)


__all__ = ["BlockCount", "BlockLawCount", "LawCount", "count", "count_blocks"]
