"""On a GPU: a gradient evaluation and a whole dopri5 solve of the gradient flow, flowsim
against plain PyTorch, for a ResNet, a transformer and a small MLP.

    python benchmarks/gpu.py [--repeats 50] [--solves 5] [--dtype float32] [--evaluations 150]

1. One evaluation: medians of "plain loss.backward()" (zero_grad, forward, cross-entropy,
   backward on the nn.Module) and "flowsim GradientFlow evaluation" (−∇L(θ) from a flat θ, what
   an ODE solver calls), each followed by torch.cuda.synchronize(), and their ratio (target: at
   most 1.10×).
2. A whole solve: θ' = −∇L(θ) by dopri5 at rtol = atol = 1e-5 (float32; 1e-7 in float64) from
   t = 0 to a t1 chosen so that the solve takes about `evaluations` gradients. Candidates:
   torchdiffeq.odeint over GradientFlow's vector field (the plain way), ``RK("dopri5")`` (its
   decisions on the host: one synchronisation a step), ``RK(sync_every=16)`` (on the device,
   read back once per chunk) and ``RK(sync_every=16, cuda_graph=True)`` (one graph replay an
   attempt). Medians of `solves` alternating whole solves, ratios to torchdiffeq, evaluations.
Exits with a message, doing nothing, when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

import torchdiffeq

import flowsim as fs
from common import alternate, plain_backward, report
from flowsim import models
from flowsim.integrators import RK, SaveGrid
from flowsim.integrators.rk import _AdaptiveLoop, vector_field


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
    yield (
        "MLP 64-128-128-10 (benchmarks/peer_diffrax.py's), 512 inputs",
        models.mlp.mlp(depth=2, width=128).to(device, dtype),
        torch.randn(512, 64, generator=generator).to(device, dtype),
        torch.randint(0, 10, (512,), generator=generator).to(device),
    )


def horizon(problem: fs.Problem, tol: float, evaluations: int) -> float:
    """The t1 at which RK("dopri5") has made about `evaluations` evaluations (stepping in t by
    0.01, doubling)."""
    loop = _AdaptiveLoop(RK("dopri5", rtol=tol, atol=tol), vector_field(fs.GradientFlow().term(problem, problem.initial_theta())), problem.initial_theta(), SaveGrid((0.0,)))
    t, dt = 0.0, 0.01
    while loop.state.nfe < evaluations:
        t, dt = t + dt, 2 * dt
        loop.advance(t)
    return t


def solves(problem: fs.Problem, tol: float, evaluations: int, repeats: int) -> None:
    """Whole dopri5 solves by torchdiffeq and by RK's three loops; prints medians and ratios."""
    flow, theta0, device = fs.GradientFlow(), problem.initial_theta(), problem.device
    try:
        t1 = horizon(problem, tol, evaluations)
    except fs.errors.IntegrationError as exc:
        print(f"  whole solve skipped: the flow diverged ({exc})")
        return
    grid, counted = SaveGrid((0.0, t1)), {}

    def plain() -> None:
        calls = [0]

        def f(t, y):
            calls[0] += 1
            return flow.derivative(problem, t, y)

        torchdiffeq.odeint(f, theta0, torch.tensor([0.0, t1], dtype=torch.float64, device=device), rtol=tol, atol=tol)
        torch.cuda.synchronize()
        counted["torchdiffeq.odeint"] = calls[0]

    def rk_run(name: str, **options) -> Callable[[], None]:
        integrator = RK("dopri5", rtol=tol, atol=tol, **options)

        def run() -> None:
            *_, last = integrator.solve(flow.term(problem, theta0), grid, 0)
            torch.cuda.synchronize()
            counted[name] = last.nfe

        return run

    candidates = {
        "torchdiffeq.odeint": plain,
        "RK (host decides)": rk_run("RK (host decides)"),
        "RK sync_every=16": rk_run("RK sync_every=16", sync_every=16),
        "RK sync_every=16, cuda_graph": rk_run("RK sync_every=16, cuda_graph", sync_every=16, cuda_graph=True),
    }
    times = alternate(candidates, repeats, warmup=1)
    print(f"  whole solve to t1={t1:g} at rtol=atol={tol:g}:")
    report(times, "torchdiffeq.odeint")
    for name, ts in times.items():
        print(f"    {name:<32} {counted[name]:4d} evaluations, {statistics.median(ts) / counted[name] * 1e3:8.3f} ms each")


def main(repeats: int, solve_repeats: int, evaluations: int, dtype: torch.dtype) -> None:
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
        solves(problem, 1e-5 if dtype == torch.float32 else 1e-7, evaluations, solve_repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--solves", type=int, default=5, help="whole solves per candidate")
    parser.add_argument("--evaluations", type=int, default=150, help="about how many gradients a solve takes")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (run this on a machine with a GPU)")
        sys.exit(0)
    main(args.repeats, args.solves, args.evaluations, getattr(torch, args.dtype))
