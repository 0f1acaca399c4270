"""Integrator accuracy: how well each flow tracks GD, and what each ODE solver pays for accuracy.

On digits, a small tanh MLP and a small tanh CNN without max-pool (smooth: ReLU and max-pool
flows have sliding modes, README, on which a tight-tolerance solver crawls), in float64:

1. Tracking. Full-batch GD at η ∈ {0.4, 0.2, 0.1, 0.05, 0.025} against GradientFlow and
   ModifiedFlow(η); heavy-ball GD (β = 0.9) at η ∈ {0.04, …, 0.0025} (the same effective rate
   η/(1−β)) against MomentumFlow ("rest", "matched") and its reduced first-order form. The
   error is |θ_flow(T) − θ_GD(T)| / |θ_GD(T)| at T = 1.2 (``fs.compare``), on log-log axes with
   least-squares slopes.
2. Work–precision. GradientFlow to T: error against a reference vs the gradient evaluations
   spent, for euler, midpoint, rk4 (fixed steps), bosh3, dopri5, dopri8
   (torchdiffeq), Exponential (Krogstad), and SciPy's RK45, DOP853, LSODA, Radau, BDF. The
   reference is scipy's DOP853 (Dormand–Prince 8, as dopri8) at rtol = atol = 1e-13:
   torchdiffeq's dopri8 at rtol 1e-12 (the issue's reference) is itself only about 1e-9
   accurate here, so it is one point of the diagram instead.

    python studies/integrator_accuracy.py [--quick] [--models mlp cnn] [--recompute] [--out DIR]

Writes tracking_{mlp,cnn}.nc, work_precision_{mlp,cnn}.nc, tracking.png, work_precision.png
and results.md (the table in STUDIES.md) under DIR (default out/integrator_accuracy). A model
whose two .nc files are already there is read back, not recomputed (unless --recompute), so a
stopped run loses only the model it was on. ``--quick``: 32 examples and fewer tolerances
(about 2.5 CPU-minutes: MLP 1.5, CNN 1); the full mode uses 512 examples.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402

import flowsim as fs  # noqa: E402
from flowsim import data, models  # noqa: E402
from flowsim.integrators import ODE, Exponential, SaveGrid, SciPy  # noqa: E402

T = 1.2  # a whole number of steps at every η below
BETA = 0.9
GD_LRS = (0.4, 0.2, 0.1, 0.05, 0.025)
HB_LRS = tuple(lr * (1 - BETA) for lr in GD_LRS)
FLOW_INTEGRATOR = ODE("dopri5", rtol=1e-8, atol=1e-8)  # the errors measured are ≥ 1e-5
MOMENTUM_INTEGRATOR = Exponential(rtol=1e-8, atol=1e-8)


def build(name: str, n: int) -> fs.Problem:
    X, y = data.digits(n_train=n, seed=0)
    torch.manual_seed(0)
    if name == "mlp":
        model = models.mlp.mlp(depth=2, width=8, activation="tanh")
    else:
        model = models.cnn.vgg(depth=2, width=4, activation="tanh", pool_every=0)  # max-pool has kinks too
    return fs.Problem(model, (X, y)).to(dtype=torch.float64)


def slope(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


# ------------------------------------------------------------------------------ 1. tracking
def tracking(problem: fs.Problem) -> xr.Dataset:
    """error[dynamics, lr] at T: each flow against the discrete run it models."""
    run = lambda dyn, integ=None: fs.simulate(problem, dyn, integ, t1=T, save_every=T, observe=("params",), progress=False)
    error = lambda flow, sgd: float(fs.compare(flow, sgd).param_error[-1])
    gradient_flow = run(fs.GradientFlow(), FLOW_INTEGRATOR)
    rows = {"GradientFlow": [], "ModifiedFlow": [], "MomentumFlow rest": [], "MomentumFlow matched": [], "MomentumFlow reduced": []}
    for lr, hb_lr in zip(GD_LRS, HB_LRS):
        gd = run(fs.DiscreteSGD(lr))
        rows["GradientFlow"].append(error(gradient_flow, gd))
        rows["ModifiedFlow"].append(error(run(fs.ModifiedFlow(lr), FLOW_INTEGRATOR), gd))
        hb = run(fs.DiscreteSGD(hb_lr, momentum=BETA))
        rows["MomentumFlow rest"].append(error(run(fs.MomentumFlow(hb_lr, BETA), MOMENTUM_INTEGRATOR), hb))
        rows["MomentumFlow matched"].append(error(run(fs.MomentumFlow(hb_lr, BETA, start="matched"), MOMENTUM_INTEGRATOR), hb))
        rows["MomentumFlow reduced"].append(error(run(fs.MomentumFlow(hb_lr, BETA, form="reduced"), FLOW_INTEGRATOR), hb))
        print(f"  η = {lr:g}: " + ", ".join(f"{k} {v[-1]:.2e}" for k, v in rows.items()), flush=True)
    return xr.Dataset(
        {"error": (("dynamics", "step"), np.array(list(rows.values())))},
        coords={
            "dynamics": list(rows),
            "step": ("step", np.arange(len(GD_LRS))),
            "lr": (("dynamics", "step"), np.array([GD_LRS if k in ("GradientFlow", "ModifiedFlow") else HB_LRS for k in rows])),
        },
        attrs={"T": T, "momentum": BETA, "n_params": problem.n_params},
    )


# ------------------------------------------------------------------------- 2. work–precision
def solvers(quick: bool) -> list[tuple[str, str, object]]:
    """(method, setting label, integrator) for every point of the diagram."""
    steps = [T / 2**k for k in (range(2, 6) if quick else range(2, 11))]
    tols = [10.0**-k for k in ((3, 6, 9) if quick else range(3, 12))]
    out = [(m, f"h={h:g}", ODE(m, step_size=h)) for m in ("euler", "midpoint", "rk4") for h in steps]
    out += [(m, f"rtol={r:g}", ODE(m, rtol=r, atol=r)) for m in ("bosh3", "dopri5", "dopri8") for r in tols]
    out += [("dopri8", "rtol=1e-12", ODE("dopri8", rtol=1e-12, atol=1e-12))]
    out += [("Exponential", f"rtol={r:g}", Exponential(rtol=r, atol=r)) for r in tols]
    scipy_tols = tols if not quick else tols[:2]
    out += [(f"SciPy {m}", f"rtol={r:g}", SciPy(m, rtol=r, atol=r)) for m in ("RK45", "DOP853", "LSODA") for r in scipy_tols]
    out += [(f"SciPy {m}", f"rtol={r:g}", SciPy(m, rtol=r, atol=r)) for m in ("Radau", "BDF") for r in scipy_tols[: 1 if quick else 3]]
    return out


def work_precision(problem: fs.Problem, quick: bool) -> xr.Dataset:
    theta0, grid, flow = problem.initial_theta(), SaveGrid((0.0, T)), fs.GradientFlow()

    def final(integrator):
        start = time.perf_counter()
        *_, end = integrator.solve(flow.term(problem, theta0), grid, seed=0)
        return end.theta.clone(), end.nfe, time.perf_counter() - start

    reference, reference_nfe, _ = final(SciPy("DOP853", rtol=1e-13, atol=1e-13))
    methods, settings, errors, nfes, seconds = [], [], [], [], []
    for method, setting, integrator in solvers(quick):
        if isinstance(integrator, SciPy) and method.split()[-1] in ("Radau", "BDF") and problem.n_params > integrator.max_jacobian_size:
            continue
        theta, nfe, wall = final(integrator)
        methods.append(method)
        settings.append(setting)
        errors.append(float((theta - reference).norm() / reference.norm()))
        nfes.append(nfe)
        seconds.append(wall)
    print(f"  reference DOP853 rtol 1e-13: {reference_nfe} evaluations; {len(methods)} solver runs", flush=True)
    return xr.Dataset(
        {"error": ("run", errors), "nfe": ("run", nfes), "wall_time": ("run", seconds)},
        coords={"method": ("run", methods), "setting": ("run", settings)},
        attrs={"T": T, "reference": "scipy DOP853 rtol=atol=1e-13", "reference_nfe": reference_nfe, "n_params": problem.n_params},
    )


# -------------------------------------------------------------------------------- outputs
def figures(results: dict[str, tuple[xr.Dataset, xr.Dataset]], out: Path) -> None:
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.8 * len(results)), squeeze=False)
    for (name, (track, _)), row in zip(results.items(), axes):
        for ax, kinds, title in (
            (row[0], ("GradientFlow", "ModifiedFlow"), "full-batch GD"),
            (row[1], ("MomentumFlow rest", "MomentumFlow matched", "MomentumFlow reduced"), f"heavy-ball GD, β = {BETA}"),
        ):
            for kind in kinds:
                sel = track.sel(dynamics=kind)
                ax.loglog(sel.lr, sel.error, "o-", label=f"{kind} (slope {slope(sel.lr, sel.error):.2f})")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
            ax.set(xlabel="η", ylabel=f"|θ_flow − θ_GD| / |θ_GD| at T = {T:g}", title=f"{name}: {title}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tracking.png", dpi=120)

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.6), squeeze=False)
    for (name, (_, wp)), ax in zip(results.items(), axes[0]):
        for i, method in enumerate(dict.fromkeys(wp.method.values.tolist())):
            sel = wp.where(wp.method == method, drop=True)
            ax.loglog(sel.nfe, np.maximum(sel.error, 1e-17), "o-" if i < 10 else "s--", ms=3, label=method)
        ax.set(xlabel="gradient evaluations", ylabel=f"relative error at T = {T:g}", title=f"{name}: gradient flow, work–precision")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "work_precision.png", dpi=120)


def table(results: dict[str, tuple[xr.Dataset, xr.Dataset]]) -> str:
    lines = ["| model | flow vs discrete run | η range | error at largest η | error at smallest η | slope |", "|---|---|---|---|---|---|"]
    for name, (track, _) in results.items():
        for kind in track.dynamics.values:
            sel = track.sel(dynamics=kind)
            lrs, err = sel.lr.values, sel.error.values
            lines.append(
                f"| {name} ({track.n_params} params) | {kind} | {lrs.min():g} … {lrs.max():g} | {err[0]:.2e} | {err[-1]:.2e} "
                f"| {slope(lrs, err):.2f} |"
            )
    lines += ["", "| model | method | cheapest run: evaluations, error | most accurate run: evaluations, error |", "|---|---|---|---|"]
    for name, (_, wp) in results.items():
        for method in dict.fromkeys(wp.method.values.tolist()):
            sel = wp.where(wp.method == method, drop=True)
            lo, hi = int(np.argmin(sel.nfe.values)), int(np.argmin(sel.error.values))
            lines.append(
                f"| {name} | {method} | {int(sel.nfe[lo])}, {float(sel.error[lo]):.1e} | {int(sel.nfe[hi])}, {float(sel.error[hi]):.1e} |"
            )
    return "\n".join(lines)


def main(out: Path, quick: bool, names: list[str], recompute: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    n = 32 if quick else 512
    results = {}
    for name in names:
        paths = out / f"tracking_{name}.nc", out / f"work_precision_{name}.nc"
        if not recompute and all(path.exists() for path in paths):
            print(f"{name}: reusing {paths[0]} and {paths[1]}", flush=True)
            results[name] = tuple(xr.load_dataset(path) for path in paths)
            continue
        problem = build(name, n)
        print(f"{name}: {problem.n_params} parameters, {n} digits", flush=True)
        results[name] = (tracking(problem), work_precision(problem, quick))
        for result, path in zip(results[name], paths):
            result.to_netcdf(path)
    figures(results, out)
    text = table(results)
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out}/tracking_*.nc, {out}/work_precision_*.nc, {out}/tracking.png, {out}/work_precision.png, {out}/results.md")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/integrator_accuracy"))
    parser.add_argument("--quick", action="store_true", help="32 examples and fewer tolerances")
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    parser.add_argument("--recompute", action="store_true", help="ignore the results already saved under --out")
    args = parser.parse_args()
    main(args.out, args.quick, args.models, args.recompute)
