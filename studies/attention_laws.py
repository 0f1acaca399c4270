"""Attention laws: a transformer block on the sequence task, and the count of every law.

1. Gradient flow (dopri5 at rtol = atol = 1e-6 and 1e-8, float64; the block's ReLU makes the
   flow non-smooth, so tighter tolerances crawl, README "Non-smooth flows"): the attention laws
   (attention_qk, attention_vo per head, the key-bias translation) and every other detected
   law stay within integration tolerance.
2. SGD at a fixed time T: the relative drift of the attention laws falls like η (each step
   adds η² (G_q G_qᵀ − G_k G_kᵀ), T/η steps): the slope of log drift against log η, fitted
   over the learning rates, is ≈ 1.
3. The count of every law (``fs.laws.count``, D − dim Lie(W)(θ), at three random points with
   every ReLU unit mixed: ``counts``) against the rank of the detected ones, for a small
   instance of every zoo model: complete = True where detection finds them all (it now builds
   the residual stream's rescale and shift laws too). Where the points disagree the count is
   not decided.
4. At scale, block by block (``fs.laws.count_blocks``, the submodule theorem): a conv ResNet
   stage of 128 blocks (~1.5e5 parameters) and a 6-block pre-norm transformer, each block
   counted alone, the laws across blocks (the stream's) from detection, with wall times.

    nice -n 10 python studies/attention_laws.py [--out out/attention_laws]

Prints four markdown tables and writes them to OUT/attention_laws.md. About 5 minutes of one
CPU core (the at-scale rows about 2 of them) (torch runs single-threaded here: on small models threads only contend).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import flowsim as fs
from flowsim import data, models
from flowsim.integrators import ODE

ATTENTION = ["attention_qk", "attention_vo"]
LRS = [0.2, 0.1, 0.05, 0.025, 0.0125]
T = 1.0
SEEDS = 3


def model_is_small(model: torch.nn.Module) -> bool:
    return sum(p.numel() for p in model.parameters()) <= 1000


def transformer_problem() -> fs.Problem:
    X, y = data.sequences(n=32, length=6, vocab=6, seed=0)
    torch.manual_seed(0)
    model = models.attention.transformer(vocab=6, length=6, width=8, heads=2, hidden=8, num_classes=6)
    return fs.Problem(model, (X, y))


def drift_by_kind(ds) -> dict[str, float]:
    """max |relative drift| per law kind over the record, and of the attention laws at its end."""
    summary = ds.flowsim.summary()
    out = {str(k): float(summary.max_drift.sel(law=k)) for k in summary.law.values}
    drift = ds.flowsim.drift().isel(time=-1)
    out["attention at T"] = float(abs(drift.where(drift.law.isin(ATTENTION), drop=True)).max())
    return out


def gradient_flow(problem: fs.Problem) -> list[str]:
    lines = ["| rtol = atol | loss(0) | loss(T) | " + " | ".join(["attention_qk", "attention_vo", "translation", "rescale"]) + " | wall s |"]
    lines.append("|" + "---|" * 8)
    for tol in (1e-6, 1e-8):
        start = time.perf_counter()
        ds = fs.simulate(problem, fs.GradientFlow(), ODE("dopri5", rtol=tol, atol=tol), t1=T, save_every=T / 4, dtype=torch.float64, progress=False)
        drift = drift_by_kind(ds)
        cells = [f"{drift.get(k, float('nan')):.1e}" for k in ["attention_qk", "attention_vo", "translation", "rescale"]]
        lines.append(f"| {tol:g} | {float(ds.loss[0]):.4f} | {float(ds.loss[-1]):.4f} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |")
    return lines


def sgd_drift(problem: fs.Problem) -> list[str]:
    drifts = []
    lines = ["| η | steps | loss(T) | attention drift at T |", "|---|---|---|---|"]
    for lr in LRS:
        ds = fs.simulate(problem, fs.DiscreteSGD(lr=lr, batch_size=16), t1=T, save_every=T, dtype=torch.float64, seed=0, progress=False)
        drifts.append(drift_by_kind(ds)["attention at T"])
        lines.append(f"| {lr:g} | {round(T / lr)} | {float(ds.loss[-1]):.4f} | {drifts[-1]:.3e} |")
    slope = np.polyfit(np.log(LRS), np.log(drifts), 1)[0]
    lines.append(f"\nlog-log slope of the attention drift at T={T:g} against η over {len(LRS)} learning rates: **{slope:.2f}**")
    return lines


def zoo() -> dict[str, tuple[torch.nn.Module, torch.Tensor, str]]:
    seq, _ = data.sequences(n=8, length=4, vocab=4)
    digits, _ = data.digits(n_train=8)
    torch.manual_seed(0)
    return {
        "mlp.mlp(depth=2, width=6)": (models.mlp.mlp(depth=2, width=6), digits, "cross_entropy"),
        "mlp.mlp(depth=2, width=4, identity)": (models.mlp.mlp(depth=2, width=4, activation="identity"), digits, "cross_entropy"),
        "cnn.vgg(depth=2, width=3)": (models.cnn.vgg(depth=2, width=3), digits, "cross_entropy"),
        "attention.layer(d_model=4, heads=2)": (models.attention.layer(d_model=4, heads=2), torch.randn(8, 3, 4), "mse"),
        "attention.layer(d_model=4, heads=2, bias)": (models.attention.layer(d_model=4, heads=2, bias=True), torch.randn(8, 3, 4), "mse"),
        "attention.block(d_model=4, norm=none)": (models.attention.block(d_model=4, hidden=4, norm="none"), torch.randn(8, 3, 4), "mse"),
        "attention.block(d_model=4, pre, no bias)": (
            models.attention.block(d_model=4, hidden=4, bias=False, ln_eps=0.0),
            torch.randn(8, 3, 4),
            "mse",
        ),
        "attention.block(d_model=4, pre)": (models.attention.block(d_model=4, hidden=4), torch.randn(8, 3, 4), "mse"),
        "attention.transformer(width=4)": (
            models.attention.transformer(vocab=4, length=4, width=4, hidden=4, num_classes=4),
            seq,
            "cross_entropy",
        ),
        "resnet.ResidualMLPBlock(3, 2)": (models.resnet.ResidualMLPBlock(3, 2), torch.randn(8, 3), "mse"),
        "resnet.ResidualBlock(2, 2)": (models.resnet.ResidualBlock(2, 2), torch.randn(8, 2, 4, 4), "mse"),
        "resnet.residual_mlp(depth=2, width=4)": (models.resnet.residual_mlp(depth=2, width=4, hidden=3), digits, "cross_entropy"),
        "resnet.resnet(width=2)": (models.resnet.resnet(width=2, stages=2), digits, "cross_entropy"),
        "transformer(width=16) (bounds only)": (models.attention.transformer(vocab=4, length=4, width=16, hidden=32, num_classes=4), seq, "cross_entropy"),
    }


def counts() -> list[str]:
    lines = ["| model | D | laws (D − dim Lie) per point | first-order bound | detected (rank) | complete | wall s |", "|" + "---|" * 7]
    for name, (model, X, loss) in zoo().items():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = fs.laws.count(model, X, loss=loss, points=SEEDS)
        laws = ", ".join("—" if c is None else str(c) for c in result.counts)
        lines.append(
            f"| {name} | {result.n_params} | {laws} | {result.first_order_bound} | {result.n_known} | {result.complete} | {time.perf_counter() - start:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def at_scale() -> dict[str, tuple[torch.nn.Module, torch.Tensor, str, dict]]:
    seq, _ = data.sequences(n=8, length=6, vocab=6)
    digits, _ = data.digits(n_train=8)
    torch.manual_seed(0)
    return {
        "resnet(width=8, stages=1, blocks_per_stage=128)": (
            models.resnet.resnet(width=8, stages=1, blocks_per_stage=128),
            digits,
            "cross_entropy",
            {"max_params": 1200},  # a block has 1168 parameters
        ),
        "transformer(width=8, hidden=8, depth=6)": (
            models.attention.transformer(vocab=6, length=6, width=8, heads=2, hidden=8, depth=6, num_classes=6),
            seq,
            "cross_entropy",
            {},
        ),
    }


def block_counts() -> list[str]:
    lines = [
        "| model | D | blocks × parameters | laws per block (per point) | detected per block | blocks complete | stream laws | laws accounted for | wall s |",
        "|" + "---|" * 9,
    ]
    for name, (model, X, loss, options) in at_scale().items():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = fs.laws.count_blocks(model, X, loss, points=SEEDS, **options)
        sizes = sorted({b.n_params for b in result.blocks})
        first = result.blocks[0]
        per_point = ", ".join("—" if c is None else str(c) for c in first.counts)
        laws = sorted({b.n_laws for b in result.blocks}, key=str)
        known = sorted({b.n_known for b in result.blocks}, key=str)
        lines.append(
            f"| {name} | {result.n_params} | {len(result.blocks)} × {', '.join(map(str, sizes))} | {', '.join(map(str, laws))} ({per_point}) | "
            f"{', '.join(map(str, known))} | {result.complete} | {result.n_stream} | {result.n_laws} | {time.perf_counter() - start:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small models on a shared machine: threads only contend
    problem = transformer_problem()
    sections = [
        f"Transformer (1 pre-norm block, width 8, 2 heads, {problem.n_params} parameters) on sequences (32 × 6 tokens, 6 classes).",
        f"\n**Gradient flow** to T={T:g} (float64, dopri5): max |relative drift| per law kind\n",
        *gradient_flow(problem),
        f"\n**SGD** (batch 16) at T={T:g}: max |relative drift| of the attention laws\n",
        *sgd_drift(problem),
        f"\n**Counts** (float64; ``count(points={SEEDS})``: seeds 0–{SEEDS - 1}, one value per point)\n",
        *counts(),
        "\n**At scale, block by block** (``count_blocks``: each block counted alone at the same three points, "
        "identical blocks once; stream laws: the detected laws of the whole model beyond the blocks' own)\n",
        *block_counts(),
    ]
    text = "\n".join(sections)
    (out / "attention_laws.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/attention_laws"))
    main(parser.parse_args().out)
