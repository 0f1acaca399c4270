"""SGD against the SGD-noise SDE on digits: mean and spread of the loss and of each law kind.

    python studies/sgd_vs_sde.py [--out out/sgd_vs_sde] [--seeds 64] [--paths 64] [--cnn] [--quick]

From one θ0 of a small MLP (64-32-32-10, ReLU) on 256 digits, for η in {0.05, 0.1, 0.2}:

- SGD, batch 32, over `seeds` seeds, batches drawn independently each step (the SGD the SDE
  models, DiscreteSGD(sampling="independent")) and, for contrast, reshuffled each epoch;
- SGDNoise over `paths` paths (FusedEulerMaruyama, dt = η/4): gradient and modified drift with
  exact noise, and the gradient drift with diagonal noise (at η = 0.1 only: it needs every
  per-example gradient at every step).

`--cnn` adds the small CNN (VGG depth 2, width 8, BatchNorm with eps 1e-12, so it has scale
laws) at η = 0.1, without diagonal noise: with BatchNorm the per-example gradients are the
full N × P Jacobian, N backward passes per step.
Writes one .nc per run (members along `path`; SGD seeds are stored as paths), a figure per
model and η, and table.md (rewritten after every case): weak errors at t = 2 against
independent-batch SGD, each with its Monte-Carlo standard error. About 15 minutes with --cnn on
a busy 2-core machine (`--quick`: 16 seeds and paths, η = 0.1 only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402

import flowsim as fs  # noqa: E402
from flowsim import data, models  # noqa: E402
from flowsim.integrators import FusedEulerMaruyama  # noqa: E402

BATCH, T1, SAVE = 32, 2.0, 0.2
#: label -> (colour, line style, file name)
STYLE = {
    "SGD (independent batches)": ("k", "-", "sgd_independent"),
    "SGD (epoch reshuffling)": ("0.5", ":", "sgd_epoch"),
    "SDE gradient drift, exact noise": ("C0", "-", "sde_gradient_exact"),
    "SDE modified drift, exact noise": ("C1", "--", "sde_modified_exact"),
    "SDE gradient drift, diagonal noise": ("C3", "-.", "sde_gradient_diagonal"),
}


def problem_for(model_name: str) -> fs.Problem:
    X, y = data.digits(n_train=256, seed=0)
    torch.manual_seed(0)
    if model_name == "mlp":
        model = models.mlp.mlp(depth=2, width=32)
    else:
        model = models.cnn.vgg(depth=2, width=8, batch_norm=True, bn_eps=1e-12)
    return fs.Problem(model, (X, y))


def sgd_runs(problem: fs.Problem, lr: float, sampling: str, seeds: int) -> xr.Dataset:
    """DiscreteSGD over `seeds` seeds, stacked along `path` like the SDE's paths."""
    runs = [
        fs.simulate(
            problem, fs.DiscreteSGD(lr=lr, batch_size=BATCH, sampling=sampling), t1=T1, save_every=SAVE, seed=s, progress=False
        )
        for s in range(seeds)
    ]
    stacked = xr.concat([r.drop_vars(["seed", "grad_sq", "grad_norm", "nfe", "wall_time"]) for r in runs], dim="path")
    return stacked.assign_coords(path=np.arange(seeds)).transpose("time", "path", ...)


def sde_run(problem: fs.Problem, lr: float, drift: str, noise: str, paths: int) -> xr.Dataset:
    dynamics = fs.SGDNoise(lr=lr, batch_size=BATCH, drift=drift, noise=noise, paths=paths)
    return fs.simulate(problem, dynamics, FusedEulerMaruyama(dt=lr / 4), t1=T1, save_every=SAVE, progress=False)


def rms_drift(ds: xr.Dataset, kind: str) -> xr.DataArray:
    """Root-mean-square relative drift (Q(t) − Q(0)) / scale over the components of one law kind."""
    drift = ds.flowsim.drift().where(ds.law == kind, drop=True)
    return np.sqrt((drift**2).mean("quantity"))


def weak_errors(sde: xr.Dataset, sgd: xr.Dataset) -> dict[str, tuple[float, float]]:
    """At t1: |E_SDE − E_SGD| of the loss and, per law kind, the largest over components of
    |E_SDE[Q] − E_SGD[Q]| / scale; each with the Monte-Carlo standard error of the difference."""
    out = {}
    a, b = sde.isel(time=-1), sgd.isel(time=-1)
    se = lambda x, y: np.sqrt(x.var("path") / x.sizes["path"] + y.var("path") / y.sizes["path"])  # noqa: E731
    out["loss"] = (float(abs(a.loss.mean("path") - b.loss.mean("path"))), float(se(a.loss, b.loss)))
    scale = sgd.scale.where(sgd.scale > 0, 1.0)
    for kind in dict.fromkeys(sgd.law.values.tolist()):
        pick = sgd.law == kind
        diff = abs(a.value.mean("path") - b.value.mean("path")).where(pick, drop=True) / scale.where(pick, drop=True)
        errors = se(a.value, b.value).where(pick, drop=True) / scale.where(pick, drop=True)
        worst = int(np.argmax(diff.values))
        out[kind] = (float(diff[worst]), float(errors[worst]))
    out["loss sd ratio"] = (float(a.loss.std("path") / b.loss.std("path")), float("nan"))
    return out


def figure(runs: dict[str, xr.Dataset], title: str, path: Path) -> None:
    reference = next(iter(runs.values()))
    kinds = list(dict.fromkeys(reference.law.values.tolist()))
    fig, axes = plt.subplots(1, 1 + len(kinds), figsize=(4.2 * (1 + len(kinds)), 3.6))
    for label, ds in runs.items():
        color, line, _ = STYLE[label]
        for ax, band in zip(axes, [ds.flowsim.band("loss")] + [ds.flowsim.band(rms_drift(ds, k)) for k in kinds]):
            band = band if ax is axes[0] else band.isel(time=slice(1, None))  # no drift at t = 0
            t = band.time.values
            ax.fill_between(t, band["low"].values, band["high"].values, color=color, alpha=0.12, lw=0)
            ax.plot(t, band["mean"].values, line, color=color, label=label)
    axes[0].set(title="loss: mean and 5–95% band", xlabel="t = k·η", ylabel="loss")
    for ax, kind in zip(axes[1:], kinds):
        ax.set(title=f"{kind} laws", xlabel="t = k·η", ylabel="RMS relative drift", yscale="log")
        ax.set_ylim(bottom=1e-17)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out: Path, seeds: int, paths: int, cnn: bool, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny problems: one thread is faster
    rates = (0.1,) if quick else (0.05, 0.1, 0.2)
    cases = [("mlp", lr) for lr in rates] + ([("cnn", 0.1)] if cnn else [])
    rows = []
    for model_name, lr in cases:
        start = time.perf_counter()
        problem = problem_for(model_name)
        runs = {
            "SGD (independent batches)": sgd_runs(problem, lr, "independent", seeds),
            "SGD (epoch reshuffling)": sgd_runs(problem, lr, "epoch", seeds),
            "SDE gradient drift, exact noise": sde_run(problem, lr, "gradient", "exact", paths),
            "SDE modified drift, exact noise": sde_run(problem, lr, "modified", "exact", paths),
        }
        if lr == 0.1 and not problem.batch_coupled:
            runs["SDE gradient drift, diagonal noise"] = sde_run(problem, lr, "gradient", "diagonal", paths)
        name = f"{model_name}_lr{lr:g}"
        for label, ds in runs.items():
            ds.to_netcdf(out / f"{name}_{STYLE[label][2]}.nc")
        figure(
            runs,
            f"{model_name.upper()} on 256 digits, η = {lr:g}, S = {BATCH}: {seeds} SGD seeds, {paths} SDE paths",
            out / f"{name}.png",
        )
        reference = runs["SGD (independent batches)"]
        for label, ds in runs.items():
            if label != "SGD (independent batches)":
                rows.append((model_name, lr, label, weak_errors(ds, reference)))
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        (out / "table.md").write_text(markdown_table(rows))
    print((out / "table.md").read_text())
    print(f"wrote {out}/*.png, *.nc and table.md")


def markdown_table(rows) -> str:
    kinds = list(dict.fromkeys(k for *_, errors in rows for k in errors if k not in ("loss", "loss sd ratio")))
    head = "| model | η | against independent-batch SGD | loss | " + " | ".join(kinds) + " | loss sd ratio |\n"
    head += "|---" * (5 + len(kinds)) + "|\n"
    lines = []
    for model_name, lr, label, errors in rows:
        cells = [f"{errors[k][0]:.2e} ± {errors[k][1]:.0e}" if k in errors else "–" for k in ["loss", *kinds]]
        lines.append(f"| {model_name} | {lr:g} | {label} | " + " | ".join(cells) + f" | {errors['loss sd ratio'][0]:.2f} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/sgd_vs_sde"))
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--paths", type=int, default=64)
    parser.add_argument("--cnn", action="store_true", help="add the small CNN with BatchNorm at η = 0.1")
    parser.add_argument("--quick", action="store_true", help="16 seeds and paths, η = 0.1 only")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.paths = 16, 16
    main(args.out, args.seeds, args.paths, args.cnn, args.quick)
