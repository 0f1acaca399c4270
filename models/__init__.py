"""The model zoo: plain PyTorch factories, each building an ``nn.Module`` from plain arguments.

A bad argument is a ValueError (out of range) or TypeError (wrong kind) whose message starts
with the argument's name: ``depth: got 0; expected an integer >= 1`` (:mod:`.checks`). The
registry that configs name factories by (``"cnn.vgg"``) is ``flowsim.zoo``.
"""

from . import attention, cnn, mlp, resnet

__all__ = ["attention", "cnn", "mlp", "resnet"]
