"""DiscreteSGD recording every law at every step against a plain torch.optim.SGD loop.

    python benchmarks/sgd_recording.py [--steps 300] [--repeats 5]

The MLP and the CNN on all digits (CPU, float32), batch 64, momentum 0.9, weight decay 5e-4.
"plain torch.optim.SGD": a loop over seeded per-epoch permutations that records nothing.
"flowsim DiscreteSGD": simulate(..., save_every=lr, observe=()) — every law's value and
grad_sq (and velocity_sq) at every step, in memory; and the same run recording no law, to
show what the recording itself costs. Whole runs, interleaved; target ≤ 1.15×.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import flowsim as fs
from common import alternate, digits_model, machine, report

LR, BATCH = 0.05, 64


def main(steps: int, repeats: int) -> None:
    print(f"machine: {machine()}")
    dtype = torch.float32
    for kind in ("mlp", "cnn"):
        model, X, y = digits_model(kind, dtype)
        problem = fs.Problem(model, (X, y), weight_decay=5e-4)
        dynamics = fs.DiscreteSGD(lr=LR, batch_size=BATCH, momentum=0.9)

        def plain():
            net = digits_model(kind, dtype)[0]
            opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
            generator = torch.Generator().manual_seed(0)
            order = torch.randperm(len(y), generator=generator)
            per_epoch = -(-len(y) // BATCH)
            for k in range(steps):
                j = k % per_epoch
                if j == 0 and k:
                    order = torch.randperm(len(y), generator=generator)
                index = order[j * BATCH : (j + 1) * BATCH]
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(net(X[index]), y[index]).backward()
                opt.step()

        def flowsim_run(laws="auto"):
            ds = fs.simulate(problem, dynamics, t1=steps * LR, save_every=LR, observe=(), laws=laws, dtype=dtype, progress=False)
            assert ds.sizes["time"] == steps + 1

        print(
            f"{kind}, float32, {problem.n_params} parameters, {len(fs.laws.detect(model))} laws, {steps} steps of batch {BATCH}:"
        )
        report(
            alternate(
                {
                    "plain torch.optim.SGD": plain,
                    "flowsim DiscreteSGD (all laws, every step)": flowsim_run,
                    "flowsim DiscreteSGD (no laws)": lambda: flowsim_run(laws=()),
                },
                repeats,
                warmup=1,
            ),
            baseline="plain torch.optim.SGD",
            unit=1.0,
            label="s",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.steps, args.repeats)
