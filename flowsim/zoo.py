"""The zoo's registry for configs: a config names a factory of ``flowsim.models`` as
``"<module>.<factory>"``, e.g. ``"cnn.vgg"``; the arguments that describe the data (input size,
number of outputs) are filled in from the data set when a config omits them (see
:data:`DATA_ARGUMENTS`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from . import models
from .errors import ConfigError

#: module -> the factories it offers to configs
ZOO: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp",),
    "cnn": ("vgg",),
    "resnet": ("resnet", "residual_mlp"),
    "attention": ("layer", "block", "transformer"),
}

#: factory argument -> how it is read off the data: "features" (product of the input shape),
#: "channels" (input shape[0]), "size" (input shape[-1]), "outputs" (classes or target size);
#: for token sequences (N, length, vocab) shape[0] is the length and shape[-1] the vocabulary
DATA_ARGUMENTS = {
    "in_features": "features",
    "in_channels": "channels",
    "image_size": "size",
    "out_features": "outputs",
    "num_classes": "outputs",
    "length": "channels",
    "vocab": "size",
    "d_model": "size",
}


def factory(name: str) -> Callable[..., nn.Module]:
    """The zoo factory called `name` (``"module.factory"``); ConfigError naming model.name if
    there is none."""
    valid = [f"{m}.{f}" for m, fs in ZOO.items() for f in fs]
    module_name, _, function = str(name).partition(".")
    if module_name not in ZOO or function not in ZOO[module_name]:
        raise ConfigError(f"model.name: got {name!r}; expected one of {', '.join(valid)}")
    return getattr(getattr(models, module_name), function)


def parameters_of(fn: Callable[..., nn.Module]) -> dict[str, inspect.Parameter]:
    """The keyword arguments a factory accepts."""
    return dict(inspect.signature(fn).parameters)


__all__ = ["ZOO", "DATA_ARGUMENTS", "factory", "parameters_of"]
