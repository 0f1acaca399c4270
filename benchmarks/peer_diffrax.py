"""flowsim against diffrax (JAX) and plain torchdiffeq: one gradient flow, solved by dopri5.

    python benchmarks/peer_diffrax.py [--repeats 5] [--models mlp cnn] [--t1 10] [--tol 1e-7]

The problems (float64, cross-entropy, N=512 random N(0, 1) inputs with random labels, seed 0):
- mlp: 64-128-128-10 with ReLU (26,122 parameters);
- cnn: conv3×3(1→8) ReLU conv3×3(8→8) ReLU max-pool 2 → linear(128→10) on 8×8 images
  (``models.cnn.vgg(depth=2, width=8)``, 1,954 parameters).
Gradient flow θ' = −∇L(θ) from the model's initial parameters to t = t1 by dopri5 at
rtol = atol = tol, the same θ0 and data in every candidate:
- "flowsim RK": ``integrators.RK("dopri5")`` (the fused loop), and with ``compile=True``;
- "torchdiffeq": ``torchdiffeq.odeint`` over the flat-buffer autograd vector field
  (``GradientFlow.derivative``, what ``integrators.ODE`` runs);
- "diffrax": ``diffeqsolve(ODETerm(−∇L), Dopri5(), PIDController(rtol, atol))`` under
  ``jax.jit`` with float64 enabled; its compile time is reported apart.
Whole solves, alternating candidates, `repeats` times each after a warm-up; medians and the
spread (min–max). "bare gradient" times the vector field alone (the same call the solver
makes, 50 evaluations in a row), so solver bookkeeping per evaluation = time per evaluation of
the solve − time of one bare evaluation. diffrax's evaluations: 6 per step + 2 (FSAL dopri5
with the initial step selection). diffrax is optional (``pip install -e ".[bench]"``): without
jax and diffrax its rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torchdiffeq

import flowsim as fs
from common import alternate, machine
from flowsim import models
from flowsim.integrators import RK, SaveGrid
from flowsim.integrators.rk import vector_field

N = 512


def torch_problem(kind: str) -> fs.Problem:
    rng = np.random.default_rng(0)
    shape = (N, 64) if kind == "mlp" else (N, 1, 8, 8)
    X = torch.tensor(rng.standard_normal(shape))
    y = torch.tensor(rng.integers(0, 10, N))
    torch.manual_seed(0)
    model = models.mlp.mlp(depth=2, width=128) if kind == "mlp" else models.cnn.vgg(depth=2, width=8)
    return fs.Problem(model.double(), (X, y))


def diffrax_solver(kind: str, problem: fs.Problem, t1: float, tol: float) -> tuple[Callable[[], tuple[np.ndarray, int]], float]:
    """A jitted diffrax solve of the same flow from the same θ0; returns it with its compile time."""
    import diffrax
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    params = {n: jnp.asarray(p.detach().numpy()) for n, p in problem.unflatten(problem.initial_theta()).items()}
    X, y = jnp.asarray(problem.X.numpy()), jnp.asarray(problem.y.numpy())

    def logits(p):
        if kind == "mlp":
            h = X
            for layer in ("fc1", "fc2"):
                h = jax.nn.relu(h @ p[f"{layer}.weight"].T + p[f"{layer}.bias"])
            return h @ p["out.weight"].T + p["out.bias"]
        h = X
        for i in (1, 2):
            h = jax.lax.conv_general_dilated(h, p[f"features.conv{i}.weight"], (1, 1), ((1, 1), (1, 1)))
            h = jax.nn.relu(h + p[f"features.conv{i}.bias"][None, :, None, None])
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        return h.reshape(N, -1) @ p["classifier.fc.weight"].T + p["classifier.fc.bias"]

    def loss(p):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits(p)), y[:, None], axis=1))

    grad = jax.grad(loss)
    check = float(loss(params)), float(problem.loss(problem.initial_theta()))
    assert abs(check[0] - check[1]) < 1e-12 * abs(check[1]), f"the JAX network differs from the torch one: {check}"

    @jax.jit
    def solve(p):
        term = diffrax.ODETerm(lambda t, q, args: jax.tree_util.tree_map(jnp.negative, grad(q)))
        controller = diffrax.PIDController(rtol=tol, atol=tol)
        sol = diffrax.diffeqsolve(term, diffrax.Dopri5(), 0.0, t1, None, p, stepsize_controller=controller, max_steps=None)
        return sol.ys, sol.stats["num_steps"]

    def run() -> tuple[np.ndarray, int]:
        ys, steps = solve(params)
        ys = jax.block_until_ready(ys)
        return np.concatenate([np.asarray(ys[n]).reshape(-1) for n in problem.names]), 6 * int(steps) + 2

    start = time.perf_counter()
    run()
    return run, time.perf_counter() - start


def main(kinds: list[str], repeats: int, t1: float, tol: float) -> None:
    print(f"machine: {machine()}; dopri5 to t={t1:g} at rtol=atol={tol:g}, float64, N={N}")
    flow = fs.GradientFlow()
    for kind in kinds:
        problem = torch_problem(kind)
        theta0 = problem.initial_theta()
        grid = SaveGrid((0.0, t1))
        finals: dict[str, torch.Tensor] = {}
        evaluations: dict[str, int] = {}

        def flowsim_run(name: str, compile: bool) -> Callable[[], None]:
            def run() -> None:
                last = list(RK("dopri5", rtol=tol, atol=tol, compile=compile).solve(flow, problem, theta0, grid, 0))[-1]
                finals[name], evaluations[name] = last.theta, last.nfe

            return run

        def torchdiffeq_run() -> None:
            count = [0]

            def f(t, y):
                count[0] += 1
                return flow.derivative(problem, t, y)

            finals["torchdiffeq"] = torchdiffeq.odeint(f, theta0, torch.tensor([0.0, t1], dtype=torch.float64), rtol=tol, atol=tol)[-1]
            evaluations["torchdiffeq"] = count[0]

        bare_out = torch.empty_like(theta0)
        bare = {name: vector_field(flow, problem, compile=c) for name, c in (("bare gradient", False), ("bare gradient, compiled", True))}

        def bare_run(name: str) -> Callable[[], None]:
            def run() -> None:
                for _ in range(50):
                    bare[name](0.0, theta0, bare_out)
                evaluations[name] = 50

            return run

        candidates = {
            "flowsim RK": flowsim_run("flowsim RK", False),
            "flowsim RK, compile=True": flowsim_run("flowsim RK, compile=True", True),
            "torchdiffeq": torchdiffeq_run,
            "bare gradient": bare_run("bare gradient"),
            "bare gradient, compiled": bare_run("bare gradient, compiled"),
        }
        start = time.perf_counter()
        candidates["flowsim RK, compile=True"]()
        compile_time = time.perf_counter() - start
        try:
            diffrax_run, diffrax_compile = diffrax_solver(kind, problem, t1, tol)
        except ImportError as exc:
            print(f"  diffrax skipped: {exc} (pip install -e '.[bench]')")
        else:

            def diffrax_candidate() -> None:
                final, evaluations["diffrax"] = diffrax_run()
                finals["diffrax"] = torch.from_numpy(final)

            candidates["diffrax"] = diffrax_candidate
        times = alternate(candidates, repeats, warmup=1)

        print(f"{kind}: {problem.n_params} parameters, N={N}")
        if "diffrax" in candidates:
            print(f"  diffrax compile (first call, jit + run): {diffrax_compile:.2f} s")
        print(f"  flowsim compile=True first solve (torch.compile + run): {compile_time:.2f} s")
        per_eval = {name: statistics.median(ts) / evaluations[name] for name, ts in times.items()}
        reference = statistics.median(times["diffrax"]) if "diffrax" in times else None
        for name, ts in times.items():
            med = statistics.median(ts)
            ratio = f"  {med / reference:5.2f}× diffrax" if reference and not name.startswith("bare") else ""
            print(
                f"  {name:<26} median {med:8.3f} s (min {min(ts):.3f}, max {max(ts):.3f}), {evaluations[name]:5d} evaluations, "
                f"{per_eval[name] * 1e3:6.3f} ms each{ratio}"
            )
        for name, bare_name in (("flowsim RK", "bare gradient"), ("flowsim RK, compile=True", "bare gradient, compiled")):
            overhead = per_eval[name] - per_eval[bare_name]
            print(f"  bookkeeping of {name}: {overhead * 1e3:+.3f} ms per evaluation ({overhead / per_eval[name]:+.1%} of its time)")
        reference_state = finals["torchdiffeq"]
        for name, final in finals.items():
            err = float((final - reference_state).abs().max() / reference_state.abs().max())
            print(f"  final state of {name:<26} vs torchdiffeq: {err:.1e} relative")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--t1", type=float, default=10.0)
    parser.add_argument("--tol", type=float, default=1e-7)
    args = parser.parse_args()
    main(args.models, args.repeats, args.t1, args.tol)
