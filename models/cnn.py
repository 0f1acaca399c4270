"""VGG-style convolutional networks."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .checks import MAX_DEPTH, flag, number
from .mlp import activation_layer


def vgg(
    depth: int = 2,
    width: int = 8,
    batch_norm: bool = False,
    activation: str = "relu",
    pool_every: int = 2,
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
    bias: bool = True,
    bn_eps: float = 1e-5,
) -> nn.Sequential:
    """``features`` (conv3×3 → [BatchNorm] → activation, a 2×2 max-pool after every `pool_every`
    blocks while the image is at least 2 pixels wide) then ``classifier`` (flatten → linear).

    Layer names: ``features.conv{i}``, ``features.bn{i}``, ``features.act{i}``,
    ``features.pool{i}``, ``classifier.fc``. `bn_eps` is BatchNorm's eps: any eps > 0 breaks
    the scale symmetry at relative order eps/Var (exactness tests use 1e-12 in float64).
    `activation` is relu, leaky_relu, identity or tanh (see ``mlp``); `pool_every=0` never pools.
    """
    depth = number("depth", depth, integer=True, minimum=1, maximum=MAX_DEPTH)
    width = number("width", width, integer=True, minimum=1)
    pool_every = number("pool_every", pool_every, integer=True, minimum=0)
    in_channels = number("in_channels", in_channels, integer=True, minimum=1)
    image_size = number("image_size", image_size, integer=True, minimum=1)
    num_classes = number("num_classes", num_classes, integer=True, minimum=1)
    bn_eps = number("bn_eps", bn_eps, minimum=0.0)
    flag("batch_norm", batch_norm)
    blocks: list[tuple[str, nn.Module]] = []
    channels, size = in_channels, image_size
    for i in range(1, depth + 1):
        blocks.append((f"conv{i}", nn.Conv2d(channels, width, 3, padding=1, bias=bias)))
        if batch_norm:
            blocks.append((f"bn{i}", nn.BatchNorm2d(width, eps=bn_eps)))
        blocks.append((f"act{i}", activation_layer(activation)))
        if pool_every and i % pool_every == 0 and size >= 2:
            blocks.append((f"pool{i}", nn.MaxPool2d(2)))
            size //= 2
        channels = width
    classifier = OrderedDict([("flatten", nn.Flatten()), ("fc", nn.Linear(channels * size * size, num_classes))])
    return nn.Sequential(
        OrderedDict([("features", nn.Sequential(OrderedDict(blocks))), ("classifier", nn.Sequential(classifier))])
    )
