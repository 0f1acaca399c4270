"""Residual networks: a tiny ResNet for digits and an MLP with skip connections.

A residual block adds its input back to its output. That adds no law and removes none: the
laws of a block are those of the same block without its skip (``flowsim.laws.count`` shows
it); the residual stream has laws of its own (a rescale per stream unit), which
``flowsim.laws.detect`` builds.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .checks import MAX_DEPTH, flag, number
from .mlp import activation_layer


class ResidualBlock(nn.Module):
    """act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x)), convolutions 3×3.

    The shortcut is the identity, or a 1×1 convolution [+ BatchNorm] where the block changes
    the number of channels or the resolution (`stride` 2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        batch_norm: bool = False,
        activation: str = "relu",
        bias: bool = True,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return nn.BatchNorm2d(out_channels, eps=bn_eps) if batch_norm else nn.Identity()

        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = norm()
        self.act1 = activation_layer(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.bn2 = norm()
        self.act2 = activation_layer(activation)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias), norm())
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResidualMLPBlock(nn.Module):
    """x + fc2(act(fc1(x))): a two-layer MLP added to its input."""

    def __init__(self, width: int, hidden: int, activation: str = "relu", bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.act = activation_layer(activation)
        self.fc2 = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


def resnet(
    width: int = 4,
    stages: int = 2,
    blocks_per_stage: int = 1,
    batch_norm: bool = False,
    activation: str = "relu",
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
    bias: bool = True,
    bn_eps: float = 1e-5,
) -> nn.Sequential:
    """stem (conv3×3 → [BatchNorm] → act) → stages of residual blocks → global average pool →
    flatten → linear. Stage s has width·2^s channels; its first block (s > 0) halves the
    resolution and has a 1×1 shortcut.

    Layer names: ``stem.{conv,bn,act}``, ``stage{s}.block{b}.{conv1,bn1,conv2,bn2,shortcut}``,
    ``pool``, ``flatten``, ``fc``. `image_size` is checked only to be at least 1; any size works.
    """
    width = number("width", width, integer=True, minimum=1)
    stages = number("stages", stages, integer=True, minimum=1)
    blocks_per_stage = number("blocks_per_stage", blocks_per_stage, integer=True, minimum=1)
    in_channels = number("in_channels", in_channels, integer=True, minimum=1)
    number("image_size", image_size, integer=True, minimum=1)
    num_classes = number("num_classes", num_classes, integer=True, minimum=1)
    bn_eps = number("bn_eps", bn_eps, minimum=0.0)
    flag("batch_norm", batch_norm)
    stem = [("conv", nn.Conv2d(in_channels, width, 3, padding=1, bias=bias))]
    if batch_norm:
        stem.append(("bn", nn.BatchNorm2d(width, eps=bn_eps)))
    stem.append(("act", activation_layer(activation)))
    layers: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(OrderedDict(stem)))]
    channels = width
    for s in range(stages):
        out = width * 2**s
        blocks = [
            (f"block{b}", ResidualBlock(channels if b == 0 else out, out, 2 if s > 0 and b == 0 else 1, batch_norm, activation, bias, bn_eps))
            for b in range(blocks_per_stage)
        ]
        layers.append((f"stage{s}", nn.Sequential(OrderedDict(blocks))))
        channels = out
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(channels, num_classes))]
    return nn.Sequential(OrderedDict(layers))


def residual_mlp(
    in_features: int = 64,
    out_features: int = 10,
    depth: int = 2,
    width: int = 16,
    hidden: int = 16,
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """flatten → inp → `depth` × (x + fc2(act(fc1(x)))) → act → out.

    Layer names: ``inp``, ``block{i}.fc1``, ``block{i}.fc2``, ``act``, ``out``.
    """
    in_features = number("in_features", in_features, integer=True, minimum=1)
    out_features = number("out_features", out_features, integer=True, minimum=1)
    depth = number("depth", depth, integer=True, minimum=0, maximum=MAX_DEPTH)
    width = number("width", width, integer=True, minimum=1)
    hidden = number("hidden", hidden, integer=True, minimum=1)
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten()), ("inp", nn.Linear(in_features, width, bias=bias))]
    layers += [(f"block{i}", ResidualMLPBlock(width, hidden, activation, bias)) for i in range(1, depth + 1)]
    layers += [("act", activation_layer(activation)), ("out", nn.Linear(width, out_features, bias=bias))]
    return nn.Sequential(OrderedDict(layers))


__all__ = ["ResidualBlock", "ResidualMLPBlock", "resnet", "residual_mlp"]
