"""Multi-layer perceptrons."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .checks import MAX_DEPTH, number, one_of

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "identity": nn.Identity, "tanh": nn.Tanh}


def activation_layer(name: str) -> nn.Module:
    """The activation module called `name` (relu, leaky_relu, identity, tanh)."""
    return ACTIVATIONS[one_of("activation", name, ACTIVATIONS)]()


def mlp(
    in_features: int = 64,
    out_features: int = 10,
    depth: int = 2,
    width: int = 32,
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """flatten → (fc_i → act_i) × depth → out. `depth` counts hidden layers (0: a linear model).

    Layer names: ``fc1 … fc{depth}``, ``act1 …``, ``out``. tanh is offered as the
    non-homogeneous contrast: it has no rescale symmetry.
    """
    depth = number("depth", depth, integer=True, minimum=0, maximum=MAX_DEPTH)
    width = number("width", width, integer=True, minimum=1)
    in_features = number("in_features", in_features, integer=True, minimum=1)
    out_features = number("out_features", out_features, integer=True, minimum=1)
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    fan_in = in_features
    for i in range(1, depth + 1):
        layers += [(f"fc{i}", nn.Linear(fan_in, width, bias=bias)), (f"act{i}", activation_layer(activation))]
        fan_in = width
    layers.append(("out", nn.Linear(fan_in, out_features, bias=bias)))
    return nn.Sequential(OrderedDict(layers))
