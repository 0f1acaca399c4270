"""Find the symmetries of an ``nn.Module`` from its torch.fx graph and build their laws.

The graph is read, not the module names, so any module built from the same parts works.

**Sources.** Every parametrised layer whose output has *units* is a source: a Linear or an
Embedding (units on the last axis), a Conv with groups=1 or an affine BatchNorm or GroupNorm
(channels, axis 1), an affine LayerNorm (last axis), the output of an ``nn.MultiheadAttention``.

**The walk.** From each source the walk follows the source's output through the graph with a
*unit map*: an integer tensor shaped like the value at that point, holding the source unit
each entry comes from (the shapes come from running the graph once on meta tensors). Every op
on the way is applied to the unit map too, and is allowed only if it commutes with the
symmetry being followed:

- data movement (view, reshape, flatten, transpose, permute, indexing) and multiplication by
  a number commute with any invertible mixing of the units (``general``);
- averaging or summing over axes that carry a single unit (sequence means, avg-pooling) and a
  product A @ v whose unit axis passes through (attention values) commute with mixing too; an
  A @ v product confines the mixing to the units of one slice (one head);
- ReLU, leaky ReLU and max-pooling commute only with a positive scaling per unit;
- ``torch.cat`` puts the units beside other tensors' entries (unit −1), which the symmetry
  leaves alone: from there only data movement, entrywise maps and layers may follow, and a
  layer reads the units in the columns of their slot;
- a residual add x + y of two tensors of one shape is a *merge*: the walk goes on past it
  (once per source) and records which operand it reached. Sources whose walks meet at adds
  are one residual stream's *writers*, the layers their walks reach its *readers*: where both
  operands of every add are reached with the same unit map, and the stream ends in layers
  only, the writers scaled per unit and the readers scaled back is a symmetry: **rescale**
  Σ_w |W_w[j]|² + b_w[j]² − Σ_r |W_r[:, j]|² (and the matrix law, **linear**, where every
  path is linear). An operand nobody writes (the model's input) leaves the add without a law.
  Where the stream (or one writer) also reaches readers that ignore a shift constant over
  *cells* of units at each position (a LayerNorm over the units, a softmax cross-entropy
  output; see Shifts), mixing the writers by G = exp(tA), A = 1_a 1_bᵀ + 1_b 1_aᵀ for two
  cells, and the layers' columns by G⁻¹, only shifts those cells: the matrix law along the
  cells, **linear** 1_aᵀ (Σ_w W_w W_wᵀ + b_w b_wᵀ − Σ_r W_rᵀ W_r) 1_b (``h = inp(x); out = h +
  fc2(relu(fc1(h)))`` under cross-entropy; an encoder layer's input map and attention in
  post-norm). Past an add whose other operand no writer writes, only such readers may follow.

Anything else (an add with a constant or a broadcast, tanh, softmax, an unknown function)
stops the walk: no law is made through it. The walk ends where the units are absorbed:

- a Linear / Conv / attention input map consuming them → **rescale** (|W_P[j]|² + b_P[j]² −
  Σ_C |W_C[:, j]|²) and, where the whole path is linear and the source a Linear/Conv/Embedding,
  the matrix law of the same pair: **linear** (W_P W_Pᵀ + b_P b_Pᵀ − Σ_C W_Cᵀ W_C; its diagonal
  is the rescale law), or **attention_vo** per head when the path crossed attention values;
- the left and right operands of one product q kᵀ (a matmul contracting the unit axes, or
  ``scaled_dot_product_attention``), each from its own source → **attention_qk** per head
  ([W_q|b_q][W_q|b_q]ᵀ − [W_k|b_k][W_k|b_k]ᵀ); the key bias, when the scores meet only a
  softmax over the keys, shifts every score of a query equally, so it is conserved itself
  (a **translation** law); so is the query bias under a softmax over the queries (dim −2).
  A mask on the way must be filled with −∞ (a finite fill breaks the law);
- a per-channel normalisation → **scale** per unit; a GroupNorm → **scale** per group; a
  LayerNorm → a whole-layer scale law (per unit when each normalised group holds one unit).
  eps > 0 breaks these at relative order eps/Var: they are marked ``exact=False``;
- the model's output, when the loss is a softmax cross-entropy → **translation**: the logits
  can be shifted together, so each column sum Σ_k W[k, j] and Σ_k b[k] is conserved.

**Shifts.** A second walk follows a *shift* of a value written by a parameter, through data
movement, adds, identities and means over axes where it is the same, to the readers that
ignore it: a LayerNorm ignores a shift constant over its normalised axes, a BatchNorm
(training mode) or InstanceNorm one constant over the axes it averages, a GroupNorm one
constant over each example's group, a softmax cross-entropy output one constant over the
classes. A reader that ignores a shift constant over some units merges them into one *cell*.
A shift that every reader ignores conserves a **translation** law, one component per cell:
each entry of a bias before a BatchNorm/InstanceNorm, its sum over each group before a
GroupNorm; the bias sum and each weight column's sum (Σ_j W[j, k]) of a Linear,
each row sum of an Embedding or of a Parameter added to the stream (positions), in a stream
read only by LayerNorms (a pre-norm transformer). Shifts of two writers that reach the same
values, the same number of times and with the units in the same places, cancel: the
difference of their bias sums (Σ b_o − Σ b_fc2 in a pre-norm block) or, per unit, of their
biases (b_conv2[j] − b_shortcut[j] in a ResNet block) is conserved. A shift that only
Linear layers (or attention input maps) read, apart from readers that ignore it, is undone by
their biases (b → b − W·shift): a symmetry whose generator depends on θ, whose law (if any)
is no Law of these forms; detection names it (``detect_with_hints``) and makes no law. (Where
the count has found a law there, it was the matrix law along the cells, which is detected.)

Both walks use explicit stacks, not recursion: a stream through hundreds of residual blocks
is longer than Python's recursion limit.

**Unreached parameters.** A parameter of a module never called, or whose output never
reaches the model's output, has zero gradient: each entry is a **translation** law (tensors
of at most two axes; none when a module of the graph is excluded, whose hook could read it).

``nn.MultiheadAttention`` is a leaf of the graph: its packed ``in_proj_weight`` is split into
query, key and value thirds and each third into heads, which gives the same laws as the same
attention written out with matmul and softmax. ``nn.TransformerEncoderLayer`` and
``nn.TransformerEncoder``, whose forward torch.fx cannot trace, are traced along the path
that forward takes in training mode (``MATH_PATHS``), which is checked against the module's
own output; called with a mask, or with a hook of their own, they stay leaves.

**What flowsim refuses.** The graph is traced in training mode, as ``Problem`` runs the model
(every module's mode is restored afterwards), so a ``self.training`` branch is seen as the flow
runs it. A ModelError names the part where the graph cannot be trusted at all: a model
torch.fx cannot trace (data-dependent Python control flow), a custom ``autograd.Function``
(its backward is invisible to the graph), a forward hook, forward pre-hook or forward set on
the instance of the model itself (torch.fx traces its class's forward), a backward hook on any
module and a global module hook (they change the gradient, or every module's output, out of
the graph's sight). A container's
hooks and instance forward are traced with it. A warning names the rest, and the laws
returned are the ones found elsewhere, never a wrong one:

- a leaf module with a forward hook, pre-hook or instance forward (on it or inside it) or a
  parametrized weight, and an Embedding with ``padding_idx`` or ``scale_grad_by_freq``
  (autograd's gradient of its weight is not ∇L): no law involves it or passes through it;
- a Parameter used more than once (two calls of one module, two modules holding it as
  ``b.weight = a.weight`` does, a module and a direct read such as
  ``F.linear(x, attn.out_proj.weight)``): a law follows one use, so none involves it. A module
  without parameters (one ReLU for every layer) may be used any number of times;
- a parametrised leaf flowsim does not understand: no law through it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import operator
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules import module as module_hooks
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parametrize

from ..errors import ModelError, bad_value
from ..problem import LOSSES
from .law import Law, Term, gram_labels

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: modules, functions and methods that multiply each entry by a positive scalar of its own
POSITIVE_MODULES = (nn.ReLU, nn.LeakyReLU)
POSITIVE_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu}
POSITIVE_METHODS = {"relu"}
#: pooling over the trailing axes: module / function -> (number of pooled axes, linear?)
POOL_MODULES = {
    nn.MaxPool1d: (1, False),
    nn.MaxPool2d: (2, False),
    nn.MaxPool3d: (3, False),
    nn.AdaptiveMaxPool1d: (1, False),
    nn.AdaptiveMaxPool2d: (2, False),
    nn.AvgPool1d: (1, True),
    nn.AvgPool2d: (2, True),
    nn.AvgPool3d: (3, True),
    nn.AdaptiveAvgPool1d: (1, True),
    nn.AdaptiveAvgPool2d: (2, True),
}
POOL_FUNCTIONS = {
    F.max_pool1d: (1, False),
    F.max_pool2d: (2, False),
    F.max_pool3d: (3, False),
    F.adaptive_max_pool1d: (1, False),
    F.adaptive_max_pool2d: (2, False),
    F.avg_pool1d: (1, True),
    F.avg_pool2d: (2, True),
    F.avg_pool3d: (3, True),
    F.adaptive_avg_pool1d: (1, True),
    F.adaptive_avg_pool2d: (2, True),
}
#: pure data movement: the op is applied to the unit map as it is (ints and tuples as arguments)
MOVE_FUNCTIONS = {torch.transpose, torch.permute, torch.swapaxes, torch.movedim, torch.squeeze, torch.unsqueeze}
MOVE_METHODS = {"transpose", "permute", "swapaxes", "movedim", "squeeze", "unsqueeze", "contiguous", "t"}
MOVE_ATTRIBUTES = {"T", "mT"}
#: data movement whose result shape is read off the graph (their arguments may be other nodes)
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
RESHAPE_METHODS = {"view", "reshape", "flatten"}
SCALAR_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div, operator.neg, torch.neg}
SCALAR_METHODS = {"mul", "div", "neg"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum}
REDUCE_METHODS = {"mean", "sum"}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm"}
ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention}
ADD_FUNCTIONS = {operator.add, torch.add}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
ADD_METHODS = {"add"}
SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}
LAYER_NORM_FUNCTIONS = {F.layer_norm, torch.layer_norm}
#: users that read a tensor's shape, dtype or device, not its values
METADATA_METHODS = {"size", "dim", "ones_like", "zeros_like", "new_ones", "new_zeros", "new_empty", "new_full"}
METADATA_FUNCTIONS = {torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like}
METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
#: leaf modules that hold no parameters and need no rule (anything else unknown stops the walk)
UNDERSTOOD_LEAVES = (*LAYERS, _NormBase, nn.GroupNorm, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)


class _Stop(Exception):
    """The walk met something that does not commute with the symmetry: no law."""


# ------------------------------------------------------------------------------------ tracing
@contextlib.contextmanager
def _refuse_custom_functions() -> Iterator[None]:
    """While tracing, a custom autograd.Function applied to a traced value is a ModelError:
    torch.fx would record its forward and silently drop its backward."""
    original = vars(torch.autograd.Function)["apply"]  # the classmethod itself, restored as it was

    def apply(cls, *args, **kwargs):
        if any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values())):
            raise ModelError(
                f"model: calls the custom autograd function {cls.__name__}; flowsim cannot see its backward pass, "
                "so it cannot find the laws of this model (wrap it in a leaf module to make no law through it)"
            )
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original


@contextlib.contextmanager
def _training(model: nn.Module) -> Iterator[None]:
    """The model in training mode, as Problem evaluates it (a ``self.training`` branch is traced
    as the flow runs it); every module's own mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _unseen(module: nn.Module) -> str | None:
    """What a call of `module` does that torch.fx records neither for a leaf module nor for the
    traced model itself (a container's hooks and forward are traced): None if nothing."""
    if module._forward_hooks:
        return "has a forward hook"
    if module._forward_pre_hooks:
        return "has a forward pre-hook"
    if "forward" in vars(module):
        return "has its forward replaced on the instance"
    return None


def _excluded(module: nn.Module) -> str | None:
    """Why no law may involve leaf `module` or pass through it (None if nothing): its call does
    something the graph does not show (a hook or an instance forward on it or inside it, a
    parametrized weight), or autograd's gradient of its weight is not ∇L (an Embedding with
    padding_idx or scale_grad_by_freq)."""
    for name, part in module.named_modules():
        prefix = f"{name} " if name else ""
        what = _unseen(part)
        if what is not None:
            return f"{prefix}{what}, which torch.fx does not see"
        if parametrize.is_parametrized(part):
            return f"{prefix}is parametrized: its weights are computed from other parameters"
    not_the_loss = "so the flow is not the loss's gradient flow"
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        return f"padding_idx={module.padding_idx}: autograd zeroes that row's gradient, {not_the_loss}"
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return f"scale_grad_by_freq: autograd divides each row's gradient by its token count, {not_the_loss}"
    return None


def _refuse_unseen(model: nn.Module) -> None:
    """ModelError for what changes the function or the gradient flowsim integrates out of the
    graph's sight everywhere: global module hooks, a backward hook on any module, and a forward
    hook, pre-hook or instance forward on the model itself (torch.fx traces its class's forward)."""
    for kind, hooks in (
        ("forward ", module_hooks._global_forward_hooks),
        ("forward pre-", module_hooks._global_forward_pre_hooks),
        ("backward ", module_hooks._global_backward_hooks),
        ("backward pre-", module_hooks._global_backward_pre_hooks),
    ):
        if hooks:
            raise ModelError(
                f"model: a global {kind}hook is registered for every module "
                "(torch.nn.modules.module.register_module_*); torch.fx does not see it, so no law can be trusted "
                "(remove it to find laws)"
            )
    for name, module in model.named_modules():
        if module._backward_hooks or module._backward_pre_hooks:
            raise ModelError(
                f"model: {name or 'the model itself'} ({type(module).__name__}) has a backward hook; it changes the "
                "gradient flowsim integrates, which is then not the gradient of the traced loss, so no law can be "
                "trusted (remove it to find laws)"
            )
    what = _unseen(model)
    if what is not None:
        raise ModelError(
            f"model: {what} on the model itself ({type(model).__name__}); torch.fx traces the class's forward and does not "
            "see it, so no law can be trusted (move it to a submodule, whose laws are then dropped, or remove it)"
        )


def _encoder_layer_path(layer: nn.TransformerEncoderLayer, src: Tensor) -> Tensor:
    """``nn.TransformerEncoderLayer.forward`` without masks, as torch runs it in training mode
    (its fused fast path needs eval mode): torch's own ``_sa_block`` and ``_ff_block``, joined
    as its forward joins them (pre-norm: x + sa(norm1(x)), then + ff(norm2(x)); post-norm:
    norm1(x + sa(x)), then norm2(x + ff(x)))."""
    if layer.norm_first:
        x = src + layer._sa_block(layer.norm1(src), None, None, is_causal=False)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(src + layer._sa_block(src, None, None, is_causal=False))
    return layer.norm2(x + layer._ff_block(x))


def _encoder_path(encoder: nn.TransformerEncoder, src: Tensor) -> Tensor:
    """``nn.TransformerEncoder.forward`` without masks in training mode: its layers in turn,
    then its norm (no nested tensors: torch converts to them only in eval mode)."""
    for layer in encoder.layers:
        src = layer(src)
    return src if encoder.norm is None else encoder.norm(src)


#: torch modules whose forward torch.fx cannot trace (its fast-path checks branch on the
#: input), traced by the path that forward takes in training mode, as Problem runs the model
MATH_PATHS = {nn.TransformerEncoderLayer: _encoder_layer_path, nn.TransformerEncoder: _encoder_path}


def _math_path(module: nn.Module, args: tuple, kwargs: dict):
    """The path to trace `module` by (MATH_PATHS), or None: it must be exactly a torch class
    of MATH_PATHS (a subclass may change its forward), have no hook or instance forward of its
    own (its submodules' are dropped as any leaf's), and be called with its input alone (every
    mask None, is_causal False or None). Otherwise it stays a leaf: no law through it."""
    path = MATH_PATHS.get(type(module))
    if path is None or _unseen(module) is not None or len(args) < 1:
        return None
    if any(a is not None and a is not False for a in (*args[1:], *kwargs.values())):
        return None
    return path


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, which follows the modules of MATH_PATHS along their training-mode
    path (`substituted` names them); every other module as torch.fx does."""

    def __init__(self) -> None:
        super().__init__()
        self.substituted: list[str] = []
        self._through: set[int] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self._through and super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args: tuple, kwargs: dict):
        path = _math_path(m, args, kwargs)
        if path is None:
            return super().call_module(m, forward, args, kwargs)
        self.substituted.append(self.path_of_module(m))
        self._through.add(id(m))
        try:
            return super().call_module(m, lambda src, *_, **__: path(m, src), args, kwargs)
        finally:
            self._through.discard(id(m))


def _trace(model: nn.Module) -> tuple[torch.fx.GraphModule, list[str]]:
    """The model's torch.fx graph, and the modules traced along their training-mode path
    (MATH_PATHS; "" for the model itself)."""
    tracer = _Tracer()
    root = model
    path = _math_path(model, (None,), {})
    if path is not None:
        # the model itself: its class's forward is what torch.fx traces, so trace a shell of
        # the same module whose class has that path as its forward
        root = copy.copy(model)
        root.__class__ = type(type(model).__name__, (type(model),), {"forward": lambda self, src: path(self, src)})
    try:
        with _refuse_custom_functions():
            graph = tracer.trace(root)
        substituted = tracer.substituted + ([""] if path is not None else [])
        return torch.fx.GraphModule(tracer.root, graph, type(model).__name__), substituted
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "laws are found from the traced graph, so data-dependent Python control flow must be "
            "moved into a leaf module or removed"
        ) from exc


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs a graph and keeps the shape of every tensor it computes (None for other values)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, torch.Size | None] = {}

    def run_node(self, node: torch.fx.Node):
        result = super().run_node(node)
        self.shapes[node.name] = result.shape if isinstance(result, Tensor) else None
        return result


def _run_for_shapes(gm: torch.fx.GraphModule, inputs: Tensor) -> dict[str, torch.Size | None]:
    """Run a copy of the graph once on `inputs` and read the shape of every node's value; the
    model itself is not touched (no running statistics move)."""
    recorder = _ShapeRecorder(copy.deepcopy(gm))
    reference = next(gm.parameters(), None)
    if reference is not None:
        inputs = inputs.to(reference.device, reference.dtype if inputs.is_floating_point() else None)
    try:
        with torch.no_grad():
            recorder.run(inputs.detach())
    except Exception as exc:  # the user's model: any failure is a ModelError
        raise ModelError(f"model: fails on inputs of shape {tuple(inputs.shape)} ({type(exc).__name__}: {exc})") from exc
    return recorder.shapes


def _first_leaf(gm: torch.fx.GraphModule) -> tuple[nn.Module, bool]:
    """The first parametrised leaf module fed by the input, and whether a flatten comes first."""
    modules = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ModelError(f"model: takes {len(placeholders)} inputs; pass inputs= to find its laws")
    frontier, flattened = [placeholders[0]], False
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            module = modules.get(user.target) if user.op == "call_module" else None
            if module is not None and isinstance(module, UNDERSTOOD_LEAVES):
                return module, flattened
            flattened = flattened or isinstance(module, nn.Flatten) or user.target in ("flatten", "view", "reshape")
            frontier.append(user)
    raise ModelError("model: has no layer flowsim knows on its input; pass inputs= to find its laws")


def _guessed_inputs(gm: torch.fx.GraphModule) -> Iterator[Tensor]:
    """Small inputs that a model may accept, guessed from its first layer."""
    first, flattened = _first_leaf(gm)
    sizes = (8, 16, 32, 28, 64, 4, 12, 24, 5, 6, 7, 10)
    if isinstance(first, nn.Linear):
        yield torch.zeros(2, first.in_features)
        if not flattened:
            yield from (torch.zeros(2, s, first.in_features) for s in sizes)
    elif isinstance(first, CONVS):
        dims = CONVS.index(type(first)) + 1
        yield from (torch.zeros(2, first.in_channels, *(s,) * dims) for s in sizes)
    elif isinstance(first, nn.Embedding):
        yield from (torch.zeros(2, s, dtype=torch.long) for s in sizes)
    elif isinstance(first, nn.MultiheadAttention):
        for s in sizes:
            yield torch.zeros(2, s, first.embed_dim) if first.batch_first else torch.zeros(s, 2, first.embed_dim)
    elif isinstance(first, nn.LayerNorm):
        yield torch.zeros(2, *first.normalized_shape)
        yield from (torch.zeros(2, s, *first.normalized_shape) for s in sizes)
    elif isinstance(first, _NormBase):
        yield torch.zeros(2, first.num_features)
        for dims in (1, 2, 3):
            yield from (torch.zeros(2, first.num_features, *(s,) * dims) for s in sizes)


def _shapes(gm: torch.fx.GraphModule, inputs: Tensor | None) -> tuple[dict[str, torch.Size], Tensor]:
    """The shape of every node's value, and the inputs that gave them."""
    if inputs is not None:
        if not isinstance(inputs, Tensor) or inputs.ndim < 1:
            raise ModelError(f"inputs: got {type(inputs).__name__}; expected a tensor of example inputs, batch first")
        return _run_for_shapes(gm, inputs[:2]), inputs[:2]
    for guess in _guessed_inputs(gm):
        with contextlib.suppress(ModelError):
            return _run_for_shapes(gm, guess), guess
    raise ModelError("model: flowsim could not guess the shape of its inputs; pass inputs= (a few examples)")


def _check_paths(model: nn.Module, gm: torch.fx.GraphModule, example: Tensor, substituted: list[str]) -> None:
    """ModelError unless the graph, with modules traced along their training-mode path
    (MATH_PATHS), computes what the model computes: float64 CPU copies of both on `example`
    (plus noise, for float inputs), in the current (training) mode, from one random state. The same
    ops in the same order agree to round-off; another path (a torch whose forward differs)
    differs at order one."""
    x = example.detach().cpu()
    if x.is_floating_point():
        x = x.double() + torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outputs = []
    for function in (model, gm):
        found: list[Tensor] = []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                out = copy.deepcopy(function).to("cpu", torch.float64)(x)
        except Exception as exc:  # the user's model: any failure is a ModelError
            raise ModelError(
                f"model: a float64 copy fails on inputs of shape {tuple(x.shape)} ({type(exc).__name__}: {exc})"
            ) from exc
        torch.fx.node.map_aggregate(out, lambda v: found.append(v) if isinstance(v, Tensor) else None)
        outputs.append(found)
    (want, got) = outputs
    scale = max((float(w.abs().max()) for w in want if w.numel()), default=0.0)
    # 1e-9: far above float64 round-off of a different summation order, far below a different function
    apart = [w.shape != g.shape or (w.numel() and float((w - g).abs().max()) > 1e-9 * scale) for w, g in zip(want, got)]
    if len(want) != len(got) or any(apart):
        raise ModelError(
            f"model: flowsim traces {', '.join(n or type(model).__name__ for n in substituted)} by the path torch's "
            "forward takes in training mode, but the traced graph does not compute what the model does (another torch "
            "version?); no law can be trusted"
        )


# ------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class _Source:
    """A parametrised node whose output has units: the tensors holding each unit's incoming
    parameters, each with the axis along which it is split into units."""

    node: torch.fx.Node
    name: str
    units: int
    axis: int  # the axis of the node's value that carries the units
    tensors: tuple[tuple[str, int], ...]  # (parameter, its unit axis)
    general: bool  # any invertible mixing of the units is a symmetry of the source's own map

    def terms(self, form: str, start: int = 0, stop: int | None = None, sign: int = 1) -> tuple[Term, ...]:
        stop = self.units if stop is None else stop
        whole = (start, stop) == (0, self.units)
        return tuple(
            Term(param, form, axis=axis, units=stop - start, sign=sign, part=None if whole else (axis, start, stop))
            for param, axis in self.tensors
        )


def _prefixed(module_name: str, attribute: str) -> str:
    return f"{module_name}.{attribute}" if module_name else attribute


def _source(node: torch.fx.Node, module: nn.Module) -> _Source | None:
    name = node.target
    own = [("weight", 0), ("bias", 0)]
    if isinstance(module, nn.Linear):
        units, axis, general = module.out_features, -1, True
    elif isinstance(module, CONVS):
        if module.groups != 1:
            return None
        units, axis, general = module.out_channels, 1, True
    elif isinstance(module, _NormBase) and module.affine:
        units, axis, general = module.num_features, 1, False
    elif isinstance(module, nn.GroupNorm) and module.affine:
        units, axis, general = module.num_channels, 1, False
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine and len(module.normalized_shape) == 1:
        units, axis, general = module.normalized_shape[0], -1, False
    elif isinstance(module, nn.Embedding) and module.max_norm is None:
        units, axis, general, own = module.embedding_dim, -1, True, [("weight", 1)]
    else:
        return None
    tensors = tuple((_prefixed(name, t), a) for t, a in own if getattr(module, t, None) is not None)
    return _Source(node, name, units, axis, tensors, general)


def _attention_output_source(node: torch.fx.Node, module: nn.MultiheadAttention) -> _Source:
    """The first output of an nn.MultiheadAttention: out_proj's rows are its units."""
    name = node.args[0].target
    tensors = ((_prefixed(name, "out_proj.weight"), 0),)
    if module.out_proj.bias is not None:
        tensors += ((_prefixed(name, "out_proj.bias"), 0),)
    return _Source(node, name, module.embed_dim, -1, tensors, True)


# ------------------------------------------------------------------------------------ the walk
@dataclass(frozen=True)
class _Flow:
    """A source's units at one node: `units` (shaped like the value) is the unit of each entry;
    `blocks` (n_units,) says which units may mix; `general` is False once a positively
    homogeneous nonlinearity was crossed; `mixed` once an attention product A @ v was;
    `partial` once a torch.cat put other entries (unit −1, untouched by the symmetry) beside
    the units: from there only data movement, entrywise maps and layers may follow."""

    units: Tensor
    blocks: Tensor
    general: bool = True
    mixed: bool = False
    partial: bool = False  # a torch.cat put entries of other tensors beside the units (unit −1)


@dataclass(frozen=True)
class _Next:
    """The walk goes on from `node`, its units mapped by `flow`."""

    node: torch.fx.Node
    flow: _Flow


@dataclass(frozen=True)
class _Layer:
    """The units enter a layer: `columns` gives the unit of each input column (or channel)."""

    node: torch.fx.Node
    param: str
    columns: Tensor
    rows: tuple[int, int] | None  # only these rows of `param` see the units (attention input thirds)
    flow: _Flow


@dataclass(frozen=True)
class _Norm:
    """The units reach a normalisation: each row of `rows` (R, k) holds units that it
    normalises together, so a positive scale they share is undone."""

    node: torch.fx.Node
    rows: Tensor
    eps: float
    flow: _Flow


@dataclass(frozen=True)
class _Output:
    flow: _Flow


@dataclass(frozen=True)
class _Merge:
    """The units reach operand `position` (0 or 1) of a residual add x + y; the walk goes on
    past it. A law across the add needs both operands carrying the same units, scaled alike."""

    node: torch.fx.Node
    position: int
    flow: _Flow


@dataclass(frozen=True)
class _Contract:
    """The units are summed against another operand's: `pairs` (batch..., c) is the unit at
    each contracted position c of every slice; `side` "query" (left) or "key" (right)."""

    node: torch.fx.Node
    side: str
    pairs: Tensor
    flow: _Flow


def _constant_along(units: Tensor, dims: tuple[int, ...]) -> bool:
    """Whether `units` is the same along every axis of `dims`."""
    if units.numel() == 0:
        return True
    first = units
    for dim in dims:
        first = first.narrow(dim, 0, 1)
    return torch.equal(units, first.expand_as(units))


def _refine(blocks: Tensor, slices: Tensor) -> Tensor:
    """Split `blocks` so that units in different rows of `slices` (n, c) never share a block."""
    rows = torch.unique(slices.reshape(-1, slices.shape[-1]), dim=0)
    slice_of = torch.full_like(blocks, -1)
    for i, row in enumerate(rows):
        if (slice_of[row] >= 0).any() or len(set(row.tolist())) != len(row):
            raise _Stop("a unit sits in two slices")
        slice_of[row] = i
    if (slice_of < 0).any():
        raise _Stop("a unit is dropped")
    return torch.unique(torch.stack([blocks, slice_of], 1), dim=0, return_inverse=True)[1]


class _Graph:
    def __init__(self, model: nn.Module, inputs: Tensor | None) -> None:
        _refuse_unseen(model)
        with _training(model):
            self.gm, substituted = _trace(model)
            self.modules = dict(self.gm.named_modules())
            self.shape_of, example = _shapes(self.gm, inputs)
            if substituted:
                _check_paths(model, self.gm, example, substituted)
        self.excluded = self._excluded_modules()
        self.exposed = self._exposed_parameters(model)
        self.merged: set[torch.fx.Node] = set()  # the adds one source's walk has gone past
        self._value_users: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self._containers: dict[torch.fx.Node, bool] = {}
        self._columns: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ graph facts
    def module(self, node: torch.fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def shape(self, node: torch.fx.Node) -> torch.Size:
        shape = self.shape_of.get(node.name)
        if shape is None:
            raise _Stop(f"no tensor shape for {node.name}")
        return shape

    def _excluded_modules(self) -> dict[str, str]:
        """Leaf modules that no law may involve or pass through, name → why (``_excluded``)."""
        targets = dict.fromkeys(node.target for node in self.gm.graph.nodes if node.op == "call_module")
        return {target: why for target in targets if (why := _excluded(self.modules[target])) is not None}

    def _exposed_parameters(self, model: nn.Module) -> dict[str, str]:
        """Trainable parameters used more than once in the graph: by two calls of one module, by
        two modules holding the same Parameter (``b.weight = a.weight``), or by a module and a
        direct read. A law follows one use, so none involves them. Each of their names → its users."""
        uses: dict[int, list[str]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                for p in self.modules[node.target].parameters():
                    uses.setdefault(id(p), []).append(node.target)
            elif node.op == "get_attr":
                value = operator.attrgetter(node.target)(self.gm)
                if isinstance(value, nn.Parameter):
                    uses.setdefault(id(value), []).append("forward (directly)")
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                names.setdefault(id(p), []).append(name)
        exposed = {}
        for key, users in uses.items():
            if len(users) > 1 and key in names:
                exposed.update(dict.fromkeys(names[key], " and ".join(users)))
        return exposed

    def value_users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """The users of `node` that read its values (not only its shape, dtype or device)."""
        found = self._value_users.get(node)
        if found is None:
            found = self._value_users[node] = self._read_values(node)
        return found

    def nested(self, node: torch.fx.Node, user: torch.fx.Node) -> bool:
        """Whether `user` takes `node` inside a list, tuple, dict or slice argument."""
        if user not in self._containers:
            self._containers[user] = any(isinstance(a, (list, tuple, dict, slice)) for a in (*user.args, *user.kwargs.values()))
        return self._containers[user] and _nested(node, user)

    @staticmethod
    def _read_values(node: torch.fx.Node) -> list[torch.fx.Node]:
        def metadata(user: torch.fx.Node) -> bool:
            if user.op == "call_method":
                return user.target in METADATA_METHODS
            if user.op == "call_function":
                if user.target is getattr:
                    return user.args[1] in METADATA_ATTRIBUTES
                return user.target in METADATA_FUNCTIONS
            return False

        return [u for u in node.users if not metadata(u)]

    # ------------------------------------------------------------------ the walk
    def walk(self, node: torch.fx.Node, flow: _Flow) -> list:
        """Every end that `node`'s units reach, depth first in the order of the users (raises
        _Stop if one of them breaks the symmetry). An explicit stack, not recursion: a path
        through hundreds of residual blocks is longer than Python's recursion limit. Each
        ``follow`` returns ends and the nodes to go on from (_Next)."""
        ends: list = []
        stack: list = [_Next(node, flow)]
        while stack:
            item = stack.pop()
            if isinstance(item, _Next):
                users = self.value_users(item.node)
                if not users:
                    raise _Stop(f"{item.node.name} is not used")
                stack.extend((item.node, user, item.flow) for user in reversed(users))
            elif isinstance(item, tuple):
                stack.extend(reversed(self.follow(*item)))
            else:
                ends.append(item)
        return ends

    def follow(self, node: torch.fx.Node, user: torch.fx.Node, flow: _Flow) -> list:
        if user.op == "output":
            if user.args[0] is not node or flow.partial:
                raise _Stop("part of a structured output")
            return [_Output(flow)]
        if user.op == "call_function" and user.target in CAT_FUNCTIONS:
            return self.concatenated(node, user, flow)
        positions = [i for i, a in enumerate(user.args) if a is node] + [k for k, a in user.kwargs.items() if a is node]
        if self.nested(node, user):
            raise _Stop(f"{user.name} takes {node.name} inside a container")
        module = self.module(user)
        if module is not None:
            return self.follow_module(node, user, module, flow, positions)
        if user.op not in ("call_function", "call_method"):
            raise _Stop(f"{user.name}: {user.op}")
        target = user.target
        method = user.op == "call_method"
        if positions == [0] and (target in POSITIVE_METHODS if method else target in POSITIVE_FUNCTIONS):
            return [_Next(user, replace(flow, general=False))]
        if positions == [0] and (target in MOVE_METHODS if method else target in MOVE_FUNCTIONS or _is_move_attribute(user)):
            return [_Next(user, replace(flow, units=self.moved(node, user, flow.units)))]
        if positions == [0] and (target in RESHAPE_METHODS if method else target in RESHAPE_FUNCTIONS):
            return [_Next(user, replace(flow, units=flow.units.reshape(self.shape(user))))]
        if not method and target is operator.getitem and positions == [0]:
            return [_Next(user, replace(flow, units=self.indexed(user, flow)))]
        if (target in SCALAR_METHODS if method else target in SCALAR_FUNCTIONS) and _by_a_number(user, positions):
            return [_Next(user, flow)]
        if (target in REDUCE_METHODS if method else target in REDUCE_FUNCTIONS) and positions == [0]:
            return [_Next(user, replace(flow, units=self.reduced(user, flow.units)))]
        if not method and target in POOL_FUNCTIONS and positions == [0]:
            return self.pooled(user, flow, *POOL_FUNCTIONS[target])
        if flow.partial:
            raise _Stop(f"{user.name} ({target}) mixes the units with entries of other tensors")
        if not method and target in LAYER_NORM_FUNCTIONS and positions == [0]:
            axes, eps = _layer_norm_axes(user)
            return [_Norm(user, flow.units.reshape(-1, math.prod(flow.units.shape[-axes:])), eps, flow)]
        if (target in MATMUL_METHODS if method else target in MATMUL_FUNCTIONS) and positions in ([0], [1]):
            return self.product(node, user, flow, positions[0])
        if not method and target in ATTENTION_FUNCTIONS:
            return self.attention(node, user, flow, positions)
        if (target in ADD_METHODS if method else target in ADD_FUNCTIONS) and positions in ([0], [1]):
            return self.merge(node, user, flow, positions[0])
        raise _Stop(f"{user.name} ({target}) does not commute with the symmetry")

    def follow_module(self, node, user, module: nn.Module, flow: _Flow, positions: list) -> list:
        if user.target in self.excluded:
            raise _Stop(f"{user.target}: {self.excluded[user.target]}")
        entrywise = (*LAYERS, *POSITIVE_MODULES, nn.Identity, nn.Dropout, nn.Flatten, *POOL_MODULES)
        if flow.partial and not isinstance(module, entrywise):
            raise _Stop(f"{user.target}: mixes the units with entries of other tensors")
        if isinstance(module, nn.MultiheadAttention):
            return [self.attention_input(user, module, flow, positions)]
        if positions != [0] or len(user.args) != 1 or user.kwargs:
            raise _Stop(f"{user.name} takes more than its input")
        if isinstance(module, LAYERS):
            if isinstance(module, CONVS) and module.groups != 1:
                raise _Stop("grouped convolution")
            return [self.layer_input(user, module, flow)]
        if isinstance(module, _NormBase):
            channels = flow.units.movedim(1, -1).reshape(-1, flow.units.shape[1])
            if not _constant_along(channels, (0,)) or sorted(channels[0].tolist()) != list(range(len(flow.blocks))):
                raise _Stop("a normalised channel is not one unit")
            return [_Norm(user, channels[0].reshape(-1, 1), float(module.eps), flow)]
        if isinstance(module, nn.LayerNorm):
            k = math.prod(module.normalized_shape)
            return [_Norm(user, flow.units.reshape(-1, k), float(module.eps), flow)]
        if isinstance(module, nn.GroupNorm):
            units = flow.units
            if units.ndim < 2 or units.shape[1] != module.num_channels:
                raise _Stop(f"{user.name}: the channels are not on axis 1")
            return [_Norm(user, units.reshape(units.shape[0] * module.num_groups, -1), float(module.eps), flow)]
        if isinstance(module, POSITIVE_MODULES):
            return [_Next(user, replace(flow, general=False))]
        if isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0):
            return [_Next(user, flow)]
        if isinstance(module, nn.Flatten):
            return [_Next(user, replace(flow, units=flow.units.reshape(self.shape(user))))]
        if type(module) in POOL_MODULES:
            return self.pooled(user, flow, *POOL_MODULES[type(module)])
        raise _Stop(f"{user.target} ({type(module).__name__}) does not commute with the symmetry")

    def merge(self, node: torch.fx.Node, user: torch.fx.Node, flow: _Flow, position: int) -> list:
        """A residual add x + y: a _Merge end, and the walk goes on past the add once per source
        (a second arrival, through the other operand, only records its _Merge)."""
        other = user.args[1 - position]
        if len(user.args) != 2 or user.kwargs or not isinstance(other, torch.fx.Node):
            raise _Stop(f"{user.name}: an add of something else than two tensors")
        if not (self.shape(node) == self.shape(other) == self.shape(user)):
            raise _Stop(f"{user.name}: an add that broadcasts")
        end = _Merge(user, position, flow)
        if user in self.merged:
            return [end]
        self.merged.add(user)
        return [end, _Next(user, flow)]

    def concatenated(self, node: torch.fx.Node, user: torch.fx.Node, flow: _Flow) -> list:
        """torch.cat([..., x, ...], dim): the units in x's slots (x may be there more than
        once), the other tensors' entries in theirs with unit −1 (`partial`)."""
        tensors = user.args[0] if user.args else user.kwargs.get("tensors")
        dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else 0)
        others = [*user.args[2:], *(v for k, v in user.kwargs.items() if k not in ("tensors", "dim"))]
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or others:
            raise _Stop(f"{user.name}: a cat with options")
        if any(not isinstance(t, torch.fx.Node) for t in tensors):
            raise _Stop(f"{user.name}: a cat of something else than tensors")
        parts = [flow.units if t is node else torch.full(self.shape(t), -1, dtype=flow.units.dtype) for t in tensors]
        units = torch.cat(parts, dim)
        if units.shape != self.shape(user):
            raise _Stop(f"{user.name}: unexpected shape")
        return [_Next(user, replace(flow, units=units, partial=flow.partial or any(t is not node for t in tensors)))]

    # ------------------------------------------------------------------ unit maps through ops
    def moved(self, node: torch.fx.Node, user: torch.fx.Node, units: Tensor) -> Tensor:
        if user.op == "call_function" and user.target is getattr:
            return getattr(units, user.args[1])
        args = [units if a is node else a for a in user.args]
        kwargs = dict(user.kwargs)
        if any(isinstance(a, torch.fx.Node) for a in (*args[1:], *kwargs.values())):
            raise _Stop(f"{user.name} has traced arguments")
        out = getattr(units, user.target)(*args[1:], **kwargs) if user.op == "call_method" else user.target(*args, **kwargs)
        if out.shape != self.shape(user):
            raise _Stop(f"{user.name}: unexpected shape")
        return out

    def indexed(self, user: torch.fx.Node, flow: _Flow) -> Tensor:
        index = user.args[1]
        parts = index if isinstance(index, tuple) else (index,)
        if any(not (p is None or p is Ellipsis or isinstance(p, (int, slice))) for p in parts) or any(
            isinstance(p, slice) and any(isinstance(v, torch.fx.Node) for v in (p.start, p.stop, p.step)) for p in parts
        ):
            raise _Stop(f"{user.name}: indexing by a traced value")
        units = flow.units[index]
        if units.shape != self.shape(user) or set(units.unique().tolist()) - {-1} != set(range(len(flow.blocks))):
            raise _Stop(f"{user.name}: indexing drops units")
        return units

    def reduced(self, user: torch.fx.Node, units: Tensor) -> Tensor:
        dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
        keepdim = user.kwargs.get("keepdim", user.args[2] if len(user.args) > 2 else False)
        if dim is None or not isinstance(keepdim, bool):
            raise _Stop(f"{user.name}: a reduction over every axis")
        dims = tuple(d % units.ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))
        if not _constant_along(units, dims):
            raise _Stop(f"{user.name}: reduces over units")
        out = units.amax(dim=dims, keepdim=keepdim)
        if out.shape != self.shape(user):
            raise _Stop(f"{user.name}: unexpected shape")
        return out

    def pooled(self, user: torch.fx.Node, flow: _Flow, pooled: int, linear: bool) -> list:
        dims = tuple(range(-pooled, 0))
        if flow.units.ndim <= pooled + 1 or not _constant_along(flow.units, dims):
            raise _Stop(f"{user.name}: pools over units")
        shape = self.shape(user)
        units = flow.units[(..., *(0,) * pooled)].reshape(*flow.units.shape[:-pooled], *(1,) * pooled).expand(shape)
        return [_Next(user, replace(flow, units=units, general=flow.general and linear))]

    def product(self, node: torch.fx.Node, user: torch.fx.Node, flow: _Flow, position: int) -> list:
        """A matmul with `node` as its left (0) or right (1) operand."""
        units, out = flow.units, self.shape(user)
        other = user.args[1 - position]
        if units.ndim < 2 or not isinstance(other, torch.fx.Node) or len(self.shape(other)) < 2:
            raise _Stop(f"{user.name}: a product with a vector")
        contracted, passed = (-1, -2) if position == 0 else (-2, -1)
        along_contracted = not _constant_along(units, (contracted,))
        along_passed = not _constant_along(units, (passed,))
        if along_contracted and along_passed:
            raise _Stop(f"{user.name}: units on both multiplied axes")
        # units on neither (one unit per head): a contracted axis of length 1 pairs them, a passed
        # axis of length 1 carries them through
        length = {axis: units.shape[axis] for axis in (contracted, passed)}
        if along_contracted or (not along_passed and length[contracted] == 1 < length[passed]):
            pairs = units.select(passed, 0)
            return [_Contract(user, "query" if position == 0 else "key", pairs, flow)]
        if along_passed or length[passed] == 1 < length[contracted]:
            kept = units.narrow(contracted, 0, 1)
            blocks = _refine(flow.blocks, kept.movedim(passed, -1))
            return [_Next(user, replace(flow, units=torch.broadcast_to(kept, out), blocks=blocks, mixed=True))]
        raise _Stop(f"{user.name}: units on neither multiplied axis")

    def attention(self, node: torch.fx.Node, user: torch.fx.Node, flow: _Flow, positions: list) -> list:
        """F.scaled_dot_product_attention(q, k, v, ...): q and k contracted on their last axis,
        the last axis of v passed through."""
        names = ("query", "key", "value")
        slots = [names[p] if isinstance(p, int) and p < 3 else p for p in positions]
        dropout = user.kwargs.get("dropout_p", user.args[4] if len(user.args) > 4 else 0.0)
        if len(slots) != 1 or slots[0] not in names or dropout != 0.0 or user.kwargs.get("enable_gqa", False):
            raise _Stop(f"{user.name}: attention with dropout, or the units in its mask")
        units = flow.units
        if units.ndim < 2 or not _constant_along(units, (-2,)):
            raise _Stop(f"{user.name}: units along the sequence axis")
        if slots[0] != "value":
            return [_Contract(user, slots[0], units.select(-2, 0), flow)]
        kept = units.narrow(-2, 0, 1)
        blocks = _refine(flow.blocks, kept)
        return [_Next(user, replace(flow, units=torch.broadcast_to(kept, self.shape(user)), blocks=blocks, mixed=True))]

    # ------------------------------------------------------------------ consumers
    def layer_input(self, user: torch.fx.Node, module: nn.Module, flow: _Flow) -> _Layer:
        units = flow.units
        axis = -1 if isinstance(module, nn.Linear) else 1
        key = (id(units), axis)  # one unit map reaches many layers along a residual stream
        if key not in self._columns:
            moved = units.movedim(axis, -1).reshape(-1, units.shape[axis])
            self._columns[key] = (units, moved[0] if _constant_along(moved, (0,)) else None)  # units kept: its id stays its own
        columns = self._columns[key][1]
        if columns is None:
            raise _Stop(f"{user.name}: the units change along a non-feature axis")
        return _Layer(user, _prefixed(user.target, "weight"), columns, None, flow)

    def attention_input(self, user: torch.fx.Node, module: nn.MultiheadAttention, flow: _Flow, positions: list) -> _Layer:
        names = ("query", "key", "value")
        slots = {names[p] if isinstance(p, int) and p < 3 else p for p in positions}
        if not slots <= set(names):
            raise _Stop(f"{user.name}: the units enter an attention mask")
        if module.bias_k is not None:
            raise _Stop(f"{user.name}: add_bias_kv")
        moved = flow.units.reshape(-1, flow.units.shape[-1])
        if not _constant_along(moved, (0,)):
            raise _Stop(f"{user.name}: the units change along the sequence axis")
        if module._qkv_same_embed_dim:
            rows = [names.index(s) for s in slots]
            if sorted(rows) != list(range(min(rows), max(rows) + 1)):
                raise _Stop(f"{user.name}: query and value without key")
            e = module.embed_dim
            part = None if len(rows) == 3 else (min(rows) * e, (max(rows) + 1) * e)
            return _Layer(user, _prefixed(user.target, "in_proj_weight"), moved[0], part, flow)
        if len(slots) != 1:
            raise _Stop(f"{user.name}: one input for maps of different widths")
        return _Layer(user, _prefixed(user.target, f"{slots.pop()[0]}_proj_weight"), moved[0], None, flow)


def _nested(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    """Whether `user` takes `node` inside a list, tuple, dict or slice argument."""
    found = []
    torch.fx.node.map_arg((user.args, user.kwargs), lambda n: found.append(n) or n)
    direct = sum(a is node for a in user.args) + sum(a is node for a in user.kwargs.values())
    return sum(n is node for n in found) != direct


def _layer_norm_axes(user: torch.fx.Node) -> tuple[int, float]:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)``: how many trailing axes it
    normalises, and its eps (_Stop where the shape or eps is a traced value)."""
    shape = user.kwargs.get("normalized_shape", user.args[1] if len(user.args) > 1 else None)
    eps = user.kwargs.get("eps", user.args[4] if len(user.args) > 4 else 1e-5)
    shape = (shape,) if isinstance(shape, int) else shape
    if not isinstance(shape, (tuple, list)) or not shape or any(not isinstance(d, int) for d in shape) or not isinstance(eps, (int, float)):
        raise _Stop(f"{user.name}: a layer norm over a traced shape")
    return len(shape), float(eps)


def _is_move_attribute(user: torch.fx.Node) -> bool:
    return user.target is getattr and user.args[1] in MOVE_ATTRIBUTES


def _by_a_number(user: torch.fx.Node, positions: list) -> bool:
    """x * c, c * x, x / c or −x with c a Python number."""
    if positions != [0] and not (positions == [1] and user.target in (operator.mul, torch.mul, "mul")):
        return False
    others = [a for i, a in enumerate(user.args) if i != positions[0]] + list(user.kwargs.values())
    return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in others)


# ------------------------------------------------------------------------------------ laws
def _column_terms(end: _Layer, start: int, stop: int, form: str) -> Term:
    """The input columns of the consuming layer that carry units start..stop−1, as one term."""
    columns = end.columns
    mine = ((columns >= start) & (columns < stop)).nonzero().flatten()
    first, last = int(mine[0]), int(mine[-1]) + 1
    if last - first != len(mine):
        raise _Stop("the units' columns are not contiguous")
    local = columns[first:last] - start
    run = int((local != local[0]).nonzero()[0]) if (local != local[0]).any() else len(local)
    positions = torch.arange(len(local))
    if not torch.equal(local, (positions // run) % (stop - start)):
        raise _Stop("the units' columns follow no stride")
    whole = (first, last) == (0, len(columns))
    if end.rows is not None and not whole:
        raise _Stop("columns and rows both restricted")
    part = (0, *end.rows) if end.rows is not None else (None if whole else (1, first, last))
    return Term(end.param, form, axis=1, units=stop - start, sign=-1, stride=run, part=part)


def _ranges(blocks: Tensor) -> list[tuple[int, int]]:
    """The blocks as contiguous ranges of units, in order (each block must be one)."""
    ranges = []
    for b in torch.unique(blocks):
        members = (blocks == b).nonzero().flatten()
        if int(members[-1]) - int(members[0]) + 1 != len(members):
            raise _Stop("a head's units are not contiguous")
        ranges.append((int(members[0]), int(members[-1]) + 1))
    return sorted(ranges)


def _pair_law(source: _Source, ends: list[_Layer]) -> list[Law]:
    """rescale, and where the paths are linear the matrix law (linear / attention_vo)."""
    site = "|".join(dict.fromkeys([source.name] + [e.node.target for e in ends]))
    unit = "channel" if source.axis == 1 else "unit"
    terms = source.terms("sq") + tuple(_column_terms(e, 0, source.units, "sq") for e in ends)
    laws = [Law("rescale", site, (terms,), tuple(f"{unit} {j}" for j in range(source.units)))]
    if source.general and all(e.flow.general for e in ends):
        blocks = torch.zeros(source.units, dtype=torch.long)
        for e in ends:
            blocks = torch.unique(torch.stack([blocks, e.flow.blocks], 1), dim=0, return_inverse=True)[1]
        ranges = _ranges(blocks)
        mixed = any(e.flow.mixed for e in ends)
        groups, components = [], []
        for h, (start, stop) in enumerate(ranges):
            groups.append(source.terms("gram", start, stop) + tuple(_column_terms(e, start, stop, "gram") for e in ends))
            components += gram_labels(stop - start, f"head {h} " if len(ranges) > 1 else "")
        laws.append(Law("attention_vo" if mixed else "linear", site, tuple(groups), tuple(components)))
    return laws


def _concatenated_laws(graph: _Graph, walks: list[tuple[_Source, list]]) -> list[tuple[tuple[str, ...], Law]]:
    """Layers of one kind that read one input alone and whose outputs are concatenated at once
    (``torch.cat([a(x), b(x)])``, read by nothing else) and reach, along linear paths only, the
    same layers: they are one layer of stacked rows [W_a; W_b] (and [b_a; b_b]), so any
    invertible mixing of their units together, undone by the readers' columns, is a
    symmetry: the linear law of the stack,

        [W_a; W_b][W_a; W_b]ᵀ + [b_a; b_b][b_a; b_b]ᵀ − Σ_r W_rᵀ W_r,

    whose off-diagonal blocks W_a W_bᵀ + b_a b_bᵀ − W_r[:, a]ᵀ W_r[:, b] each layer's own law
    misses. Returns (the layers' names, the law) for each such group."""
    groups: dict[tuple, list[tuple[_Source, list]]] = {}
    for source, ends in walks:
        module = graph.module(source.node)
        if not isinstance(module, LAYERS) or not source.general or len(source.node.args) != 1 or source.node.kwargs:
            continue
        if not ends or any(not isinstance(e, _Layer) or not e.flow.general or e.flow.mixed or bool(e.flow.blocks.any()) for e in ends):
            continue
        # the paths after the cat are the same for every layer of it; before it, none
        users = graph.value_users(source.node)
        cat = users[0] if len(users) == 1 else None
        if cat is not None and cat.op == "call_function" and cat.target in CAT_FUNCTIONS and cat.args and isinstance(cat.args[0], (list, tuple)):
            if sum(t is source.node for t in cat.args[0]) == 1:
                readers = tuple(sorted({e.node.name for e in ends}))
                groups.setdefault((cat, source.node.args[0], _layer_signature(module), readers), []).append((source, ends))
    laws = []
    for members in groups.values():
        if len(members) > 1:
            with contextlib.suppress(_Stop):
                laws.append(_stacked_law(members))
    return laws


def _layer_signature(module: nn.Module) -> tuple:
    """What two layers must share to be one layer of stacked rows: their map of the input."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return (nn.Linear, module.in_features, bias)
    return (type(module), module.in_channels, module.kernel_size, module.stride, module.padding, module.dilation, module.padding_mode, bias)


def _stacked_law(members: list[tuple[_Source, list]]) -> tuple[tuple[str, ...], Law]:
    """The linear law of layers stacked in the order their units meet the first reader's columns."""
    first = members[0][1][0].node

    def start(member: tuple[_Source, list]) -> int:
        ends = [e for e in member[1] if e.node is first]
        return int((ends[0].columns >= 0).nonzero()[0])

    members = sorted(members, key=start)
    total = sum(s.units for s, _ in members)
    readers: dict[torch.fx.Node, _Layer] = {}
    offset = 0
    for source, ends in members:
        for node in dict.fromkeys(e.node for e in ends):
            mine = [e for e in ends if e.node is node]
            if len(mine) != 1:
                raise _Stop(f"{node.name}: reads one layer's units twice")
            end = readers.setdefault(node, replace(mine[0], columns=torch.full_like(mine[0].columns, -1)))
            columns = mine[0].columns
            if end.rows != mine[0].rows or bool((end.columns[columns >= 0] >= 0).any()):
                raise _Stop(f"{node.name}: two layers' units in one column")
            end.columns[columns >= 0] = columns[columns >= 0] + offset
        offset += source.units
    terms = tuple(
        Term(param, "gram", axis=axis, units=source.units, stack=(start_, total, param.rsplit(".", 1)[-1]))
        for (source, _), start_ in zip(members, itertools.accumulate([0] + [s.units for s, _ in members]))
        for param, axis in source.tensors
    )
    terms += tuple(_column_terms(e, 0, total, "gram") for e in readers.values())
    names = tuple(s.name for s, _ in members)
    site = "+".join(names) + "|" + "|".join(dict.fromkeys(e.node.target for e in readers.values()))
    return names, Law("linear", site, (terms,), tuple(gram_labels(total)))


def _repeated_slot_laws(graph: _Graph) -> list[tuple[torch.fx.Node, Law]]:
    """A Linear reading ``torch.cat([..., h, ..., h, ...], -1)``: its column blocks that read
    the same h act as their sum, W_1 h + W_2 h = (W_1 + W_2) h, so W_1 − W_2 moves the output
    not at all: each entry of the difference is conserved (a translation law per column of h,
    one component per row of W)."""
    laws = []
    for node in graph.gm.graph.nodes:
        if node.op != "call_function" or node.target not in CAT_FUNCTIONS or not node.args or not isinstance(node.args[0], (list, tuple)):
            continue
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        shape = graph.shape_of.get(node.name)
        if any(not isinstance(t, torch.fx.Node) or graph.shape_of.get(t.name) is None for t in tensors):
            continue
        if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1 or len(set(tensors)) == len(tensors):
            continue
        starts = list(itertools.accumulate([0] + [graph.shape_of[t.name][-1] for t in tensors]))
        for user in graph.value_users(node):
            module = graph.module(user)
            if not isinstance(module, nn.Linear) or user.args != (node,) or user.kwargs or user.target in graph.excluded:
                continue
            weight = _prefixed(user.target, "weight")
            groups, components = [], []
            for t in dict.fromkeys(tensors):
                slots = [starts[i] for i, u in enumerate(tensors) if u is t]
                width = graph.shape_of[t.name][-1]
                for other in slots[1:]:
                    for j in range(width):
                        groups.append((
                            Term(weight, "sum", axis=0, units=module.out_features, part=(1, slots[0] + j, slots[0] + j + 1)),
                            Term(weight, "sum", axis=0, units=module.out_features, sign=-1, part=(1, other + j, other + j + 1)),
                        ))  # fmt: skip
                        components += [f"row {i} col {slots[0] + j} − col {other + j}" for i in range(module.out_features)]
            laws.append((user, Law("translation", user.target, tuple(groups), tuple(components))))
    return laws


def _qk_law(query: _Source, q: _Contract, key: _Source, k: _Contract) -> Law:
    """[W_q|b_q][W_q|b_q]ᵀ − [W_k|b_k][W_k|b_k]ᵀ per head, the heads read off the product."""
    qs, ks = torch.broadcast_tensors(q.pairs, k.pairs)
    qs, ks = qs.reshape(-1, qs.shape[-1]), ks.reshape(-1, ks.shape[-1])
    rows = torch.unique(torch.cat([qs, ks], 1), dim=0)
    width = qs.shape[1]
    heads = []
    for row in rows:
        qrow, krow = row[:width], row[width:]
        if not (torch.equal(qrow, qrow[0] + torch.arange(width)) and torch.equal(krow, krow[0] + torch.arange(width))):
            raise _Stop("a head's units are not contiguous and in order")
        heads.append((int(qrow[0]), int(krow[0])))
    heads.sort()
    if sorted(s for s, _ in heads) != list(range(0, query.units, width)) or sorted(s for _, s in heads) != list(
        range(0, key.units, width)
    ):
        raise _Stop("the heads do not cover the units")
    groups, components = [], []
    for h, (qs0, ks0) in enumerate(heads):
        groups.append(query.terms("gram", qs0, qs0 + width) + key.terms("gram", ks0, ks0 + width, sign=-1))
        components += gram_labels(width, f"head {h} " if len(heads) > 1 else "")
    return Law("attention_qk", f"{query.name}|{key.name}", tuple(groups), tuple(components))


def _bias_law(graph: _Graph, query: _Source, key: _Source, contraction: torch.fx.Node) -> tuple[_Source, Law] | None:
    """Scores q_i·k_j: the key bias adds b_k·q_i, the same for every key j, and the query
    bias b_q·k_j, the same for every query i. A softmax over the keys (the last axis) ignores
    the first, one over the queries (the axis before) the second: that bias is conserved,
    entry by entry, when the scores meet only that softmax."""
    axis = _softmax_axis(graph, contraction)
    source = {-1: key, -2: query}.get(axis)
    if source is None:
        return None
    bias = [p for p, _ in source.tensors if p.endswith("bias")]
    if not bias:
        return None
    components = tuple(f"bias {j}" for j in range(source.units))
    law = Law("translation", source.name, ((Term(bias[0], "sum", axis=0, units=source.units),),), components)
    return source, law


def _softmax_axis(graph: _Graph, node: torch.fx.Node) -> int | None:
    """−1 or −2: the scores `node` meet only a softmax over that axis (through
    multiplications by a number and masked_fill with −∞), or None."""
    if node.op == "call_function" and node.target in ATTENTION_FUNCTIONS:
        return -1
    users = graph.value_users(node)
    if len(users) != 1:
        return None
    user = users[0]
    target = user.target
    if user.op == "call_method" and target == "softmax" or user.op == "call_function" and target in SOFTMAX_FUNCTIONS:
        dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
        ndim = len(graph.shape(node))
        return dim % ndim - ndim if isinstance(dim, int) and ndim >= 2 and dim % ndim >= ndim - 2 else None
    positions = [i for i, a in enumerate(user.args) if a is node]
    if target in SCALAR_FUNCTIONS | SCALAR_METHODS and _by_a_number(user, positions):
        return _softmax_axis(graph, user)
    # a masked entry stays at weight 0 whatever the shift where its fill is −∞ (or below −1e30,
    # as torch.finfo(float32 or float64).min: exp underflows to 0); a finite fill would not
    fill = user.args[2] if len(user.args) > 2 else user.kwargs.get("value")
    masked = user.op == "call_method" and target == "masked_fill" and positions == [0]
    if masked and isinstance(fill, (int, float)) and fill <= -1e30:
        return _softmax_axis(graph, user)
    return None


def _attention_module_laws(name: str, module: nn.MultiheadAttention, trainable: set[str]) -> list[Law]:
    """The laws inside an nn.MultiheadAttention: its packed maps split per head."""
    if module.bias_k is not None:
        return []
    e, heads = module.embed_dim, module.num_heads
    d = e // heads
    packed = module._qkv_same_embed_dim

    def rows(which: int, start: int, stop: int, form: str, sign: int = 1) -> tuple[Term, ...]:
        weight = "in_proj_weight" if packed else ("q_proj_weight", "k_proj_weight", "v_proj_weight")[which]
        offset = which * e if packed else 0
        terms = [Term(_prefixed(name, weight), form, units=stop - start, sign=sign, part=(0, offset + start, offset + stop))]
        if module.in_proj_bias is not None:
            terms.append(
                Term(_prefixed(name, "in_proj_bias"), form, units=stop - start, sign=sign, part=(0, which * e + start, which * e + stop))
            )
        return tuple(terms)

    def out_columns(start: int, stop: int, form: str) -> Term:
        return Term(_prefixed(name, "out_proj.weight"), form, axis=1, units=stop - start, sign=-1, part=(1, start, stop))

    head_ranges = [(h * d, (h + 1) * d) for h in range(heads)]
    prefix = [f"head {h} " if heads > 1 else "" for h in range(heads)]
    laws = [
        Law(
            "attention_qk",
            name,
            tuple(rows(0, s, t, "gram") + rows(1, s, t, "gram", -1) for s, t in head_ranges),
            tuple(c for h in range(heads) for c in gram_labels(d, prefix[h])),
        ),
        Law("rescale", name, (rows(2, 0, e, "sq") + (out_columns(0, e, "sq"),),), tuple(f"unit {j}" for j in range(e))),
        Law(
            "attention_vo",
            name,
            tuple(rows(2, s, t, "gram") + (out_columns(s, t, "gram"),) for s, t in head_ranges),
            tuple(c for h in range(heads) for c in gram_labels(d, prefix[h])),
        ),
    ]
    if module.in_proj_bias is not None and not module.add_zero_attn:
        key_bias = Term(_prefixed(name, "in_proj_bias"), "sum", units=e, part=(0, e, 2 * e))
        laws.append(Law("translation", name, ((key_bias,),), tuple(f"key bias {j}" for j in range(e))))
    return [law for law in laws if set(law.parameters) <= trainable]


def _law_from_ends(source: _Source, ends: list, loss: str, graph: _Graph) -> list[Law]:
    kinds = {type(e) for e in ends}
    if kinds == {_Output}:
        flows = [e.flow for e in ends]
        module = graph.module(source.node)
        if loss != "cross_entropy" or not isinstance(module, nn.Linear) or len(ends) != 1 or not flows[0].general:
            return []
        units = flows[0].units
        if units.ndim != 2 or not torch.equal(units, torch.arange(source.units).expand_as(units)):
            return []
        groups = [(Term(_prefixed(source.name, "weight"), "sum", axis=1, units=module.in_features),)]
        components = [f"col {j}" for j in range(module.in_features)]
        if module.bias is not None:
            groups.append((Term(_prefixed(source.name, "bias"), "sum", axis=0, units=1),))
            components.append("bias")
        return [Law("translation", source.name, tuple(groups), tuple(components))]
    if kinds == {_Layer}:
        return _pair_law(source, ends)
    if kinds == {_Norm}:
        # a positive scale shared by the units each normalisation normalises together
        eps = max(e.eps for e in ends)
        unit = "channel" if source.axis == 1 else "unit"
        cells = _Cells(source.units)
        for e in ends:
            cells.merge(e.rows)
        labels = cells.labels()
        groups = int(labels.max()) + 1
        if groups == source.units:
            components = tuple(f"{unit} {j}" for j in range(source.units))
            return [Law("scale", source.name, (source.terms("sq"),), components, exact=eps == 0, eps=eps)]
        stride = 0 if _blocks(labels) is not None else 1 if torch.equal(labels, torch.arange(source.units) % groups) else None
        if groups == 1:
            whole = tuple(Term(param, "sq", axis=axis, units=1) for param, axis in source.tensors)
            return [Law("scale", source.name, (whole,), ("layer",), exact=eps == 0, eps=eps)]
        components = tuple(f"group {g}" for g in range(groups))
        if stride is None:
            # groups that are neither blocks nor an interleaving (a channel shuffle before a
            # GroupNorm): each group the sum over its runs of consecutive units
            cells = tuple(
                tuple(Term(param, "sq", axis=axis, units=1, part=(axis, a, b)) for a, b in runs for param, axis in source.tensors)
                for runs in _cell_runs(labels)
            )
            return [Law("scale", source.name, cells, components, exact=eps == 0, eps=eps)]
        terms = tuple(Term(param, "sq", axis=axis, units=groups, stride=stride or None) for param, axis in source.tensors)
        return [Law("scale", source.name, (terms,), components, exact=eps == 0, eps=eps)]
    return []


# ------------------------------------------------------------------------------------ residual streams
def _stream_laws(graph: _Graph, walks: list[tuple[_Source, list]], loss: str) -> list[tuple[_Source, Law]]:
    """The laws of residual streams: the sources whose walks meet at adds are the stream's
    writers, scaled (or mixed) together; the layers their walks reach are its readers (where
    others readers ignore a shift, the matrix law along cells: ``_cell_laws``)."""
    parent = list(range(len(walks)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[torch.fx.Node, int] = {}
    for i, (_, ends) in enumerate(walks):
        for end in ends:
            if isinstance(end, _Merge):
                j = first.setdefault(end.node, i)
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(walks)):
        groups.setdefault(root(i), []).append(i)
    laws = []
    for members in groups.values():
        with contextlib.suppress(_Stop):
            laws += _stream_group_laws([walks[i] for i in members])
        with contextlib.suppress(_Stop):
            laws += _cell_laws(graph, [walks[i] for i in members], loss)
    return laws


def _stream_group_laws(walks: list[tuple[_Source, list]]) -> list[tuple[_Source, Law]]:
    sources = [s for s, _ in walks]
    units = sources[0].units
    if any(s.units != units for s in sources) or len({s.name for s in sources}) != len(sources):
        raise _Stop("writers of different widths")
    merges = [e for _, ends in walks for e in ends if isinstance(e, _Merge)]
    arrivals: dict[torch.fx.Node, dict[int, Tensor]] = {}
    for m in merges:
        seen = arrivals.setdefault(m.node, {})
        if m.position in seen and not torch.equal(seen[m.position], m.flow.units):
            raise _Stop("one operand reached with two unit maps")
        seen[m.position] = m.flow.units
    for node, seen in arrivals.items():
        # both operands of every add must carry the stream's units, in the same places
        if set(seen) != {0, 1} or not torch.equal(seen[0], seen[1]):
            raise _Stop(f"{node.name}: an operand outside the stream")
    readers: dict[torch.fx.Node, _Layer] = {}
    for _, ends in walks:
        for end in ends:
            if isinstance(end, _Merge):
                continue
            if not isinstance(end, _Layer):
                raise _Stop("the stream ends elsewhere than in layers")
            known = readers.setdefault(end.node, end)
            if not torch.equal(known.columns, end.columns) or known.rows != end.rows:
                raise _Stop("one reader reached with two unit maps")
    if not readers:
        raise _Stop("a stream without readers")
    flows = [m.flow for m in merges] + [e.flow for e in readers.values()]
    general = all(s.general for s in sources) and all(f.general and not f.mixed and not bool(f.blocks.any()) for f in flows)
    writer = _Source(
        sources[0].node,
        "+".join(s.name for s in sources),
        units,
        sources[0].axis,
        tuple(t for s in sources for t in s.tensors),
        general,
    )
    ends = list(readers.values())
    if not general:
        ends = [replace(e, flow=replace(e.flow, general=False)) for e in ends]
    return [(sources[0], law) for law in _pair_law(writer, ends)]


def _cell_laws(graph: _Graph, walks: list[tuple[_Source, list]], loss: str) -> list[tuple[_Source, Law]]:
    """The matrix law along cells: writers h (general sources, one width n), read by layers and
    by readers that ignore a shift constant over each *cell* of units at each position (a
    LayerNorm over the units, a softmax cross-entropy output; through adds too). Mixing h by
    G = exp(tA), A = 1_a 1_bᵀ + 1_b 1_aᵀ for two cells a, b (1_a the cell's indicator), and
    the layers' input columns by G⁻¹, changes h by t·(…)·1_a + t·(…)·1_b at each position:
    ignored. A is symmetric, so its Noether law is conserved (Marcotte, Gribonval & Peyré):

        1_aᵀ (Σ_w W_w W_wᵀ + b_w b_wᵀ − Σ_r W_rᵀ W_r) 1_b,   a ≤ b

    (in ``h = inp(x); out = h + fc2(relu(fc1(h)))`` under cross-entropy: |W_inpᵀ 1|² + (1ᵀ b_inp)²
    + |W_fc2ᵀ 1|² + (1ᵀ b_fc2)² − |W_fc1 1|²). An add whose other operand no writer writes
    passes the shift on, not the mixing: past it only readers that ignore the shift may follow.
    Made only where some reader ignores the shift and the cells are consecutive blocks of
    units; where none does, the whole matrix law is the stream's (``_stream_group_laws``)."""
    sources = [s for s, _ in walks]
    n = sources[0].units
    if any(not s.general or s.units != n for s in sources) or len({s.name for s in sources}) != len(sources):
        raise _Stop("writers of different widths, or not mixed freely")
    arrivals: dict[torch.fx.Node, dict[int, Tensor]] = {}
    for _, ends in walks:
        for end in ends:
            if isinstance(end, _Merge):
                seen = arrivals.setdefault(end.node, {})
                if end.position in seen and not torch.equal(seen[end.position], end.flow.units):
                    raise _Stop("one operand reached with two unit maps")
                seen[end.position] = end.flow.units
    if any(len(seen) == 2 and not torch.equal(seen[0], seen[1]) for seen in arrivals.values()):
        raise _Stop("an add of the units in different places")
    outside = {node for node, seen in arrivals.items() if len(seen) == 1}
    if outside:
        # past an add with an operand outside, the writers' value is shifted, not mixed: walk
        # the units again up to those adds (the shift walk below goes past them)
        walks = []
        for source in sources:
            graph.merged = set(outside)
            walks.append((source, graph.walk(source.node, _unit_map(graph, source))))
    layers: dict[torch.fx.Node, _Layer] = {}
    for _, ends in walks:
        for end in ends:
            if not end.flow.general or end.flow.mixed or end.flow.partial or bool(end.flow.blocks.any()):
                raise _Stop("a path that does not commute with mixing the units")
            if isinstance(end, _Layer):
                known = layers.setdefault(end.node, end)
                if not torch.equal(known.columns, end.columns) or known.rows != end.rows:
                    raise _Stop("one reader reached with two unit maps")
    if not layers:
        raise _Stop("no layer reads the writers")
    cells = _Cells(n)
    for source in sources:
        walker = _Shifts(graph, loss, cells, width=n)
        walker.walk(source.node, _position_ids(graph.shape(source.node), source.axis, n))
        for value, user, _ in walker.readers:
            # a layer reached by the mixed units reads nothing but them (an attention its
            # query, key and value all from that one value), so a shifted value it cannot be
            if user not in layers:
                raise _Stop(f"{user.name}: a reader that neither ignores the shift nor is a layer")
            inputs = (*user.args[:3], *(v for k, v in user.kwargs.items() if k in ("query", "key", "value")))
            if isinstance(graph.module(user), nn.MultiheadAttention) and any(a is not value for a in inputs):
                raise _Stop(f"{user.name}: an attention whose query, key and value differ")
    labels = cells.labels()
    count = int(labels.max()) + 1
    if count == n or _blocks(labels) is None:
        raise _Stop("no reader ignores the shift, or its cells are not blocks of units")
    pool = n // count
    terms = tuple(replace(t, pool=pool) for s in sources for t in s.terms("gram"))
    terms += tuple(replace(_column_terms(e, 0, n, "gram"), pool=pool) for e in layers.values())
    site = "+".join(s.name for s in sources) + "|" + "|".join(dict.fromkeys(e.node.target for e in layers.values()))
    return [(sources[0], Law("linear", site, (terms,), tuple(gram_labels(count, "cell sums "))))]


def _position_ids(shape: torch.Size, axis: int, n: int) -> Tensor:
    """Shaped like a value whose `n` units lie along `axis`: position · n + unit, a position
    being one place along every other axis (an example, a sequence position, a pixel)."""
    axis %= len(shape)
    other = [size for i, size in enumerate(shape) if i != axis]
    view = [1] * len(shape)
    view[axis] = n
    return torch.arange(math.prod(other)).reshape(other).unsqueeze(axis) * n + torch.arange(n).reshape(view)


# ------------------------------------------------------------------------------------ shifts
class _Cells:
    """A partition of a writer's units, coarsened by merges (union–find): the units that a
    reader needs shifted (or scaled) alike. A LayerNorm merges the units it normalises
    together, a GroupNorm those of one group, a softmax cross-entropy every logit."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def _root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def merge(self, rows: Tensor) -> None:
        """Put the units of each row of `rows` (…, k) in one cell."""
        for row in torch.unique(rows.reshape(-1, rows.shape[-1]), dim=0).tolist():
            first = self._root(row[0])
            for unit in row[1:]:
                root = self._root(unit)
                if root != first:
                    self.parent[root] = first

    def labels(self) -> Tensor:
        """The cell of each unit, cells numbered in the order of their first unit."""
        number: dict[int, int] = {}
        return torch.tensor([number.setdefault(self._root(i), len(number)) for i in range(len(self.parent))])


def _blocks(labels: Tensor) -> list[tuple[int, int]] | None:
    """The cells as consecutive ranges of units of one size, in order (None if they are not)."""
    n, cells = len(labels), int(labels.max()) + 1
    if n % cells or not torch.equal(labels, torch.arange(n) // (n // cells)):
        return None
    return [(g * (n // cells), (g + 1) * (n // cells)) for g in range(cells)]


def _cell_runs(labels: Tensor) -> list[list[tuple[int, int]]]:
    """The units of each cell (in the order of ``_Cells.labels``) as runs of consecutive units."""
    runs: list[list[tuple[int, int]]] = []
    for cell in range(int(labels.max()) + 1):
        members = (labels == cell).nonzero().flatten().tolist()
        starts = [u for u in members if u - 1 not in members]
        runs.append([(a, next(u for u in range(a, len(labels) + 1) if u not in members)) for a in starts])
    return runs


@dataclass(frozen=True)
class _Shift:
    """A shift that a parameter `param` makes of the value its writer node computes. `ids`
    (shaped like that value) says where each entry's shift comes from:

    - "unit": entry j of a 1-D `param` (a bias) shifts unit j: ids = the unit (of `units`);
    - "uniform": every entry of a 1-D `param` by one number: ids = 0;
    - "position": a slice of a 2-D `param` along its axis `keep` (a Linear weight's column, an
      Embedding's row), shifted by a number per unit, shifts every unit at each position by
      a number of that position: ids = position · `units` + unit.

    `count` is the number of slices along `keep`; `label` names the components."""

    pattern: str
    ids: Tensor
    param: str
    units: int
    label: str
    keep: int = 0
    count: int = 1

    def term(self) -> Term:
        """The sum a "unit" (per unit) or "uniform" (of every entry) shift conserves."""
        return Term(self.param, "sum", units=self.units if self.pattern == "unit" else 1)

    def law(self, name: str, labels: Tensor) -> Law:
        """The translation law of the shift constant on each cell of units (`labels`): a
        "unit" shift gives one sum per cell (one term where the cells are consecutive blocks
        or an interleaving, unit j in cell j mod G; else a term per run of consecutive units
        of each cell), a "position" shift one sum per slice and cell."""
        n, cells = self.units, int(labels.max()) + 1
        if self.pattern == "unit":
            if cells == n:
                term, components = self.term(), (self.label,) if n == 1 else tuple(f"{self.label} {j}" for j in range(n))
            elif _blocks(labels) is not None or torch.equal(labels, torch.arange(n) % cells):
                term = Term(self.param, "sum", units=cells, stride=None if _blocks(labels) is not None else 1)
                components = tuple(f"{self.label} group {g}" for g in range(cells))
            else:
                groups = tuple(tuple(Term(self.param, "sum", part=(0, a, b)) for a, b in runs) for runs in _cell_runs(labels))
                return Law("translation", name, groups, tuple(f"{self.label} group {g}" for g in range(cells)))
            return Law("translation", name, ((term,),), components)
        groups = tuple(
            tuple(
                Term(self.param, "sum", axis=self.keep, units=self.count, part=None if (a, b) == (0, n) else (1 - self.keep, a, b))
                for a, b in runs
            )
            for runs in _cell_runs(labels)
        )
        prefix = [""] if cells == 1 else [f"group {g} " for g in range(cells)]
        components = tuple(f"{p}{self.label} {j}" for p in prefix for j in range(self.count))
        return Law("translation", name, groups, components)


class _Shifts:
    """A shift of a source's output, followed through adds and data movement to the
    normalisations that absorb it (a normalisation subtracts its mean) or to a value where
    it must cancel against other writers' shifts (`blocked`). A reader that ignores a shift
    constant over some units merges them in `cells`: the law is then one per cell (for a
    "position" shift, `width` units per position: merging two positions is a block); the
    values where a merge was needed are `merged` (without merging they would be blocked)."""

    def __init__(self, graph: _Graph, loss: str, cells: _Cells, width: int | None = None) -> None:
        self.graph, self.loss, self.cells, self.width = graph, loss, cells, width
        self.blocked: list[tuple[torch.fx.Node, Tensor]] = []  # (value node, its shift map), per arrival
        self.merged: list[tuple[torch.fx.Node, Tensor]] = []
        # (value, user, shift map there) for each user that does not ignore it (the output too)
        self.readers: list[tuple[torch.fx.Node, torch.fx.Node, Tensor]] = []
        self.visits, self.limit = 0, max(2000, 4 * len(graph.gm.graph.nodes))
        self._merging = False

    def absorbed(self, ids: Tensor, dims: tuple[int, ...]) -> bool:
        """Whether a reader that ignores a shift constant along `dims` ignores this one."""
        dims = tuple(d % ids.ndim for d in dims)
        if _constant_along(ids, dims):
            return True
        rows = ids.movedim(dims, tuple(range(ids.ndim - len(dims), ids.ndim))).reshape(-1, math.prod(ids.shape[d] for d in dims))
        if self.width is not None:
            if not _constant_along(rows // self.width, (1,)):
                return False
            rows = rows % self.width
        self.cells.merge(rows)
        self._merging = True
        return True

    def averaged(self, user: torch.fx.Node, ids: Tensor) -> Tensor | None:
        """The shift past `user`, a mean over given axes, or None where it averages different
        shifts together: along those axes the shift must be the same or (a "position" shift)
        differ by position only, one shift per cell at each position, so that their mean is
        one per cell too (positions merged: each output entry keeps one of its positions)."""
        dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
        keepdim = user.kwargs.get("keepdim", user.args[2] if len(user.args) > 2 else False)
        if dim is None or not isinstance(keepdim, bool):
            return None
        dims = tuple(d % ids.ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))
        if not _constant_along(ids if self.width is None else ids % self.width, dims):
            return None
        out = ids.amin(dim=dims, keepdim=keepdim)
        return out if out.shape == self.graph.shape(user) else None

    def walk(self, node: torch.fx.Node, ids: Tensor) -> None:
        """Follow the shift from `node` (by an explicit stack: paths through hundreds of
        residual blocks are longer than Python's recursion limit)."""
        stack = [(node, ids)]
        while stack:
            stack.extend(self.step(*stack.pop()))

    def step(self, node: torch.fx.Node, ids: Tensor) -> list[tuple[torch.fx.Node, Tensor]]:
        """The readers of `node`'s shift `ids`: records a block, returns the values it goes on to."""
        graph = self.graph
        self.visits += 1
        if self.visits > self.limit:
            raise _Stop("too many paths")
        going: list[tuple[torch.fx.Node, Tensor]] = []
        users = graph.value_users(node)
        if not users:
            raise _Stop(f"{node.name} is not used")
        blocked, self._merging = False, False
        for user in users:
            ignored = True  # by this user: it goes on, or absorbs the shift
            if user.op == "output":
                if user.args[0] is not node:
                    raise _Stop("part of a structured output")
                # a softmax cross-entropy ignores a shift of all the logits of an example
                ignored = self.loss == "cross_entropy" and ids.ndim == 2 and self.absorbed(ids, (1,))
            elif graph.nested(node, user):
                raise _Stop(f"{user.name} takes {node.name} inside a container")
            elif (module := graph.module(user)) is not None:
                positions = [i for i, a in enumerate(user.args) if a is node] + [k for k, a in user.kwargs.items() if a is node]
                if user.target in graph.excluded:
                    raise _Stop(f"{user.target}: {graph.excluded[user.target]}")
                if positions != [0] or len(user.args) != 1 or user.kwargs:
                    ignored = False
                elif isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0):
                    going.append((user, ids))
                elif isinstance(module, nn.Flatten):
                    going.append((user, ids.reshape(graph.shape(user))))
                elif isinstance(module, nn.LayerNorm):
                    ignored = self.absorbed(ids, tuple(range(-len(module.normalized_shape), 0)))
                elif isinstance(module, _NormBase) and ids.ndim >= 2:
                    instance = isinstance(module, nn.modules.instancenorm._InstanceNorm)
                    if instance and ids.ndim < 3:
                        raise _Stop("an unbatched instance norm")
                    ignored = self.absorbed(ids, tuple(range(2, ids.ndim)) if instance else (0, *range(2, ids.ndim)))
                elif isinstance(module, nn.GroupNorm) and ids.ndim >= 2 and ids.shape[1] == module.num_channels:
                    # the mean of each example's group of channels (and positions) is subtracted
                    ignored = self.absorbed(ids.reshape(ids.shape[0], module.num_groups, -1), (2,))
                else:
                    ignored = False
            elif user.op not in ("call_function", "call_method"):
                raise _Stop(f"{user.name}: {user.op}")
            else:
                positions = [i for i, a in enumerate(user.args) if a is node] + [k for k, a in user.kwargs.items() if a is node]
                target, method = user.target, user.op == "call_method"
                if positions == [0] and (target in MOVE_METHODS if method else target in MOVE_FUNCTIONS or _is_move_attribute(user)):
                    going.append((user, graph.moved(node, user, ids)))
                elif positions == [0] and (target in RESHAPE_METHODS if method else target in RESHAPE_FUNCTIONS):
                    going.append((user, ids.reshape(graph.shape(user))))
                elif not method and target in LAYER_NORM_FUNCTIONS and positions == [0]:
                    ignored = self.absorbed(ids, tuple(range(-_layer_norm_axes(user)[0], 0)))
                elif positions == [0] and target in ("mean", torch.mean) and (averaged := self.averaged(user, ids)) is not None:
                    going.append((user, averaged))
                elif (target in ADD_METHODS if method else target in ADD_FUNCTIONS) and positions in ([0], [1]):
                    if len(user.args) != 2 or user.kwargs:
                        raise _Stop(f"{user.name}: an add with options")
                    shape = graph.shape(user)
                    if len(ids.shape) > len(shape) or any(a not in (1, b) for a, b in zip(ids.shape[::-1], shape[::-1])):
                        raise _Stop(f"{user.name}: unexpected shape")
                    going.append((user, ids if ids.shape == shape else torch.broadcast_to(ids, shape)))
                else:
                    ignored = False
            if not ignored:
                blocked = True
                self.readers.append((node, user, ids))
        if blocked:
            self.blocked.append((node, ids))
        elif self._merging:
            self.merged.append((node, ids))
        return going


def _shift_writers(graph: _Graph) -> Iterator[tuple[torch.fx.Node, str, list[_Shift]]]:
    """Each node that writes a shiftable parameter into a value, with its shifts."""
    for node in graph.gm.graph.nodes:
        module = graph.module(node)
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(graph.gm)
            if not isinstance(value, nn.Parameter) or value.ndim not in (1, 2):
                continue
            users = graph.value_users(node)
            if not users or any(
                not ((u.op == "call_method" and u.target in ADD_METHODS) or (u.op == "call_function" and u.target in ADD_FUNCTIONS))
                for u in users
            ):
                continue
            name = node.target
            if value.ndim == 1:
                n = value.shape[0]
                shifts = [
                    _Shift("unit", torch.arange(n), name, n, "entry"),
                    _Shift("uniform", torch.zeros(n, dtype=torch.long), name, n, "sum"),
                ]
            else:
                rows, width = value.shape
                atoms = torch.arange(rows * width).reshape(rows, width)
                shifts = [_Shift("position", atoms, name, width, "row", keep=0, count=rows)]
            yield node, name, shifts
            continue
        attention = _attention_output(graph, node)
        if attention is not None:
            # the first output of an nn.MultiheadAttention is written by its out_proj
            name, module = _prefixed(node.args[0].target, "out_proj"), attention.out_proj
        elif module is None or node.target in graph.excluded:
            continue
        else:
            name = node.target
        try:
            shape = graph.shape(node)
        except _Stop:
            continue
        shifts = []
        bias = getattr(module, "bias", None)
        axis = None
        if isinstance(module, nn.Linear) or (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1):
            axis = len(shape) - 1
        elif isinstance(module, (*CONVS, _NormBase, nn.GroupNorm)) and len(shape) >= 2:
            axis = 1
        if axis is not None and isinstance(bias, nn.Parameter) and shape[axis] == bias.shape[0]:
            view = [1] * len(shape)
            view[axis] = shape[axis]
            units = torch.arange(shape[axis]).reshape(view).expand(shape)
            bias_name = _prefixed(name, "bias")
            shifts += [
                _Shift("unit", units, bias_name, shape[axis], "bias"),
                _Shift("uniform", torch.zeros(shape, dtype=torch.long), bias_name, shape[axis], "bias sum"),
            ]
        embedding = isinstance(module, nn.Embedding) and module.max_norm is None and tuple(shape[-1:]) == (module.embedding_dim,)
        if shape and (isinstance(module, nn.Linear) or embedding):
            n = shape[-1]
            atoms = _position_ids(shape, -1, n)
            if isinstance(module, nn.Linear):
                shifts.append(_Shift("position", atoms, _prefixed(name, "weight"), n, "col", keep=1, count=module.in_features))
            else:
                shifts.append(_Shift("position", atoms, _prefixed(name, "weight"), n, "row", keep=0, count=module.num_embeddings))
        if shifts:
            yield node, name, shifts


def _compensated(graph: _Graph, readers: list[tuple[torch.fx.Node, torch.fx.Node, Tensor]]) -> list[str] | None:
    """The layers whose bias undoes the shift where they read it (b → b − W·shift), or None
    unless every reader that does not ignore the shift is one: a Linear reading it alone, or
    an nn.MultiheadAttention reading it as query, key or value (its packed input maps), with
    a trainable bias, the shift constant over the positions."""
    if not all(isinstance(graph.module(user), (nn.Linear, nn.MultiheadAttention)) for _, user, _ in readers):
        return None
    names = []
    for node, user, ids in readers:
        module = graph.module(user) if user.op == "call_module" else None
        if isinstance(module, nn.Linear):
            bias, alone = module.bias, len(user.args) == 1 and not user.kwargs
        elif isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim and module.bias_k is None:
            bias = module.in_proj_bias
            alone = all(a is not node for a in (*user.args[3:], *user.kwargs.values()))
        else:
            return None
        trainable = isinstance(bias, nn.Parameter) and bias.requires_grad
        if not trainable or not alone or not _constant_along(ids, tuple(range(ids.ndim - 1))):
            return None
        names.append(user.target)
    return list(dict.fromkeys(names)) or None


def _shift_laws(graph: _Graph, loss: str) -> tuple[list[tuple[torch.fx.Node, Law]], list[str]]:
    """translation laws of parameters whose shift every reader ignores: a bias before a
    BatchNorm/InstanceNorm (each entry) or a GroupNorm (the sum over each group), the biases
    and weight columns written into a stream read only by LayerNorms (or by a softmax
    cross-entropy), and differences of biases whose shifts cancel where they meet anything
    else (Σ b_o − Σ b_fc2 in a pre-norm block; b[j] of a block's last layer − b[j] of its
    shortcut, per unit).

    One walk per "unit" or "position" shift, readers merging units into cells, gives the
    finest law. Where some reader does not ignore the shift, the values it reaches are where
    it must cancel against other writers' (a "unit" shift: also where a merge was needed; the
    "uniform" shift reaches the same values, as one number, so the same walk serves it).

    Also returns, as sentences, the shifts that Linear readers' biases compensate (b → b −
    W·shift): symmetries whose generator depends on θ, whose laws (if any) no flowsim Law
    expresses; leads for ``count``'s note."""
    laws: list[tuple[torch.fx.Node, Law]] = []
    hints: list[str] = []
    cancelling: dict[str, dict[tuple, list[tuple[torch.fx.Node, str, Term, str]]]] = {"unit": {}, "uniform": {}}

    places: dict[int, tuple[Tensor, tuple]] = {}  # one shift map reaches many values along a stream: listed once

    def signature(reached: list[tuple[torch.fx.Node, Tensor]], uniform: bool) -> tuple:
        """Each value reached, how often, and where each unit sits there."""
        for _, m in reached:
            if not uniform and id(m) not in places:
                places[id(m)] = (m, tuple(m.flatten().tolist()))
        return tuple(sorted((n.name, tuple(m.shape), () if uniform else places[id(m)][1]) for n, m in reached))

    for node, name, shifts in _shift_writers(graph):
        uniform = next((s for s in shifts if s.pattern == "uniform"), None)
        for shift in shifts:
            if shift.pattern == "uniform":
                continue
            cells = _Cells(shift.units)
            walker = _Shifts(graph, loss, cells, shift.units if shift.pattern == "position" else None)
            try:
                walker.walk(node, shift.ids)
            except _Stop:
                continue
            labels = cells.labels()
            if not walker.blocked:
                # one cell of every unit: a "unit" shift is the uniform one, with its own label
                whole = shift.pattern == "unit" and shift.units > 1 and int(labels.max()) == 0
                law = None if whole else shift.law(name, labels)
                if law is None and shift.pattern == "unit" and uniform is not None:
                    law = Law("translation", name, ((uniform.term(),),), (uniform.label,))
                if law is not None:
                    laws.append((node, law))
            readers = _compensated(graph, walker.readers) if shift.pattern == "unit" and walker.blocked else None
            if readers is not None:
                number = int(labels.max()) + 1
                hints.append(
                    f"{shift.param} shifted by {'one number' if number == 1 else f'{number} numbers'}, which the bias of "
                    f"{' and '.join(readers)} compensates (b → b − W·shift: a symmetry that depends on θ)"
                )
            if shift.pattern == "unit" and (walker.blocked or walker.merged):
                reached = signature(walker.blocked + walker.merged, uniform=False)
                cancelling["unit"].setdefault(reached, []).append((node, name, shift.term(), shift.label))
            if shift.pattern == "unit" and walker.blocked and uniform is not None:
                reached = signature(walker.blocked, uniform=True)
                cancelling["uniform"].setdefault(reached, []).append((node, name, uniform.term(), uniform.label))
    # writers whose shifts reach the same values, the same units in the same places, cancel in pairs
    paired: set[str] = set()
    for pattern in ("unit", "uniform"):
        for members in cancelling[pattern].values():
            members = [m for m in members if m[1] not in paired]
            for (node, name, term, label), (_, other, other_term, _) in zip(members, members[1:]):
                group = (term, replace(other_term, sign=-1))
                n = term.units
                components = (f"{label} difference",) if n == 1 else tuple(f"{label} {j} difference" for j in range(n))
                laws.append((node, Law("translation", f"{name}-{other}", (group,), components)))
            if pattern == "unit" and len(members) > 1:
                paired.update(m[1] for m in members)
    return laws, hints


def _unreached_laws(graph: _Graph, model: nn.Module) -> list[Law]:
    """Each entry of a parameter the loss never reaches (its gradient is zero): a module that
    is never called, or whose output never reaches the model's output. Only where the graph
    shows everything (no hooked or opaque module) and for tensors of at most two axes."""
    if graph.excluded:
        return []
    reaches: set[torch.fx.Node] = set()
    for node in reversed(graph.gm.graph.nodes):
        if node.op == "output" or any(u in reaches for u in node.users):
            reaches.add(node)
    used: dict[int, bool] = {}
    for node in graph.gm.graph.nodes:
        if node.op == "call_module":
            params = list(graph.modules[node.target].parameters())
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(graph.gm)
            params = [value] if isinstance(value, nn.Parameter) else list(value.parameters()) if isinstance(value, nn.Module) else []
        else:
            continue
        for p in params:
            used[id(p)] = used.get(id(p), False) or node in reaches
    laws = []
    for name, p in model.named_parameters():
        if used.get(id(p), False) or not p.requires_grad or p.ndim > 2 or p.numel() == 0:
            continue
        if p.ndim <= 1:
            n = max(p.numel(), 1)
            terms = ((Term(name, "sum", units=n),),)
            components = tuple(f"entry {j}" for j in range(n))
        else:
            rows, cols = p.shape
            terms = tuple((Term(name, "sum", axis=1, units=cols, part=(0, i, i + 1)),) for i in range(rows))
            components = tuple(f"entry ({i},{j})" for i in range(rows) for j in range(cols))
        laws.append(Law("translation", name, terms, components))
    return laws


def _attention_output(graph: _Graph, node: torch.fx.Node) -> nn.MultiheadAttention | None:
    """The nn.MultiheadAttention (not excluded) whose first output `node` is, or None."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1] != 0:
        return None
    parent = graph.module(node.args[0])
    if isinstance(parent, nn.MultiheadAttention) and node.args[0].target not in graph.excluded:
        return parent
    return None


def _sources(graph: _Graph) -> Iterator[_Source]:
    for node in graph.gm.graph.nodes:
        module = graph.module(node)
        if module is None or node.target in graph.excluded:
            # the first output of an nn.MultiheadAttention is a source too
            attention = _attention_output(graph, node)
            if attention is not None:
                yield _attention_output_source(node, attention)
            continue
        source = _source(node, module)
        if source is not None:
            yield source


def _unit_map(graph: _Graph, source: _Source) -> _Flow:
    shape = graph.shape(source.node)
    axis = source.axis % len(shape)
    if shape[axis] != source.units:
        raise _Stop(f"{source.name}: units not on axis {source.axis}")
    view = [1] * len(shape)
    view[axis] = source.units
    return _Flow(torch.arange(source.units).reshape(view).expand(shape), torch.zeros(source.units, dtype=torch.long))


def _warn_unanalysed(graph: _Graph) -> None:
    unknown = sorted(
        {
            f"{node.target} ({type(graph.module(node)).__name__})"
            for node in graph.gm.graph.nodes
            if graph.module(node) is not None
            and node.target not in graph.excluded
            and not isinstance(graph.module(node), UNDERSTOOD_LEAVES)
            and any(p.requires_grad for p in graph.module(node).parameters())
        }
    )
    if unknown:
        warnings.warn(
            f"flowsim does not look inside {', '.join(unknown)}: laws that involve their parameters are not detected; "
            "the laws returned are the ones found elsewhere",
            UserWarning,
            stacklevel=3,
        )
    for target, why in graph.excluded.items():
        warnings.warn(
            f"{target} ({type(graph.modules[target]).__name__}): {why}; "
            "flowsim drops every law that involves it or passes through it",
            UserWarning,
            stacklevel=3,
        )
    for users in dict.fromkeys(graph.exposed.values()):
        names = [name for name, u in graph.exposed.items() if u == users]
        verb = "is" if len(names) == 1 else "are"
        warnings.warn(
            f"{', '.join(names)} {verb} used by {users}; a law follows one use, so flowsim drops every law that involves them",
            UserWarning,
            stacklevel=3,
        )


def detect(model: nn.Module, loss: str = "cross_entropy", inputs: Tensor | None = None) -> list[Law]:
    """Every law flowsim can prove for `model`'s symmetries under `loss`, in graph order.

    `inputs` (a few examples, batch first) give every tensor's shape to the graph walk; without
    them flowsim probes the model with small inputs guessed from its first layer. The model is
    traced in training mode, as Problem runs it, and left in its own modes."""
    return detect_with_hints(model, loss, inputs)[0]


def detect_with_hints(model: nn.Module, loss: str = "cross_entropy", inputs: Tensor | None = None) -> tuple[list[Law], list[str]]:
    """``detect``'s laws, and sentences naming the symmetries found whose laws no flowsim Law
    expresses (they depend on θ beyond degree 2: a shift that a Linear reader's bias
    compensates, b → b − W·shift); ``count`` names them where it finds more laws than known."""
    if loss not in LOSSES:
        raise bad_value("problem.loss", loss, f"one of {', '.join(LOSSES)}")
    graph = _Graph(model, inputs)
    _warn_unanalysed(graph)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    found: list[tuple[int, Law]] = []
    order = {node: i for i, node in enumerate(graph.gm.graph.nodes)}
    contractions: dict[torch.fx.Node, list[tuple[_Source, _Contract]]] = {}
    streams: list[tuple[_Source, list]] = []
    walked: list[tuple[_Source, list]] = []  # the other sources, with their ends
    own: dict[str, list[Law]] = {}  # the laws each of them makes alone
    for source in _sources(graph):
        graph.merged = set()
        try:
            ends = graph.walk(source.node, _unit_map(graph, source))
        except _Stop:
            continue
        if len(ends) == 1 and isinstance(ends[0], _Contract):
            contractions.setdefault(ends[0].node, []).append((source, ends[0]))
            continue
        if any(isinstance(e, _Merge) for e in ends):
            streams.append((source, ends))
            continue
        with contextlib.suppress(_Stop):
            own[source.name] = _law_from_ends(source, ends, loss, graph)
            found += [(order[source.node], law) for law in own[source.name]]
        if any(isinstance(e, _Layer) for e in ends) and not all(isinstance(e, _Layer) for e in ends):
            with contextlib.suppress(_Stop):
                found += [(order[s.node], law) for s, law in _cell_laws(graph, [(source, ends)], loss)]
        walked.append((source, ends))
    # layers of one input whose outputs are concatenated are one layer: their matrix law, cross
    # terms included, replaces each one's own
    stacked = _concatenated_laws(graph, walked)
    dropped = {id(law) for names, _ in stacked for name in names for law in own.get(name, []) if law.kind == "linear"}
    found = [(i, law) for i, law in found if id(law) not in dropped]
    node_of = {source.name: source.node for source, _ in walked}
    found += [(order[node_of[names[0]]], law) for names, law in stacked]
    found += [(order[node], law) for node, law in _repeated_slot_laws(graph)]
    for node, arrivals in contractions.items():
        sides = {c.side: (s, c) for s, c in arrivals}
        if len(arrivals) != 2 or set(sides) != {"query", "key"}:
            continue
        (query, q), (key, k) = sides["query"], sides["key"]
        if query.name == key.name or not (query.general and key.general and q.flow.general and k.flow.general):
            continue
        with contextlib.suppress(_Stop):
            found.append((order[query.node], _qk_law(query, q, key, k)))
            bias = _bias_law(graph, query, key, node)
            if bias is not None:
                found.append((order[bias[0].node], bias[1]))
    for node in graph.gm.graph.nodes:
        module = graph.module(node)
        if isinstance(module, nn.MultiheadAttention) and node.target not in graph.excluded:
            found += [(order[node], law) for law in _attention_module_laws(node.target, module, trainable)]
    found += [(order[source.node], law) for source, law in _stream_laws(graph, streams, loss)]
    # translations: a group of terms already conserved (the logits' translation of the head) is not repeated
    known = {group for _, law in found if law.kind == "translation" for group in law.groups}
    shift_laws, hints = _shift_laws(graph, loss)
    for node, law in shift_laws:
        keep = [(g, c) for g, c in zip(law.groups, _group_components(law)) if g not in known]
        if keep:
            known.update(g for g, _ in keep)
            found.append((order[node], replace(law, groups=tuple(g for g, _ in keep), components=tuple(c for _, cs in keep for c in cs))))
    laws = [law for _, law in sorted(found, key=lambda pair: pair[0])]
    laws += _unreached_laws(graph, model)
    return [law for law in laws if set(law.parameters) <= trainable - graph.exposed.keys()], hints


def _group_components(law: Law) -> list[tuple[str, ...]]:
    """The component labels of each group of `law`."""
    out, start = [], 0
    for group in law.groups:
        out.append(law.components[start : start + group[0].size])
        start += group[0].size
    return out


__all__ = ["detect", "detect_with_hints"]
