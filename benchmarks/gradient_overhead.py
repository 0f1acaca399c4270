"""One gradient evaluation inside GradientFlow against plain PyTorch.

    python benchmarks/gradient_overhead.py [--repeats 200]

For the MLP and the CNN on all digits (CPU, float32 and float64), times in one run, interleaved:
- "plain loss.backward()": zero_grad, forward, cross-entropy, backward on the nn.Module;
- "flowsim GradientFlow evaluation": the vector field −∇L(θ) an ODE solver calls, from a flat θ;
- "naive torchdiffeq wrapper": vector_to_parameters(θ), backward, parameters_to_vector(grads).
Prints medians and the ratio to the plain backward (target: flowsim ≤ 1.10×).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import flowsim as fs
from common import alternate, digits_model, machine, plain_backward, report


def main(repeats: int) -> None:
    print(f"machine: {machine()}")
    for dtype in (torch.float32, torch.float64):
        for kind in ("mlp", "cnn"):
            model, X, y = digits_model(kind, dtype)
            problem = fs.Problem(model, (X, y))
            flow = fs.GradientFlow()
            theta = problem.initial_theta()
            t = torch.zeros((), dtype=torch.float64)
            params = list(model.parameters())

            plain = plain_backward(model, X, y)

            def flowsim_eval():
                flow.derivative(problem, t, theta)

            def naive():
                vector_to_parameters(theta, params)
                model.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(X), y).backward()
                return -parameters_to_vector([p.grad for p in params])

            print(f"{kind}, {str(dtype).removeprefix('torch.')}, {problem.n_params} parameters, N={len(y)}:")
            report(
                alternate(
                    {
                        "plain loss.backward()": plain,
                        "flowsim GradientFlow evaluation": flowsim_eval,
                        "naive torchdiffeq wrapper": naive,
                    },
                    repeats,
                ),
                baseline="plain loss.backward()",
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    main(parser.parse_args().repeats)
