"""flowsim against diffrax (JAX) and plain torchdiffeq: one gradient flow, solved by dopri5.

    python benchmarks/peer_diffrax.py [--repeats 5] [--models mlp cnn] [--t1 10] [--tol 1e-7] [--threads 1] [--compile] [--device cuda]

The problems (float64, cross-entropy, N=512 random N(0, 1) inputs with random labels, seed 0):
- mlp: 64-128-128-10 with ReLU (26,122 parameters);
- cnn: conv3×3(1→8) ReLU conv3×3(8→8) ReLU max-pool 2 → linear(128→10) on 8×8 images
  (``models.cnn.vgg(depth=2, width=8)``, 1,954 parameters).
Gradient flow θ' = −∇L(θ) from the model's initial parameters to t = t1 by dopri5 at
rtol = atol = tol, the same θ0 and data in every candidate:
- "flowsim RK": the loop of ``integrators.RK("dopri5")`` on ``rk.vector_field`` (and, with
  --compile, ``compile=True``);
- "torchdiffeq": ``torchdiffeq.odeint`` over the flat-buffer autograd vector field
  (``GradientFlow.derivative``, what ``integrators.ODE`` runs);
- "fs.simulate": the whole call as users make it (laws=[], the final θ recorded), with
  ``integrator=None`` when --tol is 1e-6 (the default: RK's dopri5 at 1e-6), else RK at --tol,
  and with --compile its RK(compile=True) (compiled once per problem, cached across calls);
- "diffrax": ``diffeqsolve(ODETerm(−∇L), Dopri5(), PIDController(rtol, atol))`` under
  ``jax.jit`` with float64 enabled; its compile time is reported apart. XLA keeps its own
  thread pool (--threads sets torch's only).
Whole solves, alternating candidates, `repeats` times each after a warm-up; medians and the
spread (min–max). Bookkeeping: each torch candidate's vector field is timed inside the solve,
so bookkeeping = whole solve − time inside the vector field, per run (robust to load drifting
between runs). diffrax's evaluations: 6 per step + 2 (FSAL dopri5 with its initial step
selection). diffrax is optional (``pip install -e ".[bench]"``): without jax and diffrax its
rows are skipped with a message.

With ``--device cuda`` every candidate runs on the GPU (diffrax on JAX's GPU backend; set
XLA_PYTHON_CLIENT_PREALLOCATE=false), each solve ends with torch.cuda.synchronize(), the
candidates ``RK(sync_every=16)`` and ``RK(sync_every=16, cuda_graph=True)`` join, and the
bookkeeping split is not printed (kernels run asynchronously: time inside the vector field is
launch time, not work).
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
from flowsim.integrators.rk import _AdaptiveLoop, vector_field

N = 512


def torch_problem(kind: str, device: str = "cpu") -> fs.Problem:
    rng = np.random.default_rng(0)
    shape = (N, 64) if kind == "mlp" else (N, 1, 8, 8)
    X = torch.tensor(rng.standard_normal(shape))
    y = torch.tensor(rng.integers(0, 10, N))
    torch.manual_seed(0)
    model = models.mlp.mlp(depth=2, width=128) if kind == "mlp" else models.cnn.vgg(depth=2, width=8)
    return fs.Problem(model.double().to(device), (X.to(device), y.to(device)))


def diffrax_solver(kind: str, problem: fs.Problem, t1: float, tol: float) -> tuple[Callable[[], tuple[np.ndarray, int]], float]:
    """A jitted diffrax solve of the same flow from the same θ0; returns it with its compile time."""
    import diffrax
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    params = {n: jnp.asarray(p.detach().cpu().numpy()) for n, p in problem.unflatten(problem.initial_theta()).items()}
    X, y = jnp.asarray(problem.X.cpu().numpy()), jnp.asarray(problem.y.cpu().numpy())

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
    g_jax = np.concatenate([np.asarray(g).reshape(-1) for g in (grad(params)[n] for n in problem.names)])
    g_torch = problem.loss_and_grad(problem.initial_theta())[1].cpu().numpy()
    assert np.abs(g_jax - g_torch).max() < 1e-10 * np.abs(g_torch).max(), "the JAX gradient differs from the torch one"

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


class Timed:
    """A vector field that adds the time spent inside it to `inside` (the rest of a solve is
    the solver's bookkeeping)."""

    def __init__(self, f: Callable) -> None:
        self.f, self.inside, self.calls = f, 0.0, 0

    def __call__(self, *args):
        start = time.perf_counter()
        result = self.f(*args)
        self.inside += time.perf_counter() - start
        self.calls += 1
        return result


def main(kinds: list[str], repeats: int, t1: float, tol: float, compile: bool, device: str) -> None:
    on_gpu = device != "cpu"
    sync = torch.cuda.synchronize if on_gpu else lambda: None
    where = f", {torch.cuda.get_device_name()}" if on_gpu else ""
    print(f"machine: {machine()}{where}; dopri5 to t={t1:g} at rtol=atol={tol:g}, float64, N={N}")
    flow = fs.GradientFlow()
    for kind in kinds:
        problem = torch_problem(kind, device)
        theta0 = problem.initial_theta()
        grid = SaveGrid((0.0, t1))
        finals: dict[str, torch.Tensor] = {}
        evaluations: dict[str, int] = {}
        inside: dict[str, list[float]] = {}

        def flowsim_run(name: str, compiled: bool) -> Callable[[], None]:
            f = vector_field(flow.term(problem, problem.initial_theta()), compile=compiled)

            def run() -> None:  # RK("dopri5").solve's loop, its vector field timed
                timed = Timed(f)
                loop = _AdaptiveLoop(RK("dopri5", rtol=tol, atol=tol), timed, theta0, grid)
                finals[name], evaluations[name] = loop.advance(t1), loop.state.nfe
                sync()
                inside.setdefault(name, []).append(timed.inside)

            return run

        def device_run(name: str, cuda_graph: bool) -> Callable[[], None]:
            integrator = RK("dopri5", rtol=tol, atol=tol, sync_every=16, cuda_graph=cuda_graph)

            def run() -> None:  # the whole RK.solve, its decisions on the GPU
                *_, last = integrator.solve(flow.term(problem, theta0), grid, 0)
                sync()
                finals[name], evaluations[name] = last.theta, last.nfe

            return run

        def torchdiffeq_run() -> None:
            timed = Timed(lambda t, y: flow.derivative(problem, t, y))
            finals["torchdiffeq"] = torchdiffeq.odeint(timed, theta0, torch.tensor([0.0, t1], dtype=torch.float64, device=device), rtol=tol, atol=tol)[-1]
            sync()
            evaluations["torchdiffeq"] = timed.calls
            inside.setdefault("torchdiffeq", []).append(timed.inside)

        def simulate_run(name: str, compiled: bool) -> Callable[[], None]:
            # a whole fs.simulate call as users make it: integrator=None is RK("dopri5") at 1e-6
            integrator = None if tol == 1e-6 and not compiled else RK("dopri5", rtol=tol, atol=tol, compile=compiled)

            def run() -> None:
                ds = fs.simulate(problem, flow, integrator, t1=t1, save_every=t1, laws=[], observe=("params",), device=device, progress=False)
                finals[name], evaluations[name] = torch.as_tensor(ds.params.values[-1]).to(device), int(ds.nfe[-1])

            return run

        default = "fs.simulate, integrator=None" if tol == 1e-6 else "fs.simulate, RK"
        candidates = {"flowsim RK": flowsim_run("flowsim RK", False), default: simulate_run(default, False), "torchdiffeq": torchdiffeq_run}
        if on_gpu:
            candidates["flowsim RK, sync_every=16"] = device_run("flowsim RK, sync_every=16", False)
            candidates["flowsim RK, sync_every=16, cuda_graph"] = device_run("flowsim RK, sync_every=16, cuda_graph", True)
        compile_time = None
        if compile:
            candidates["flowsim RK, compile=True"] = flowsim_run("flowsim RK, compile=True", True)
            start = time.perf_counter()
            candidates["flowsim RK, compile=True"]()
            compile_time = time.perf_counter() - start
            candidates["fs.simulate, RK compile=True"] = simulate_run("fs.simulate, RK compile=True", True)
        try:
            diffrax_run, diffrax_compile = diffrax_solver(kind, problem, t1, tol)
        except ImportError as exc:
            print(f"  diffrax skipped: {exc} (pip install -e '.[bench]')")
        else:

            def diffrax_candidate() -> None:
                final, evaluations["diffrax"] = diffrax_run()
                finals["diffrax"] = torch.from_numpy(final).to(device)

            candidates["diffrax"] = diffrax_candidate
        times = alternate(candidates, repeats, warmup=1)

        print(f"{kind}: {problem.n_params} parameters, N={N}")
        if "diffrax" in candidates:
            print(f"  diffrax compile (first call, jit + run): {diffrax_compile:.2f} s")
        if compile_time is not None:
            print(f"  flowsim compile=True first solve (tracing, TorchInductor and the solve): {compile_time:.2f} s")
        reference = statistics.median(times["diffrax"]) if "diffrax" in times else None
        for name, ts in times.items():
            med = statistics.median(ts)
            ratio = f", {med / reference:5.2f}× diffrax" if reference else ""
            print(
                f"  {name:<26} median {med:8.3f} s (min {min(ts):.3f}, max {max(ts):.3f}), {evaluations[name]:5d} evaluations, "
                f"{med / evaluations[name] * 1e3:7.3f} ms each{ratio}"
            )
        for name, spent in inside.items() if not on_gpu else ():
            # per run: bookkeeping share = 1 − (time inside the vector field) / (whole solve); warm-up runs are dropped
            shares = [1 - f / t for f, t in zip(spent[-repeats:], times[name])]
            per_eval = [(t - f) / evaluations[name] * 1e3 for f, t in zip(spent[-repeats:], times[name])]
            print(
                f"  bookkeeping of {name:<26} median {statistics.median(per_eval):.3f} ms per evaluation, "
                f"{statistics.median(shares):.1%} of the solve (min {min(shares):.1%}, max {max(shares):.1%})"
            )
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
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time RK(compile=True) (5–20 s of compiling on the CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args.models, args.repeats, args.t1, args.tol, args.compile, args.device)
