"""The cost of one central-flow evaluation, in units of one gradient evaluation.

    python benchmarks/central_flow.py [--repeats 20]

The model of issue 18: a tanh MLP 64-32-32-10 (3,466 parameters) on 256 digits, mse on one-hot
labels, float64, one thread, on the central flow's path at the edge: 20 steps (RK4 at h = η)
from GD's iterate at step 2,500 with η = 0.5 averaged over ±10 steps, where the flow holds one
eigenvalue at 2/η (S > 0). Each call evaluates the next of 8 points the flow passes through
(Euler sub-steps of η/4), warm-started from the last, as in a run. Both eigen-solvers stop at
the port's tolerance, a residual of 1e-5 relative to the eigenvalue. Each figure is a median over alternating rounds
(benchmarks/common.py), divided by the median of a gradient evaluation of the same framework:

- flowsim: ``CentralFlow(lr, k).edge`` warm-started from the last evaluation's memory, as in a
  run (k = 1 and 2), and its parts: the Hessian graph with the eigen-solver's products, and
  the third derivatives ∇³L[u_i, u_j, ·];
- the central flows' JAX port (github.com/alex-damian/central_flows_jax, ``flows.py``
  ``central_flow_substep``), when JAX is installed: its per-substep work, jitted, rewritten
  here from its source on the same network — a value-and-gradient, ``compute_eigs`` (LOBPCG
  warm-started from the last eigenvectors, its tolerance 1e-5) and ``diff(loss, w, 3, u, v)``
  per pair. Its SDCP (CVXPY, not installed here) is left out; for k = 1 it is one division.
  Both methods take 4 evaluations per GD step (its Euler sub-steps dt = η/4; flowsim's RK4 at
  h = η), so per-evaluation units compare per-step costs.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from common import alternate, machine

import flowsim as fs
from flowsim.dynamics.central import CentralFlow, EdgeMemory
from flowsim.spectrum import HessianOperator, top_eigenpairs

LR, STEPS, WINDOW, TOL = 0.5, 2500, 10, 1e-5


def edge_problem() -> tuple[fs.Problem, list[torch.Tensor]]:
    X, y = fs.data.digits(n_train=256)
    torch.manual_seed(0)
    model = fs.models.mlp.mlp(depth=2, width=32, activation="tanh").double()
    problem = fs.Problem(model, (X, torch.nn.functional.one_hot(y, 10).double()), loss="mse")
    theta, trajectory = problem.initial_theta(), []
    for _ in range(STEPS + WINDOW + 1):
        trajectory.append(theta)
        theta = theta - LR * problem.loss_and_grad(theta)[1]
    problem.load_into_model(torch.stack(trajectory[-2 * WINDOW - 1 :]).mean(0))
    on_edge = fs.simulate(problem, CentralFlow(LR, k=1, tol=TOL), fs.RK("rk4", step_size=LR), t1=20 * LR, save_every=20 * LR, observe=("params",), progress=False)
    points, flow = [torch.as_tensor(on_edge.params.values[-1])], CentralFlow(LR, k=1, tol=TOL)
    assert float(on_edge.sigma_trace[-1]) > 0, "not at the edge"
    for _ in range(7):
        points.append(points[-1] + LR / 4 * flow.derivative(problem, torch.tensor(0.0), points[-1]))
    return problem, points


class Cycle:
    """The next of `points` at each call."""

    def __init__(self, points: list) -> None:
        self.points, self.i = points, -1

    def __call__(self):
        self.i = (self.i + 1) % len(self.points)
        return self.points[self.i]


def flowsim_candidates(problem: fs.Problem, points: list[torch.Tensor]) -> dict:
    candidates = {"flowsim gradient": lambda at=Cycle(points): problem.loss_and_grad(at())}
    for k in (1, 2):
        flow, memory = CentralFlow(LR, k=k, tol=TOL), EdgeMemory()
        for theta in points:
            state = flow.edge(problem, theta, memory)
        print(f"  k={k}: {state.matvecs} Hessian-vector products per warm-started evaluation")
        candidates[f"flowsim central flow, k={k}"] = lambda flow=flow, memory=memory, at=Cycle(points): flow.edge(problem, at(), memory)
        candidates[f"flowsim Hessian graph + eigen, k={k}"] = lambda k=k, memory=memory, at=Cycle(points): top_eigenpairs(
            HessianOperator(problem, at()), memory.subspace, k, tol=TOL
        )
        candidates[f"flowsim third derivatives, k={k}"] = lambda u=state.vectors, at=Cycle(points): HessianOperator(problem, at()).third(u)
    return candidates


def jax_candidates(problem: fs.Problem, points: list[torch.Tensor]) -> dict:
    """The JAX port's per-substep work on the same network (its source, rewritten here)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.sparse.linalg import lobpcg_standard
    from jax.flatten_util import ravel_pytree

    jax.config.update("jax_enable_x64", True)
    X, Y = jnp.asarray(problem.X.reshape(len(problem.X), -1).numpy()), jnp.asarray(problem.y.numpy())
    flats = [ravel_pytree({n: jnp.asarray(t.detach().numpy()) for n, t in problem.unflatten(theta).items()}) for theta in points]
    unravel = flats[0][1]
    flats = [f for f, _ in flats]

    def loss(w):
        q = unravel(w)
        h = X
        for layer in ("fc1", "fc2"):
            h = jnp.tanh(h @ q[f"{layer}.weight"].T + q[f"{layer}.bias"])
        return jnp.mean((h @ q["out.weight"].T + q["out.bias"] - Y) ** 2)

    assert abs(float(loss(flats[0])) - float(problem.loss(points[0]))) < 1e-12, "the JAX network differs from the torch one"

    def diff(f, x, order, *vs):  # the port's utils.diff
        if order == 0:
            return f(x)
        if len(vs) == order:
            v, *rest = vs
            return diff(lambda y: jax.jvp(f, [y], [v])[1], x, order - 1, *rest)
        return diff(jax.jacobian(f), x, order - 1, *vs)

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    out = {}
    for k in (1, 2):

        @jax.jit
        def substep(w, ref, k=k):
            value, g = jax.value_and_grad(loss)(w)
            hvp = lambda v: diff(loss, w, 2, v)  # noqa: E731
            eigs, u, iters = lobpcg_standard(jax.vmap(hvp, 1, 1), ref, tol=1e-5 / (10 * len(w)))
            i, j = jnp.triu_indices(k)
            third = jax.lax.map(lambda c: diff(loss, w, 3, *c), (u.T[i], u.T[j]))
            return value, g, eigs, u, third, iters

        ref = jnp.asarray(np.linalg.qr(np.random.default_rng(0).standard_normal((len(flats[0]), k)))[0])
        for w in flats:  # warm: each start the last eigenvectors, as in a run
            *_, ref, _, iters = substep(w, ref)
        print(f"  JAX port k={k}: LOBPCG {int(iters)} iterations, {k * (4 * int(iters) + 1) + 1} Hessian-vector products (its count)")

        def run(substep=substep, state={"ref": ref}, at=Cycle(flats)):  # noqa: B006
            *_, state["ref"], _, _ = jax.block_until_ready(substep(at(), state["ref"]))

        out[f"JAX port substep, k={k}"] = run
    out["JAX gradient"] = lambda at=Cycle(flats): jax.block_until_ready(value_and_grad(at()))
    return out


def main(repeats: int) -> None:
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    problem, points = edge_problem()
    candidates = flowsim_candidates(problem, points)
    try:
        candidates.update(jax_candidates(problem, points))
    except ImportError:
        print("  (JAX not installed: the port's figures are skipped)")
    times = {name: statistics.median(ts) for name, ts in alternate(candidates, repeats).items()}
    for name, t in times.items():
        unit = times["JAX gradient" if name.startswith("JAX") else "flowsim gradient"]
        print(f"  {name:<40} {t * 1e3:8.3f} ms  {t / unit:6.1f} gradients")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    main(parser.parse_args().repeats)
