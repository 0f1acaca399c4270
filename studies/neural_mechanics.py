"""Neural Mechanics (Kunin et al., ICLR 2021) on digits: the broken laws follow their predictions.

A VGG-style CNN (``models.cnn.vgg``, 3 conv blocks of 8 channels, with and without BatchNorm)
is trained by PyTorch's SGD (float64 by default, float32 with ``--dtype float32``) with batch
64, weight decay λ ∈ {0, 1e-4, 5e-4, 1e-3} and momentum β ∈ {0, 0.9, 0.99}, recording every step. For each run ``flowsim.theory.predict``
gives the exact discrete recursion and the continuous solution (first order without momentum,
in both rate variants; the damped oscillator with it), and the study tabulates the largest
error of each against the measured laws, relative to each component's range over the run.

η is 0.1 for β = 0 and 0.9 and 0.01 for β = 0.99 (the largest stable: at 0.1 the effective step
η/(1−β) = 10 diverges). The run is long enough that the weight decay acts: β = 0 runs
10,000 steps (λt = 1 at λ = 1e-3); with momentum the laws decay at λ/(1−β) per unit time, so
2,000 steps give λt/(1−β) = 2. BatchNorm runs use PyTorch's eps = 1e-5, which breaks the scale
symmetry at order eps/Var; twins at eps = 1e-12 (λ = 1e-3, every β) isolate the error eps adds.

    python studies/neural_mechanics.py [--out out/neural_mechanics] [--dtype float64|float32] [--decays 0 1e-3]
                                       [--momenta 0 0.9] [--only plain|bn] [--quick] [--overwrite] [--table-only]

float64 measures the modelling error of the predictions alone; float32 adds the round-off of
training in single precision, which moves a conserved quantity (a translation law at λ = 0) by
more than its exact range. Writes into ``<out>/<dtype>/`` one record per run
(``<name>.zarr``, reused when complete unless --overwrite), the
table (``table.md``, also printed) and the figure ``neural_mechanics.png``: classifier column
sums (translation), squared channel norms before BatchNorm (scale) and differences of
consecutive layers' squared channel norms (rescale), with the continuous prediction dashed.
The full grid is 27 runs, 126,000 steps: 24–28 minutes per dtype with both dtypes running side
by side on a 2-core machine. ``--decays``/``--momenta``/``--only`` run part of it (the table and
figure then cover what was run); since complete records are reused, parts can run in parallel and a last
call with ``--table-only`` writes the combined table of every complete record. ``--quick``: a fifth of the steps.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402

import flowsim as fs  # noqa: E402
from flowsim import data, models  # noqa: E402

BATCH, DEPTH, WIDTH, SEED = 64, 3, 8, 0
WEIGHT_DECAYS = (0.0, 1e-4, 5e-4, 1e-3)
#: momentum β -> (learning rate η, steps)
MOMENTA = {0.0: (0.1, 10_000), 0.9: (0.1, 2_000), 0.99: (0.01, 2_000)}
DEFAULT_EPS, EXACT_EPS = 1e-5, 1e-12
#: the setting the figure shows
FIGURE_DECAY = 1e-3


def run(
    out: Path,
    batch_norm: bool,
    lam: float,
    beta: float,
    eps: float,
    dtype: str,
    quick: bool,
    overwrite: bool,
    table_only: bool = False,
) -> xr.Dataset | None:
    """One training run, every step recorded (reused from `out` when complete; None if it is
    not and `table_only`)."""
    lr, steps = MOMENTA[beta]
    steps = steps // 5 if quick else steps
    name = f"{'bn' if batch_norm else 'plain'}_eps{eps:g}_wd{lam:g}_m{beta:g}" if batch_norm else f"plain_wd{lam:g}_m{beta:g}"
    path = out / f"{name}.zarr"
    if path.exists() and not overwrite:
        ds = fs.open_record(path)
        if ds.attrs.get("status") == "completed" and int(ds.step[-1]) == steps:
            return ds
    if table_only:
        return None
    X, y = data.digits()
    torch.manual_seed(SEED)  # the same initial CNN for every setting
    model = models.cnn.vgg(depth=DEPTH, width=WIDTH, batch_norm=batch_norm, bn_eps=eps)
    problem = fs.Problem(model, (X, y), weight_decay=lam)
    dynamics = fs.DiscreteSGD(lr=lr, batch_size=BATCH, momentum=beta)
    print(f"  {name}: {steps} steps at η = {lr:g}", flush=True)
    return fs.simulate(
        problem, dynamics, t1=steps * lr, save_every=lr, seed=SEED, observe=(), dtype=dtype, out=path, overwrite=True
    )


def errors(ds: xr.Dataset) -> dict[str, float | str]:
    """Largest error of each prediction kind over time and components. "continuous − discrete"
    compares the continuous solution with the exact recursion instead of the measurement: the
    modelling error alone, free of the round-off both share against the record."""
    discrete = fs.theory.predict(ds, "discrete")
    out = {
        "discrete / value": float(fs.theory.error(discrete, "value").max()),
        "discrete / range": float(fs.theory.error(discrete).max()),
    }
    rates = ("modified",) if float(ds.momentum) else ("modified", "leading")
    for rate in rates:
        continuous = fs.theory.predict(ds, "continuous", rate=rate)
        e = fs.theory.error(continuous)
        out[f"continuous {rate} / range"] = float(e.max())
        if rate == "modified":
            kinds = dict.fromkeys(ds.law.values.tolist())
            out["continuous modified / range, per law"] = ", ".join(f"{k} {float(e.where(ds.law == k).max()):.1e}" for k in kinds)
            exact = continuous.assign(value=discrete.theory.astype(ds.value.dtype))
            out["continuous − discrete / range"] = float(fs.theory.error(exact).max())
    return out


COLUMNS = (
    "discrete / value",
    "discrete / range",
    "continuous modified / range",
    "continuous leading / range",
    "continuous − discrete / range",
    "continuous modified / range, per law",
)


def table(rows: list[tuple[str, dict[str, float | str]]]) -> str:
    head = "| setting | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for label, e in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(e.get(c, "—")) for c in COLUMNS) + " |")
    return "\n".join(lines)


def _cell(x: float | str) -> str:
    return f"{x:.1e}" if isinstance(x, float) else x


def label(ds: xr.Dataset, batch_norm: bool, eps: float) -> str:
    bn = f"BN eps={eps:g}" if batch_norm else "no BN"
    return f"{bn}, β={float(ds.momentum):g}, η={float(ds.lr):g}, λ={float(ds.weight_decay):g}, {int(ds.step[-1])} steps"


def figure(records: dict[tuple[bool, float], xr.Dataset], dtype: str, path: Path) -> None:
    """Rows: β. Columns: translation (no BN), scale (BN), rescale (no BN), as in the paper's Fig. 5."""
    panels = (("translation", False, "classifier column sums"), ("scale", True, "squared channel norms before BN"))
    panels += (("rescale", False, "differences of consecutive squared channel norms"),)
    fig, axes = plt.subplots(len(MOMENTA), 3, figsize=(13, 3.2 * len(MOMENTA)), squeeze=False)
    for row, beta in enumerate(MOMENTA):
        for col, (kind, batch_norm, title) in enumerate(panels):
            ax = axes[row, col]
            ds = fs.theory.predict(records[batch_norm, beta], "continuous")
            laws = ds.where(ds.law == kind, drop=True)
            if kind == "translation":  # the 10 largest column sums
                laws = laws.isel(quantity=np.argsort(-abs(laws.value.values[0]))[:10])
            else:  # one layer (scale: the second conv) or one pair of layers (rescale: the first), as the paper
                sites = list(dict.fromkeys(laws.site.values.tolist()))
                laws = laws.where(laws.site == sites[min(1, len(sites) - 1) if kind == "scale" else 0], drop=True)
            t = ds.time.values
            ax.set_prop_cycle(color=plt.cm.viridis(np.linspace(0, 0.9, laws.sizes["quantity"])))
            ax.plot(t, laws.value.values, lw=1.6, alpha=0.8)
            ax.plot(t, laws.theory.values, "k--", lw=0.8)
            ax.plot([], [], "k--", lw=0.7, label="theory (continuous)")
            where = f"{laws.site.values[0]}, " if kind != "translation" else ""
            ax.set_title(f"{kind}: {title}\n{where}{'BN' if batch_norm else 'no BN'}, β={beta:g}, η={float(ds.lr):g}", fontsize=8)
            ax.set_xlabel("t = k·η", fontsize=8)
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Neural mechanics on digits: VGG-style CNN, SGD, batch {BATCH}, λ = {FIGURE_DECAY:g}, {dtype}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(
    out: Path,
    dtype: str,
    decays: tuple[float, ...],
    momenta: tuple[float, ...],
    norms: tuple[bool, ...],
    quick: bool,
    overwrite: bool,
    table_only: bool,
) -> None:
    out = out / dtype
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows, eps_rows, figure_records = [], [], {}
    for batch_norm, beta, lam in itertools.product(norms, momenta, decays):
        ds = run(out, batch_norm, lam, beta, DEFAULT_EPS, dtype, quick, overwrite, table_only)
        if ds is None:
            continue
        rows.append((label(ds, batch_norm, DEFAULT_EPS), errors(ds)))
        if lam == FIGURE_DECAY:
            figure_records[batch_norm, beta] = ds
            exact = run(out, True, lam, beta, EXACT_EPS, dtype, quick, overwrite, table_only) if batch_norm else None
            if exact is not None:
                eps_rows.append((label(ds, True, DEFAULT_EPS), errors(ds), label(exact, True, EXACT_EPS), errors(exact)))
    text = f"Maximum error of each prediction over the run and the law components ({dtype}):\n\n" + table(rows)
    text += "\n\nThe error BatchNorm's eps adds (same runs at eps = 1e-12):\n\n" + table(
        [r for default, e_default, exact, e_exact in eps_rows for r in ((default, e_default), (exact, e_exact))]
    )
    (out / "table.md").write_text(text + "\n")
    print(text)
    if set(figure_records) == set(itertools.product((False, True), MOMENTA)):
        figure(figure_records, dtype, out / "neural_mechanics.png")
        print(f"wrote {out}/neural_mechanics.png")
    print(f"wrote {out}/table.md and one record per run")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/neural_mechanics"))
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="training precision")
    parser.add_argument("--decays", type=float, nargs="+", default=WEIGHT_DECAYS, choices=WEIGHT_DECAYS, help="λ to run")
    parser.add_argument("--momenta", type=float, nargs="+", default=tuple(MOMENTA), choices=tuple(MOMENTA), help="β to run")
    parser.add_argument("--only", choices=("plain", "bn"), help="only the CNN without (plain) or with BatchNorm (bn)")
    parser.add_argument("--quick", action="store_true", help="a fifth of the steps")
    parser.add_argument("--overwrite", action="store_true", help="rerun every setting even if its record is complete")
    parser.add_argument("--table-only", action="store_true", help="no runs: table and figure from the complete records in --out")
    args = parser.parse_args()
    norms = {"plain": (False,), "bn": (True,), None: (False, True)}[args.only]
    main(args.out, args.dtype, tuple(args.decays), tuple(args.momenta), norms, args.quick, args.overwrite, args.table_only)
