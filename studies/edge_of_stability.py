"""Edge of stability on digits: GD beside gradient flow, the modified flow and the central flow.

    python studies/edge_of_stability.py [--out out/edge_of_stability] [--quick] [--cases NAME ...]

Every case is a model on 256 digits (mse on one-hot labels, float64, PyTorch's default init)
and a learning rate η at which full-batch GD's sharpness rises to 2/η and stays there
(Cohen et al., ICLR 2021):

- GD (``DiscreteSGD(lr)``, full batch) from θ0, recorded at every step with its laws;
- from a common start, GD's iterate at step n0 averaged over ±10 steps (θ0 itself for n0 = 0):
  GradientFlow, ModifiedFlow(η) and CentralFlow(η) (Cohen, Damian et al., ICLR 2025) by RK4 at
  h = η (η/4 for ReLU networks, whose laws need it), recorded every 10 steps with the top eigenvalue. The central flow *is* gradient flow,
  to the bit, while no eigenvalue is caught (tests/test_central_flow.py), so it is continued
  from gradient flow's last save point before the sharpness reaches 0.9·2/η (S = 0 is
  checked there), which spares the Hessian work of the stretch before the edge.

Reported per case (table.md, one figure each): GD's sharpness over the last half against 2/η;
the flows' distance from GD's time-averaged iterate (±10 steps), at the end and its median over
the last half; GD's running-average loss against the central flow's prediction
L + ½⟨∇²L, Σ⟩ and L(θ) alone; and where the model has conservation laws: GD's per-step identity
h_{k+1} − h_k = η²·Q(ĝ_k) (flowsim.theory, exact at any η) and each flow's law drift against
GD's time-averaged drift (docs/concepts/edge-of-stability.md derives what each predicts).
Cases: the tanh MLP 64-32-32-10 at η = 0.5 from GD's step 2,500 (steady oscillation) and a
ReLU MLP of the same shape at η = 1 from θ0 (a rescale law per hidden unit); without --quick
also the tanh MLP from θ0 (5 minutes) and a small ReLU CNN (VGG depth 2, width 8, with
max-pool) from θ0, whose central flow at h = η/4 with k = 2 had not finished after 55 minutes
on the 2-core VM (not yet in STUDIES.md). About 8 minutes with --quick on 2 cores. A small transformer (one pre-norm block of width 16,
an image's rows as 8 tokens) is not a case: at η = 0.5 its GD has five or more Hessian
eigenvalues at the edge by step 500, and a central flow with k ≥ 6 directions (k(k+1)/2 third
derivatives an evaluation) was beyond this study's budget.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402

import flowsim as fs  # noqa: E402
from flowsim import data, models  # noqa: E402
from flowsim.spectrum import HessianOperator, top_eigenpairs  # noqa: E402

#: a ±WINDOW-step average of GD is its time-averaged iterate; flows save every SAVE steps
WINDOW, SAVE = 10, 10
@dataclass(frozen=True)
class Case:
    """A model and η; the flows start at GD's step `start` and follow it for `steps`, by RK4 at
    h = η/`substeps`, the central flow with `k` directions at the edge."""

    model: Callable[[], torch.nn.Module]
    lr: float
    start: int
    steps: int
    k: int = 1
    substeps: int = 1


def mlp(activation: str) -> Callable[[], torch.nn.Module]:
    return lambda: models.mlp.mlp(depth=2, width=32, activation=activation)


#: RK4 at h = η integrates the tanh MLP's flows to 1e-8 of h = η/4 (smooth), but not the ReLU
#: MLP's laws (6e-2 of drift under gradient flow over 300 steps, 5e-5 at h = η/4: kinks)
CASES = {
    "tanh MLP": Case(mlp("tanh"), 0.5, start=2500, steps=500),
    "ReLU MLP": Case(mlp("relu"), 1.0, start=0, steps=300, k=2, substeps=4),
    "tanh MLP from θ0": Case(mlp("tanh"), 0.5, start=0, steps=3000),
    "ReLU CNN": Case(lambda: models.cnn.vgg(depth=2, width=8), 0.5, start=0, steps=600, k=2, substeps=4),
}
QUICK = ("ReLU MLP", "tanh MLP")


def problem_for(name: str) -> fs.Problem:
    X, y = data.digits(n_train=256, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CASES[name].model().double()
    return fs.Problem(model, (X.double(), torch.nn.functional.one_hot(y, 10).double()), loss="mse")


def flows(problem: fs.Problem, start: torch.Tensor, case: Case) -> dict[str, xr.Dataset]:
    """GradientFlow, ModifiedFlow and CentralFlow from `start` by RK4, the central flow
    continued from gradient flow's last save point below 0.9·2/η."""
    theta0 = problem.initial_theta()
    problem.load_into_model(start)
    try:
        return _flows(problem, case)
    finally:
        problem.load_into_model(theta0)


def _flows(problem: fs.Problem, case: Case) -> dict[str, xr.Dataset]:
    lr, steps, k = case.lr, case.steps, case.k
    run = dict(integrator=fs.RK("rk4", step_size=lr / case.substeps), save_every=SAVE * lr, observe=("loss", "grad_norm", "sharpness", "params"), progress=False)
    out = {
        "gradient flow": fs.simulate(problem, fs.GradientFlow(), t1=steps * lr, **run),
        "modified flow": fs.simulate(problem, fs.ModifiedFlow(lr), t1=steps * lr, **run),
    }
    gradient, central = out["gradient flow"], fs.CentralFlow(lr, k=k, tol=1e-6)
    sharp = gradient.sharpness.values
    switch = max(int(np.argmax(sharp >= 0.9 * 2 / lr)) - 1, 0) if (sharp >= 0.9 * 2 / lr).any() else len(sharp) - 1
    theta0, theta = problem.initial_theta(), torch.as_tensor(gradient.params.values[switch])
    head = gradient.isel(time=slice(0, switch + 1)).drop_vars(["nfe", "wall_time"])
    head = head.assign(predicted_loss=head.loss, predicted_grad_sq=head.grad_norm**2, sigma_trace=head.loss * 0.0)
    if switch == len(sharp) - 1:  # never near the edge: the central flow is gradient flow
        out["central flow"] = head
        return out
    if switch > 0:
        assert float(central.edge(problem, theta).sigma_trace) == 0.0, "the central flow is not gradient flow at the switch"
    problem.load_into_model(theta)
    try:
        rest = fs.simulate(problem, central, t1=steps * lr - float(gradient.time[switch]), **run)
    finally:
        problem.load_into_model(theta0)
    if rest.attrs["status"] != "completed":
        raise RuntimeError(f"the central flow did not complete: {rest.attrs['status_message']}")
    rest = rest.assign_coords(time=rest.time + float(gradient.time[switch])).isel(time=slice(1, None))
    out["central flow"] = xr.concat([head, rest.drop_vars(["nfe", "wall_time"])], dim="time", data_vars="all", coords="minimal", compat="override")
    out["central flow"].attrs["switch_time"] = float(gradient.time[switch])
    return out


def averaged(values: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """GD's ±WINDOW-step average of `values` (time, …) around each of `steps`."""
    return np.stack([values[max(s - WINDOW, 0) : s + WINDOW + 1].mean(0) for s in steps])


def case(name: str, out: Path) -> dict:
    case_ = CASES[name]
    lr, n0, steps = case_.lr, case_.start, case_.steps
    problem = problem_for(name)
    edge = 2 / lr
    started = time.perf_counter()
    total = n0 + steps + WINDOW
    gd = fs.simulate(problem, fs.DiscreteSGD(lr), t1=total * lr, save_every=lr, observe=("loss", "params"), progress=False)
    params = gd.params.values
    start = torch.as_tensor(averaged(params, np.array([n0]))[0] if n0 else params[0])
    runs = flows(problem, start, case_)
    sampled = np.arange(n0, n0 + steps + 1, SAVE)  # GD's steps at the flows' save points
    vectors = torch.randn(problem.n_params, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gd_sharpness = []
    for s in sampled:
        found = top_eigenpairs(HessianOperator(problem, torch.as_tensor(params[s])), vectors, 1, tol=1e-6)
        gd_sharpness.append(float(found.values[0]))
        vectors = found.subspace
    gd_sharpness = np.asarray(gd_sharpness)
    target = averaged(params, sampled)
    distance = {f: np.linalg.norm(ds.params.values - target, axis=1) / np.linalg.norm(target, axis=1) for f, ds in runs.items()}
    running = averaged(gd.loss.values, sampled)
    last = sampled >= n0 + steps // 2
    row = {
        "case": name,
        "lr": lr,
        "steps": f"{n0}–{n0 + steps}",
        "gd_sharpness": (gd_sharpness[last].min() / edge, gd_sharpness[last].max() / edge),
        "distance": {f: (float(d[-1]), float(np.median(d[last]))) for f, d in distance.items()},
    }
    central = runs["central flow"]
    row["central_sharpness_max"] = float(central.sharpness.max()) / edge
    row["loss"] = {
        "GD running average": float(running[last].mean()),
        "central flow prediction": float(central.predicted_loss.values[last].mean()),
        "L(θ) of the central flow": float(central.loss.values[last].mean()),
    }
    if gd.sizes["quantity"]:
        theory = fs.theory.predict(gd, "discrete")
        scale = gd.scale.where(gd.scale > 0, 1.0).values
        row["identity_error"] = float((abs(theory.theory - gd.value).values / scale).max())
        ends = averaged(gd.value.values, np.array([n0, n0 + steps]))
        drift_gd = ends[1] - (ends[0] if n0 else gd.value.values[0])
        rms = lambda drift: float(np.sqrt(np.mean((drift / scale) ** 2)))  # noqa: E731
        row["law_drift"] = {"GD (time-averaged)": rms(drift_gd)}
        row["law_drift_error"] = {}
        for f, ds in runs.items():
            drift = ds.value.values[-1] - ds.value.values[0]
            row["law_drift"][f] = rms(drift)
            row["law_drift_error"][f] = float(np.linalg.norm((drift - drift_gd) / scale) / np.linalg.norm(drift_gd / scale))
        row["laws"] = ", ".join(f"{n} {kind}" for kind, n in zip(*np.unique(gd.law.values, return_counts=True)))
    figure(name, lr, n0, gd, runs, sampled, gd_sharpness, distance, running, out / f"{slug(name)}.png")
    row["seconds"] = time.perf_counter() - started
    return row


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.replace("θ", "theta")).strip("_")


def figure(name, lr, n0, gd, runs, sampled, gd_sharpness, distance, running, path: Path) -> None:
    panels = 4 if gd.sizes["quantity"] else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.3 * panels, 3.6))
    colors = {"gradient flow": "C0", "modified flow": "C1", "central flow": "C3"}
    t = (sampled - n0) * lr  # the flows' time, from the start
    gd_t = gd.time.values - n0 * lr
    window = (gd_t >= 0) & (gd_t <= t[-1])
    axes[0].plot(t, gd_sharpness, ".", color="k", ms=3, label="GD")
    for f, ds in runs.items():
        axes[0].plot(ds.time, ds.sharpness, color=colors[f], label=f)
        axes[1].semilogy(ds.time, np.maximum(distance[f], 1e-16), color=colors[f], label=f)
    axes[0].axhline(2 / lr, ls="--", color="0.5", lw=1)
    axes[0].set(title="sharpness (dashed: 2/η)", xlabel="t − t₀ (t = k·η)")
    axes[1].set(title="distance from GD's averaged iterate", xlabel="t − t₀", ylabel="relative")
    axes[2].semilogy(gd_t[window], gd.loss.values[window], color="0.75", lw=0.6, label="GD")
    axes[2].semilogy(t, running, color="k", label="GD, running average")
    central = runs["central flow"]
    axes[2].semilogy(central.time, central.predicted_loss, color="C3", label="central flow: predicted")
    axes[2].semilogy(central.time, central.loss, ":", color="C3", label="central flow: L(θ)")
    axes[2].set(title="loss", xlabel="t − t₀")
    if panels == 4:
        scale = gd.scale.where(gd.scale > 0, 1.0)
        first = gd.value.isel(time=int(np.flatnonzero(window)[0]))
        rms = lambda value, at0: np.sqrt((((value - at0) / scale) ** 2).mean("quantity"))  # noqa: E731
        axes[3].semilogy(gd_t[window], rms(gd.value, first)[window], color="0.6", lw=0.6, label="GD")
        for f, ds in runs.items():
            axes[3].semilogy(ds.time[1:], rms(ds.value, ds.value.isel(time=0))[1:], color=colors[f], label=f)
        axes[3].set(title=f"{', '.join(dict.fromkeys(gd.law.values.tolist()))} laws: RMS drift", xlabel="t − t₀", ylabel="relative to scale")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    start = "θ0" if n0 == 0 else f"GD's averaged iterate at step {n0}"
    fig.suptitle(f"{name} on 256 digits, full-batch GD at η = {lr:g}; the flows from {start}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    flows_ = ("gradient flow", "modified flow", "central flow")
    lines = [
        "| case | η | GD steps | GD sharpness, last half (× 2/η) | central flow's max (× 2/η) | distance from GD at the end: gradient / modified / central "
        "(median over the last half) | loss over the last half: GD average / central prediction / L(θ) | RMS law drift: GD averaged / gradient / modified / central "
        "(error against GD's drift) | "
        "GD's per-step identity | seconds |",
        "|---" * 10 + "|",
    ]
    for r in rows:
        d, loss, laws = r["distance"], r["loss"], r.get("law_drift_error")
        cells = [
            r["case"],
            f"{r['lr']:g}",
            r["steps"],
            f"{r['gd_sharpness'][0]:.3f}–{r['gd_sharpness'][1]:.3f}",
            f"{r['central_sharpness_max']:.6f}",
            " / ".join(f"{d[f][0]:.1e}" for f in flows_) + " (" + " / ".join(f"{d[f][1]:.1e}" for f in flows_) + ")",
            " / ".join(f"{v:.4g}" for v in loss.values()),
            (" / ".join(f"{r['law_drift'][f]:.1e}" for f in ("GD (time-averaged)", *flows_)) + " (" + " / ".join(f"{laws[f]:.2f}" for f in flows_) + f"; {r['laws']})")
            if laws
            else "no laws",
            f"{r['identity_error']:.1e}" if "identity_error" in r else "–",
            f"{r['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(out: Path, quick: bool, cases: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small problems: one thread is faster
    rows = []
    for name in cases or (QUICK if quick else CASES):
        rows.append(case(name, out))
        print(f"{name}: {rows[-1]['seconds']:.0f} s", flush=True)
        (out / "table.md").write_text(markdown_table(rows))
    print((out / "table.md").read_text())
    print(f"wrote {out}/*.png and table.md")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/edge_of_stability"))
    parser.add_argument("--quick", action="store_true", help="the two MLP cases only")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="these cases only")
    args = parser.parse_args()
    main(args.out, args.quick, args.cases)
