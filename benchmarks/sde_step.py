"""One step of the SGD-noise SDE against one plain PyTorch full-batch backward.

    python benchmarks/sde_step.py [--repeats 40]

For the MLP and the CNN on all digits (CPU, float32 and float64), one path, exact noise and
the gradient drift, times in one run, interleaved:
- "plain loss.backward()": zero_grad, forward, cross-entropy, backward on the nn.Module;
- "FusedEulerMaruyama step": one step of the integrator (increments drawn, drift and noise in
  one backward pass of the re-weighted loss);
- "torchsde Euler step (f, g_prod)": one step of integrators.SDE("euler"), drift and G·ΔW
  evaluated separately (two backward passes).
Prints medians and the ratio to the plain backward (targets: fused ≤ 1.2×, torchsde ≤ 2.5×).
"""

from __future__ import annotations

import argparse

import torch

import flowsim as fs
from common import alternate, digits_model, machine, plain_backward, report
from flowsim.integrators import SDE, FusedEulerMaruyama, SaveGrid


def stepper(integrator, dynamics, problem):
    """A function that advances `integrator` by one step of its (long) grid each call."""
    dt = integrator.dt
    grid = SaveGrid(tuple(k * dt for k in range(100_000)))
    points = integrator.solve(dynamics.term(problem, problem.initial_theta()), grid, seed=0)
    next(points)  # the initial point
    return lambda: next(points)


def main(repeats: int) -> None:
    print(f"machine: {machine()}")
    for dtype in (torch.float32, torch.float64):
        for kind in ("mlp", "cnn"):
            model, X, y = digits_model(kind, dtype)
            problem = fs.Problem(model, (X, y))
            dynamics = fs.SGDNoise(lr=0.1, batch_size=32)

            plain = plain_backward(model, X, y)

            print(f"{kind}, {str(dtype).removeprefix('torch.')}, {problem.n_params} parameters, N={len(y)}:")
            report(
                alternate(
                    {
                        "plain loss.backward()": plain,
                        "FusedEulerMaruyama step": stepper(FusedEulerMaruyama(dt=0.01), dynamics, problem),
                        "torchsde Euler step (f, g_prod)": stepper(SDE("euler", dt=0.01), dynamics, problem),
                    },
                    repeats,
                ),
                baseline="plain loss.backward()",
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    main(parser.parse_args().repeats)
