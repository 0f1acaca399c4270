"""ensemble=16 of a small MLP against 16 runs one by one.

    python benchmarks/ensemble.py [--members 16] [--repeats 3] [--threads 2] [--case flow256] [--vmap]

Whole ``simulate`` calls, float64, a 64-16-16-10 MLP on N digits, recording every law at
every save point, for DiscreteSGD (N = 256, lr 0.05, batch 32, momentum 0.9, 200 steps, saved
every 10) and GradientFlow (rk4, step 0.05 to t = 4, saved every 0.5, on N = 256 and N = 64):
- "16 runs one by one": ``simulate`` once per member, each from its own θ0;
- "ensemble=16": one ``simulate(..., ensemble=16)`` (the MLP's layers batched by hand,
  ``flowsim.ensemble.StackedLayers``);
- with ``--vmap`` also "ensemble=16, vmap": the same with torch.func.vmap over the (16, P) θ,
  the path every other network takes.
Both start from the same 16 initial points (``flowsim.ensemble.initial_members``). Prints
medians and the speed-up (target: at least 4× on 2 CPU cores).
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

import flowsim as fs
from common import alternate, machine, report
from flowsim import data, models
from flowsim.ensemble import StackedLayers, initial_members
from flowsim.integrators import ODE

#: name → (label, N examples, dynamics, integrator, t1, save_every)
CASES = {
    "sgd": ("DiscreteSGD, 200 steps", 256, fs.DiscreteSGD(lr=0.05, batch_size=32, momentum=0.9), None, 10.0, 0.5),
    "flow256": ("GradientFlow, rk4, 80 steps", 256, fs.GradientFlow(), ODE("rk4", step_size=0.05), 4.0, 0.5),
    "flow64": ("GradientFlow, rk4, 80 steps, small data", 64, fs.GradientFlow(), ODE("rk4", step_size=0.05), 4.0, 0.5),
}


def main(members: int, repeats: int, cases: list[str], with_vmap: bool) -> None:
    print(f"machine: {machine()}")
    for case in cases:
        label, n, dynamics, integrator, t1, save_every = CASES[case]
        X, y = data.digits(n_train=n)
        torch.manual_seed(0)
        problem = fs.Problem(models.mlp.mlp(depth=2, width=16).double(), (X.double(), y))
        theta0 = initial_members(problem, members, seed=0)
        alone = []
        for theta in theta0:
            one = problem.to()
            one.load_into_model(theta)
            alone.append(one)
        run = dict(t1=t1, save_every=save_every, progress=False)

        def one_by_one():
            for one in alone:
                fs.simulate(one, dynamics, integrator, **run)

        def ensemble():
            fs.simulate(problem, dynamics, integrator, ensemble=theta0, **run)

        def ensemble_vmap():
            with mock.patch.object(StackedLayers, "of", return_value=None):
                ensemble()

        candidates = {f"{members} runs one by one": one_by_one, f"ensemble={members}": ensemble}
        if with_vmap:
            candidates[f"ensemble={members}, vmap"] = ensemble_vmap
        print(f"{label}, {members} members, {problem.n_params} parameters, N={problem.n_examples}:")
        times = alternate(candidates, repeats, warmup=1)
        report(times, baseline=f"{members} runs one by one", unit=1.0, label="s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    parser.add_argument("--case", action="append", choices=list(CASES), help="the cases to run (repeatable; default all)")
    parser.add_argument("--vmap", action="store_true", help="time the torch.func.vmap path too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(args.members, args.repeats, args.case or list(CASES), args.vmap)
