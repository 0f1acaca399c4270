"""A long solve's first call, compilation included: flowsim with compile decided by the library
against diffrax's jit.

    python benchmarks/first_call.py [--t1 50] [--tol 1e-7] [--threads 2]

The problem of peer_diffrax.py (the MLP 64-128-128-10, float64, N=512 random inputs), gradient
flow by dopri5 at rtol = atol = tol to t1 (t1 = 50 at 1e-7: ~17,000 evaluations, about a minute
eager on 2 cores). Each candidate runs in a fresh Python process, so nothing is cached in memory:

- "flowsim, compile decided": ``fs.simulate(problem, GradientFlow(), RK("dopri5", rtol, atol),
  t1=t1, save_every=t1, laws=[])``, RK's default ``compile="auto"``, timed from the call to its
  return (the decision, tracing and TorchInductor included), with TorchInductor's on-disk cache
  in a new empty folder (a cold first call: nothing compiled before on this machine);
- "flowsim, eager": the same with ``compile=False``;
- "diffrax": its first call (``jax.jit`` compilation and the solve), then a second call in the
  same process (the solve alone).

Prints each time, the decision RK recorded, and flowsim's first call over diffrax's first call
and over diffrax's solve alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import machine


def flowsim_first_call(t1: float, tol: float, compile: str) -> dict:
    import flowsim as fs
    from flowsim.integrators import RK
    from peer_diffrax import torch_problem

    problem = torch_problem("mlp")
    start = time.perf_counter()
    ds = fs.simulate(
        problem, fs.GradientFlow(), RK("dopri5", rtol=tol, atol=tol, compile={"auto": "auto", "False": False}[compile]),
        t1=t1, save_every=t1, laws=[], observe=(), progress=False,
    )
    seconds = time.perf_counter() - start
    decided = json.loads(ds.attrs["integrator"])
    return {"seconds": seconds, "nfe": int(ds.nfe[-1]), "compiled": decided["compiled"], "reason": decided["compile_reason"]}


def diffrax_calls(t1: float, tol: float) -> dict:
    from peer_diffrax import diffrax_solver, torch_problem

    problem = torch_problem("mlp")
    start = time.perf_counter()
    run, _ = diffrax_solver("mlp", problem, t1, tol)  # jit and the first solve
    first = time.perf_counter() - start
    start = time.perf_counter()
    _, nfe = run()
    return {"seconds": first, "solve": time.perf_counter() - start, "nfe": nfe}


def in_fresh_process(candidate: str, t1: float, tol: float, threads: int | None, env: dict | None = None) -> dict:
    args = [sys.executable, __file__, "--child", candidate, "--t1", str(t1), "--tol", str(tol)]
    if threads is not None:
        args += ["--threads", str(threads)]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(t1: float, tol: float, threads: int | None) -> None:
    print(f"machine: {machine()}; MLP, dopri5 at {tol:g} to t1 = {t1:g}, each candidate in a fresh process")
    with tempfile.TemporaryDirectory() as cache:
        decided = in_fresh_process("flowsim-auto", t1, tol, threads, {"TORCHINDUCTOR_CACHE_DIR": cache})
    eager = in_fresh_process("flowsim-eager", t1, tol, threads)
    jax = in_fresh_process("diffrax", t1, tol, threads)
    print(f"  flowsim, compile decided (first call, cold cache): {decided['seconds']:7.2f} s, {decided['nfe']} evaluations; compiled={decided['compiled']} ({decided['reason']})")
    print(f"  flowsim, eager (first call):                       {eager['seconds']:7.2f} s, {eager['nfe']} evaluations")
    print(f"  diffrax, first call (jit + solve):                 {jax['seconds']:7.2f} s; its solve alone {jax['solve']:.2f} s, {jax['nfe']} evaluations")
    print(f"  flowsim's first call: {decided['seconds'] / jax['seconds']:.2f}× diffrax's first call, {decided['seconds'] / jax['solve']:.2f}× diffrax's solve alone")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t1", type=float, default=50.0)
    parser.add_argument("--tol", type=float, default=1e-7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--child", choices=["flowsim-auto", "flowsim-eager", "diffrax"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child is None:
        main(args.t1, args.tol, args.threads)
    else:
        if args.child == "diffrax":
            result = diffrax_calls(args.t1, args.tol)
        else:
            result = flowsim_first_call(args.t1, args.tol, "auto" if args.child == "flowsim-auto" else "False")
        print(json.dumps(result))
