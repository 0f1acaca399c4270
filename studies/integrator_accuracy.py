"""Integrator accuracy: how well each flow tracks GD, what each ODE solver pays for accuracy, and
how well each keeps the laws.

On digits, a small tanh MLP and a small tanh CNN without max-pool (smooth: ReLU and max-pool
flows have sliding modes, README, on which a tight-tolerance solver crawls), in float64:

1. Tracking. Full-batch GD at η ∈ {0.4, 0.2, 0.1, 0.05, 0.025} against GradientFlow and
   ModifiedFlow(η); heavy-ball GD (β = 0.9) at η ∈ {0.04, …, 0.0025} (the same effective rate
   η/(1−β)) against MomentumFlow ("rest", "matched") and its reduced first-order form. The
   error is |θ_flow(T) − θ_GD(T)| / |θ_GD(T)| at T = 1.2 (``fs.compare``), on log-log axes with
   least-squares slopes.
2. Work–precision. GradientFlow to T: error against a reference vs the gradient evaluations
   spent, for euler, midpoint, rk4 and GaussLegendre with 1, 2, 3 stages (fixed steps; their
   measured orders, the slopes of log error against log h, in a table), bosh3, dopri5, dopri8
   (torchdiffeq), Exponential (Krogstad), and SciPy's RK45, DOP853, LSODA, Radau, BDF. The
   reference is scipy's DOP853 (Dormand–Prince 8, as dopri8) at rtol = atol = 1e-13:
   torchdiffeq's dopri8 at rtol 1e-12 (the issue's reference) is itself only about 1e-9
   accurate here, so it is one point of the diagram instead. GaussLegendre's evaluations
   include its Jacobian-vector products (Newton–Krylov; none at these steps).
3. Laws. GradientFlow to t = 1 on a ReLU VGG CNN with BatchNorm (eps 1e-12) and max-pool (the
   non-smooth flow the smooth models avoid): every law kind's largest relative drift against
   the evaluations spent and the wall time, for dopri5, rk4, Exponential and GaussLegendre
   (1 and 2 stages) at fixed steps 0.1, 0.05, 0.01.

    python studies/integrator_accuracy.py [--quick] [--models mlp cnn] [--recompute] [--out DIR]

Writes tracking_{mlp,cnn}.nc, work_precision_{mlp,cnn}.nc, laws_relu_cnn.nc, tracking.png,
work_precision.png, laws.png and results.md (the tables in STUDIES.md) under DIR (default
out/integrator_accuracy). A part whose .nc files are already there is read back, not recomputed
(unless --recompute), so a stopped run loses only the part it was on. ``--quick``: 32 examples
and fewer tolerances; the full mode uses 512 examples (128 for the laws).
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
from flowsim.integrators import ODE, Exponential, GaussLegendre, SaveGrid, SciPy  # noqa: E402

T = 1.2  # a whole number of steps at every η below
BETA = 0.9
GD_LRS = (0.4, 0.2, 0.1, 0.05, 0.025)
HB_LRS = tuple(lr * (1 - BETA) for lr in GD_LRS)
FLOW_INTEGRATOR = ODE("dopri5", rtol=1e-8, atol=1e-8)  # the errors measured are ≥ 1e-5
MOMENTUM_INTEGRATOR = Exponential(rtol=1e-8, atol=1e-8)
GAUSS = {1: "GaussLegendre s=1 (midpoint)", 2: "GaussLegendre s=2", 3: "GaussLegendre s=3"}
FIXED = ("euler", "midpoint", "rk4", *GAUSS.values())
T_LAWS = 1.0


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
    out += [(GAUSS[s], f"h={h:g}", GaussLegendre(stages=s, step_size=h)) for s in GAUSS for h in steps]
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
        return end.theta.clone(), end.nfe + end.stats.get("jacobian_products", 0), time.perf_counter() - start

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


# ----------------------------------------------------------------------------------- 3. laws
def relu_cnn(n: int) -> fs.Problem:
    """The non-smooth CNN: VGG depth 2, width 4, BatchNorm (eps 1e-12), ReLU, one 2×2 max-pool."""
    X, y = data.digits(n_train=n, seed=0)
    torch.manual_seed(0)
    return fs.Problem(models.cnn.vgg(depth=2, width=4, batch_norm=True, bn_eps=1e-12), (X, y)).to(dtype=torch.float64)


def law_runs(quick: bool) -> list[tuple[str, str, object]]:
    steps = (0.1, 0.05, 0.01)
    tols = (1e-3, 1e-6) if quick else (1e-3, 1e-6, 1e-8)
    out = [("dopri5", f"rtol={r:g}", ODE("dopri5", rtol=r, atol=r, max_steps=20_000)) for r in tols]
    out += [("Exponential", "rtol=1e-06", Exponential(rtol=1e-6, atol=1e-6))]
    out += [("rk4", f"h={h:g}", ODE("rk4", step_size=h)) for h in steps]
    out += [(GAUSS[s], f"h={h:g}", GaussLegendre(stages=s, step_size=h)) for s in (1, 2) for h in steps]
    return out


def law_drift(problem: fs.Problem, quick: bool) -> xr.Dataset:
    """drift[run, kind]: max |Q(t) − Q(0)| / scale over t ≤ T_LAWS and the components of a kind."""
    rows = []
    for method, setting, integrator in law_runs(quick):
        ds = fs.simulate(problem, fs.GradientFlow(), integrator, t1=T_LAWS, save_every=0.1, progress=False)
        drift = np.abs(ds.flowsim.drift())
        kinds = {kind: float(drift.where(ds.law == kind, drop=True).max()) for kind in ("translation", "rescale", "scale")}
        jvp = int(ds["jacobian_products"][-1]) if "jacobian_products" in ds else 0
        rows.append((method, setting, ds.attrs["status"], float(ds.time[-1]), int(ds.nfe[-1]), jvp, float(ds.wall_time[-1]), float(ds.loss[-1]), kinds))
        print(f"  {method} {setting}: {rows[-1][2]} at t={rows[-1][3]:g}, {rows[-1][4]} evaluations + {jvp} Jacobian products, "
              f"{rows[-1][6]:.1f} s, " + ", ".join(f"{k} {v:.1e}" for k, v in kinds.items()), flush=True)  # fmt: skip
    kinds = list(rows[0][-1])
    return xr.Dataset(
        {
            "drift": (("run", "kind"), np.array([[r[-1][k] for k in kinds] for r in rows])),
            "status": ("run", [r[2] for r in rows]),
            "t_end": ("run", [r[3] for r in rows]),
            "nfe": ("run", [r[4] for r in rows]),
            "jvp": ("run", [r[5] for r in rows]),
            "wall_time": ("run", [r[6] for r in rows]),
            "loss": ("run", [r[7] for r in rows]),
        },
        coords={"method": ("run", [r[0] for r in rows]), "setting": ("run", [r[1] for r in rows]), "kind": kinds},
        attrs={"T": T_LAWS, "n_params": problem.n_params, "n_examples": problem.n_examples, "bn_eps": 1e-12},
    )


def orders(wp: xr.Dataset) -> dict[str, float]:
    """The least-squares slope of log error against log h for every fixed-step method."""
    out = {}
    for method in FIXED:
        sel = wp.where(wp.method == method, drop=True)
        if sel.sizes["run"] > 1:
            h = np.array([float(s.split("=")[1]) for s in sel.setting.values])
            out[method] = slope(h, sel.error.values)
    return out


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


def law_figure(laws: xr.Dataset, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    exact = laws.drift.sel(kind=["translation", "rescale"]).max("kind")
    for ax, drift, title in ((axes[0], exact, "translation and rescale laws (exact)"), (axes[1], laws.drift.sel(kind="scale"), "scale laws (BatchNorm eps = 1e-12)")):
        for method in dict.fromkeys(laws.method.values.tolist()):
            sel = laws.method == method
            cost = (laws.nfe + laws.jvp).where(sel, drop=True)
            ax.loglog(cost, np.maximum(drift.where(sel, drop=True), 1e-17), "o-", ms=4, label=method)
        ax.set(xlabel="evaluations (gradients + Jacobian products)", ylabel=f"largest relative drift, t ≤ {laws.T:g}", title=title)
        ax.legend(fontsize=7)
    fig.suptitle(f"ReLU CNN with BatchNorm and max-pool ({laws.n_params} parameters, {laws.n_examples} digits)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "laws.png", dpi=120)


def law_table(laws: xr.Dataset) -> str:
    lines = [
        "| method | setting | status | evaluations (+ Jacobian products) | wall s | loss at t | translation | rescale | scale |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i in range(laws.sizes["run"]):
        r = laws.isel(run=i)
        status = str(r.status.values) if str(r.status.values) == "completed" else f"{r.status.values} at t={float(r.t_end):g}"
        jvp = f" (+{int(r.jvp)})" if int(r.jvp) else ""
        lines.append(
            f"| {r.method.values} | {r.setting.values} | {status} | {int(r.nfe)}{jvp} | {float(r.wall_time):.1f} | {float(r.loss):.4f} | "
            + " | ".join(f"{float(r.drift.sel(kind=k)):.1e}" for k in ("translation", "rescale", "scale"))
            + " |"
        )
    return "\n".join(lines)


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
    lines += ["", "| model | " + " | ".join(FIXED) + " |", "|---|" + "---|" * len(FIXED)]
    for name, (_, wp) in results.items():
        measured = orders(wp)
        lines.append(f"| {name} | " + " | ".join(f"{measured[m]:.2f}" if m in measured else "–" for m in FIXED) + " |")
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
    path = out / "laws_relu_cnn.nc"
    if not recompute and path.exists():
        print(f"laws: reusing {path}", flush=True)
        laws = xr.load_dataset(path)
    else:
        problem = relu_cnn(32 if quick else 128)
        print(f"laws: ReLU CNN with BatchNorm and max-pool, {problem.n_params} parameters, {problem.n_examples} digits", flush=True)
        laws = law_drift(problem, quick)
        laws.to_netcdf(path)
    figures(results, out)
    law_figure(laws, out)
    text = table(results) + "\n\n" + law_table(laws)
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out}/*.nc, {out}/tracking.png, {out}/work_precision.png, {out}/laws.png, {out}/results.md")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/integrator_accuracy"))
    parser.add_argument("--quick", action="store_true", help="32 examples and fewer tolerances")
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    parser.add_argument("--recompute", action="store_true", help="ignore the results already saved under --out")
    args = parser.parse_args()
    main(args.out, args.quick, args.models, args.recompute)
