"""Shared pieces of the benchmarks: the models on digits and an alternating timer."""

from __future__ import annotations

import platform
import random
import statistics
import time
from collections.abc import Callable

import torch

from flowsim import data, models


def digits_model(kind: str, dtype: torch.dtype, seed: int = 0):
    """The benchmark models on all 1,797 digits: an MLP 64-128-128-10 and a VGG-style CNN."""
    X, y = data.digits()
    torch.manual_seed(seed)
    model = models.mlp.mlp(depth=2, width=128) if kind == "mlp" else models.cnn.vgg(depth=2, width=16)
    return model.to(dtype), X.to(dtype), y


def plain_backward(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The plain PyTorch baseline: ``zero_grad(set_to_none=True)``, forward, cross-entropy, backward."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(X), y).backward()

    return step


def alternate(candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Time each candidate `repeats` times, interleaved so that machine noise hits all alike:
    every round runs each candidate once, in a fresh (seeded) random order, so that none
    always follows the same one."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order, shuffle = list(candidates), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return times


def report(times: dict[str, list[float]], baseline: str, unit: float = 1e3, label: str = "ms") -> None:
    """Median and IQR of each candidate, and its ratio to `baseline`: the median over rounds
    of the ratio within a round (paired, so that load drifting between rounds cancels)."""
    base = times[baseline]
    for name, ts in times.items():
        med = statistics.median(ts)
        q1, _, q3 = statistics.quantiles(ts, n=4)
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"  {name:<34} median {med * unit:9.3f} {label}  (IQR {q1 * unit:.3f}–{q3 * unit:.3f})  ratio {ratio:5.2f}×")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
