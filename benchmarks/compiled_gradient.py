"""One evaluation of the compiled gradient that ``RK(compile=True)`` calls, against the other ways to get it.

    python benchmarks/compiled_gradient.py [--repeats 20] [--calls 50]

θ ↦ (∇L(θ), L(θ)) for the MLP of ``benchmarks/peer_diffrax.py`` (64-128-128-10, float64, N = 512),
with torch's threads (2 on the CI machine):
- "eager": ``Problem.loss_and_grad``, a forward pass and ``loss.backward()`` on the flat-buffer network;
- "torch.compile (Dynamo)": ``torch.compile(torch.func.grad_and_value(loss), fullgraph=True,
  dynamic=False)``, what ``compile=True`` ran before session 5;
- "make_fx + Inductor, no split": ``CompiledGradient`` with every product left to the BLAS;
- "CompiledGradient": what ``compile=True`` runs (``split_contraction`` on the CPU).
Each round calls each candidate `calls` times, the candidates in a seeded random order; medians
per call (IQR) and the ratio to "CompiledGradient" (median over rounds of the ratio within a round).
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

from common import alternate, machine, report
from flowsim.problem import CompiledGradient, _batch_loss
from peer_diffrax import torch_problem


def main(repeats: int, calls: int) -> None:
    print(f"machine: {machine()}")
    problem = torch_problem("mlp")
    theta = problem.initial_theta()

    def loss(theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _batch_loss(problem.loss_kind, problem._forward(theta, X), y)

    dynamo = torch.compile(torch.func.grad_and_value(loss), fullgraph=True, dynamic=False)
    no_split, split = CompiledGradient(loss), CompiledGradient(loss)
    X, y = problem.X, problem.y
    with mock.patch("flowsim.problem.split_contraction", lambda a, b: NotImplemented):
        no_split(theta, X, y)  # traced and compiled here, without the split
    gradients = {
        "eager": lambda: problem.loss_and_grad(theta),
        "torch.compile (Dynamo)": lambda: dynamo(theta, problem.X, problem.y),
        "make_fx + Inductor, no split": lambda: no_split(theta, X, y),
        "CompiledGradient": lambda: split(theta, X, y),
    }
    reference = problem.loss_and_grad(theta)[1]
    for name, gradient in gradients.items():  # the first calls compile; each gradient is checked
        grad = gradient()[1] if name == "eager" else gradient()[0]
        print(f"  {name:<30} gradient {float((grad - reference).abs().max() / reference.abs().max()):.1e} relative from eager")

    def repeated(gradient):
        def run() -> None:
            for _ in range(calls):
                gradient()

        return run

    times = alternate({name: repeated(gradient) for name, gradient in gradients.items()}, repeats)
    print(f"one evaluation ({calls} calls a round, {repeats} rounds):")
    report(times, "CompiledGradient", unit=1e3 / calls, label="ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    main(args.repeats, args.calls)
