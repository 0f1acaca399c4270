"""ModifiedFlow's Hessian-vector product: double backward against forward-over-reverse.

    python benchmarks/hessian_vector.py [--repeats 30]

For the MLP and the CNN on all digits (CPU, float32), times in one run, interleaved, the
gradient ĝ together with H ĝ (what one ModifiedFlow evaluation needs):
- "gradient only": ``Problem.loss_and_grad`` (the baseline, one GradientFlow evaluation);
- "double backward": ``Problem.loss_grad_hvp`` (forward, backward with graph, backward of ĝ·v);
- "forward-over-reverse": ĝ from ``loss_and_grad``, then ``torch.func.jvp`` of ``torch.func.grad``
  along ĝ (it needs ĝ before it can start, so one more pass).
Prints medians and the ratio to a gradient.
"""

from __future__ import annotations

import argparse

import torch
from torch.func import grad, jvp

import flowsim as fs
from common import alternate, digits_model, machine, report


def main(repeats: int) -> None:
    print(f"machine: {machine()}")
    for kind in ("mlp", "cnn"):
        model, X, y = digits_model(kind, torch.float32)
        problem = fs.Problem(model, (X, y))
        theta = problem.initial_theta()
        loss = lambda th: problem.per_example_losses(th).mean()

        def forward_over_reverse():
            _, g = problem.loss_and_grad(theta)
            return jvp(grad(loss), (theta,), (g,))[1]

        _, g, hv = problem.loss_grad_hvp(theta)
        error = float((forward_over_reverse() - hv).norm() / hv.norm())
        print(f"{kind}, float32, {problem.n_params} parameters, N={len(y)} (the two H·ĝ agree to {error:.1e}):")
        report(
            alternate(
                {
                    "gradient only": lambda: problem.loss_and_grad(theta),
                    "double backward": lambda: problem.loss_grad_hvp(theta),
                    "forward-over-reverse": forward_over_reverse,
                },
                repeats,
            ),
            baseline="gradient only",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    main(parser.parse_args().repeats)
