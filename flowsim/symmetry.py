"""Find the symmetries of an ``nn.Module`` from its torch.fx graph and build their laws.

The graph is read, not the module names, so any module built from the same parts works.
For every parametrised *producer* P (Linear, Conv with groups=1, an affine normalisation
layer) the walk follows P's output through ops that commute with a positive per-unit scaling
(ReLU, leaky ReLU, identity, max/avg pooling, flatten) to the places where it is consumed:

- every consumer a Linear/Conv layer → **rescale**: scaling unit j of P by α and the matching
  inputs of every consumer by 1/α changes nothing, so |W_P[j]|² + b_P[j]² − Σ_C |W_C[:, j]|²
  is conserved (the units of a consumer after a flatten are blocks of its input features);
- every consumer a per-channel normalisation (BatchNorm, InstanceNorm) → **scale**:
  |W_P[c]|² + b_P[c]² per channel; a LayerNorm over exactly P's units → one whole-layer
  scale law. eps > 0 breaks these at relative order eps/Var: they are marked ``exact=False``;
- P's output is the model's output and the loss is a softmax cross-entropy → **translation**:
  the logits can be shifted together, so each column sum Σ_k W[k, j] and Σ_k b[k] is conserved.

Anything else on the way (an added bias or tensor, tanh, a residual add, a custom function)
stops the walk and makes no law: residual blocks keep the laws inside them and none across
their skip connections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _NormBase

from .errors import ModelError
from .laws import Law, Term

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
HOMOGENEOUS_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
}
HOMOGENEOUS_METHODS = {"relu"}
FLATTEN_FUNCTIONS = {torch.flatten}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
METADATA_METHODS = {"size", "dim"}  # users that read a tensor's shape, not its values


@dataclass
class _Consumer:
    node: torch.fx.Node | None  # None: the model's output
    flattened: bool
    kind: str  # "layer", "norm", "layer_norm", "output"


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise ModelError(
            f"model: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "laws are found from the traced graph, so data-dependent Python control flow must be "
            "moved into a leaf module or removed"
        ) from exc


def _units(module: nn.Module) -> int | None:
    """How many units a producer has, or None if it is not a producer flowsim understands."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.out_channels if module.groups == 1 else None
    if isinstance(module, _NormBase) and module.affine:
        return module.num_features
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    return None


class _Graph:
    def __init__(self, model: nn.Module) -> None:
        self.gm = _trace(model)
        self.modules = dict(self.gm.named_modules())

    def module(self, node: torch.fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def value_users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [
            u
            for u in node.users
            if not (u.op == "call_method" and u.target in METADATA_METHODS)
            and not (u.op == "call_function" and u.target is getattr)
        ]

    def step(self, node: torch.fx.Node, user: torch.fx.Node) -> str | None:
        """How `user` treats `node`'s value: "homogeneous", "flatten", or None (stop)."""
        if not user.args or user.args[0] is not node or node in user.args[1:] or node in user.kwargs.values():
            return None
        module = self.module(user)
        if module is not None:
            if isinstance(module, HOMOGENEOUS_MODULES):
                return "homogeneous"
            if isinstance(module, nn.Flatten):
                return "flatten"
            return None
        if user.op == "call_function":
            if user.target in HOMOGENEOUS_FUNCTIONS:
                return "homogeneous"
            if user.target in FLATTEN_FUNCTIONS:
                return "flatten"
        if user.op == "call_method":
            if user.target in HOMOGENEOUS_METHODS:
                return "homogeneous"
            if user.target in FLATTEN_METHODS:
                return "flatten"
        return None

    def consumers(self, node: torch.fx.Node, flattened: bool = False) -> list[_Consumer] | None:
        """Where `node`'s value ends up through symmetry-preserving ops; None if anywhere else."""
        found: list[_Consumer] = []
        users = self.value_users(node)
        if not users:
            return None
        for user in users:
            if user.op == "output":
                if user.args[0] is not node:  # part of a tuple or dict output
                    return None
                found.append(_Consumer(None, flattened, "output"))
                continue
            module = self.module(user)
            if module is not None and user.args and user.args[0] is node and len(user.args) == 1 and not user.kwargs:
                if isinstance(module, LAYERS) and _units(module) is not None:
                    found.append(_Consumer(user, flattened, "layer"))
                    continue
                if isinstance(module, _NormBase):
                    found.append(_Consumer(user, flattened, "norm"))
                    continue
                if isinstance(module, nn.LayerNorm):
                    found.append(_Consumer(user, flattened, "layer_norm"))
                    continue
            how = self.step(node, user)
            if how is None:
                return None
            deeper = self.consumers(user, flattened or how == "flatten")
            if deeper is None:
                return None
            found += deeper
        return found


def _producer_terms(name: str, module: nn.Module, units: int) -> tuple[Term, ...]:
    """|incoming weights of unit j|² (+ bias²): rows of W, or γ_j and β_j of an affine norm."""
    tensor_names = ("weight", "bias")
    return tuple(
        Term(f"{name}.{t}" if name else t, "sq", axis=0, units=units)
        for t in tensor_names
        if getattr(module, t, None) is not None and getattr(module, t).requires_grad
    )


def _law_for(graph: _Graph, node: torch.fx.Node, loss: str) -> Law | None:
    module = graph.module(node)
    units = _units(module)
    consumers = graph.consumers(node)
    if units is None or not consumers:
        return None
    name = node.target
    incoming = _producer_terms(name, module, units)
    if not incoming:
        return None
    is_conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    kinds = {c.kind for c in consumers}

    if kinds == {"output"}:
        if loss != "cross_entropy" or not isinstance(module, nn.Linear) or any(c.flattened for c in consumers):
            return None
        groups = [(Term(f"{name}.weight", "sum", axis=1, units=module.in_features),)]
        components = [f"col {j}" for j in range(module.in_features)]
        if module.bias is not None:
            groups.append((Term(f"{name}.bias", "sum", axis=0, units=1),))
            components.append("bias")
        return Law("translation", name, tuple(groups), tuple(components))
    if "output" in kinds:
        return None

    layers = [c for c in consumers if c.kind == "layer"]
    if layers:
        outgoing = []
        for c in layers:
            consumer = graph.module(c.node)
            if isinstance(consumer, nn.Linear):
                # a conv feeds a Linear only through a flatten: unit j is a block of features
                if (is_conv and not c.flattened) or consumer.in_features % units:
                    return None
            elif consumer.in_channels != units or c.flattened or not (is_conv or isinstance(module, _NormBase)):
                return None
            outgoing.append(Term(f"{c.node.target}.weight", "sq", axis=1, units=units, sign=-1))
        site = "|".join([name] + [c.node.target for c in layers])
        unit = "channel" if is_conv or isinstance(module, _NormBase) else "unit"
        return Law("rescale", site, (incoming + tuple(outgoing),), tuple(f"{unit} {j}" for j in range(units)))

    # only normalisation consumers: scaling the producer's units changes nothing downstream
    norms = [graph.module(c.node) for c in consumers]
    if any(c.flattened for c in consumers):
        return None
    eps = max(float(n.eps) for n in norms)
    if kinds == {"norm"} and all(n.num_features == units for n in norms):
        unit = "channel" if is_conv or isinstance(module, _NormBase) else "unit"
        return Law("scale", name, (incoming,), tuple(f"{unit} {j}" for j in range(units)), exact=eps == 0, eps=eps)
    if kinds == {"layer_norm"} and isinstance(module, nn.Linear) and all(n.normalized_shape == (units,) for n in norms):
        whole = tuple(Term(t.param, "sq", axis=0, units=1) for t in incoming)
        return Law("scale", name, (whole,), ("layer",), exact=eps == 0, eps=eps)
    return None


def detect_laws(model: nn.Module, loss: str = "cross_entropy") -> list[Law]:
    """Every law flowsim can prove for `model` under `loss`, in graph order."""
    graph = _Graph(model)
    laws = []
    for node in graph.gm.graph.nodes:
        if node.op == "call_module" and _units(graph.module(node)) is not None:
            law = _law_for(graph, node, loss)
            if law is not None:
                laws.append(law)
    return laws


__all__ = ["detect_laws"]
