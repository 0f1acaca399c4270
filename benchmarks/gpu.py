"""On a GPU: one gradient evaluation inside GradientFlow against plain PyTorch, for a ResNet and
a transformer block of sizes that fill the GPU.

    python benchmarks/gpu.py [--repeats 50] [--dtype float32]

Prints medians of "plain loss.backward()" (zero_grad, forward, cross-entropy, backward on the
nn.Module) and "flowsim GradientFlow evaluation" (−∇L(θ) from a flat θ, what an ODE solver
calls), each followed by torch.cuda.synchronize(), and their ratio (target: at most 1.10×).
Exits with a message, doing nothing, when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import flowsim as fs
from common import alternate, plain_backward, report


class Block(nn.Module):
    """A ResNet basic block: x + BN(conv(ReLU(BN(conv x))))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet(width: int = 128, blocks: int = 8, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[Block(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


class Transformer(nn.Module):
    """Pre-norm transformer blocks on embedded sequences (N, length, width), mean-pooled into a
    classifier (inputs are float embeddings: a Problem's X is floating point)."""

    def __init__(self, width: int = 512, heads: int = 8, layers: int = 4, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.blocks(tokens).mean(1))


def cases(device: torch.device, dtype: torch.dtype, scale: int = 1):
    """The two problems; `scale` > 1 divides their sizes (a quick check of the script on a CPU)."""
    generator = torch.Generator().manual_seed(0)
    n, width, length = 256 // scale, 512 // scale, 256 // scale
    images = torch.randn(n, 3, 32, 32, generator=generator)
    sequences = torch.randn(n // 2, length, width, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    torch.manual_seed(0)
    yield (
        f"ResNet (8 blocks, width {128 // scale}), {n} images 32×32",
        resnet(width=128 // scale).to(device, dtype),
        images.to(device, dtype),
        labels.to(device),
    )
    yield (
        f"Transformer (4 blocks, width {width}), {n // 2} sequences of {length}",
        Transformer(width=width).to(device, dtype),
        sequences.to(device, dtype),
        labels[: n // 2].to(device),
    )


def main(repeats: int, dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}")
    for label, model, X, y in cases(device, dtype):
        problem = fs.Problem(model, (X, y))
        flow, theta = fs.GradientFlow(), problem.initial_theta()
        t = torch.zeros((), dtype=torch.float64, device=device)

        backward = plain_backward(model, X, y)

        def plain():
            backward()
            torch.cuda.synchronize()

        def flowsim_eval():
            flow.derivative(problem, t, theta)
            torch.cuda.synchronize()

        print(f"{label}, {problem.n_params:,} parameters:")
        report(alternate({"plain loss.backward()": plain, "flowsim GradientFlow evaluation": flowsim_eval}, repeats), "plain loss.backward()")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (run this on a machine with a GPU)")
        sys.exit(0)
    main(args.repeats, getattr(torch, args.dtype))
