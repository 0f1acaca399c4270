"""Quickstart: gradient flow and SGD from the same start on digits, a small CNN with BatchNorm.

Under gradient flow every law holds (flat lines); SGD breaks them, and by how much it breaks
the scale laws is exactly η² Σ_k |g_A,k|² (the discrete recursion, DESIGN §5).

    python studies/quickstart.py [--out out/quickstart]

Writes gradient_flow.zarr, sgd.zarr and quickstart.png. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import flowsim as fs  # noqa: E402
from flowsim import data, models  # noqa: E402
from flowsim.integrators import ODE  # noqa: E402

LR, BATCH, T1 = 0.1, 32, 4.0


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    X, y = data.digits(n_train=512, seed=0)
    torch.manual_seed(0)
    model = models.cnn.vgg(depth=2, width=8, batch_norm=True, bn_eps=1e-12)  # eps breaks the scale law
    problem = fs.Problem(model, (X, y))  # both runs start from this model's parameters
    gf = fs.simulate(
        problem,
        fs.GradientFlow(),
        ODE("dopri5", rtol=1e-7, atol=1e-7),
        t1=T1,
        save_every=0.1,
        out=out / "gradient_flow.zarr",
        overwrite=True,
    )
    sgd = fs.simulate(
        problem, fs.DiscreteSGD(lr=LR, batch_size=BATCH), t1=T1, save_every=LR, out=out / "sgd.zarr", overwrite=True
    )
    figure(gf, sgd, out / "quickstart.png")

    lr, lam = LR, 0.0
    h, gsq = sgd.value.values, sgd.grad_sq.values
    quadratic = sgd.law.values != "translation"
    recursion = np.abs((1 - lr * lam) ** 2 * h[:-1, quadratic] + lr**2 * gsq[:-1, quadratic] - h[1:, quadratic])
    print(f"loss at t={T1:g}: gradient flow {float(gf.loss[-1]):.4f}, SGD {float(sgd.loss[-1]):.4f}")
    print("max relative drift per law kind (gradient flow | SGD):")
    for kind in gf.flowsim.summary().law.values:
        print(
            f"  {kind:<12} {float(gf.flowsim.summary().max_drift.sel(law=kind)):.2e} | {float(sgd.flowsim.summary().max_drift.sel(law=kind)):.2e}"
        )
    print(
        f"SGD scale/rescale laws against h_(k+1) = h_k + η² grad_sq_k: max error {float((recursion / sgd.scale.values[quadratic]).max()):.1e} (relative)"
    )
    print(f"wrote {out}/gradient_flow.zarr, {out}/sgd.zarr, {out}/quickstart.png")


def figure(gf, sgd, path: Path) -> None:
    kinds = list(dict.fromkeys(gf.law.values.tolist()))
    fig, axes = plt.subplots(1, 1 + len(kinds), figsize=(4 * (1 + len(kinds)), 3.4))
    axes[0].plot(gf.time, gf.loss, label="gradient flow")
    axes[0].plot(sgd.time, sgd.loss, ".", ms=3, label=f"SGD η={LR}, S={BATCH}")
    axes[0].set(xlabel="t = k·η", ylabel="loss", yscale="log", title="loss")
    axes[0].legend(fontsize=8)
    for ax, kind in zip(axes[1:], kinds):
        for ds, style, label in ((gf, "-", "gradient flow"), (sgd, ".", "SGD")):
            drift = ds.flowsim.drift().where(ds.law == kind, drop=True)
            ax.plot(ds.time, drift.values, style, lw=0.8, ms=1.5, color="C0" if ds is gf else "C1", alpha=0.6)
            ax.plot([], [], style, color="C0" if ds is gf else "C1", label=label)
        ax.set(xlabel="t = k·η", ylabel="(Q(t) − Q(0)) / scale", title=f"{kind} laws")
        ax.legend(fontsize=8)
    fig.suptitle("Symmetry laws: conserved by gradient flow, broken by SGD (CNN + BatchNorm, digits)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/quickstart"))
    main(parser.parse_args().out)
