"""Shared fixtures: small problems on real digits, built fresh for every test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowsim as fs
from flowsim import data, models


def build_problem(model_name: str = "mlp", n: int = 64, weight_decay: float = 0.0, seed: int = 0, **model_args) -> fs.Problem:
    """A zoo model on `n` digits, its parameters drawn from `seed`."""
    X, y = data.digits(n_train=n, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_name == "mlp":
            model = models.mlp.mlp(**{"depth": 2, "width": 8, **model_args})
        else:
            model = models.cnn.vgg(**{"depth": 2, "width": 4, **model_args})
    return fs.Problem(model, (X, y), weight_decay=weight_decay)


def slope(x, y) -> float:
    """The least-squares slope of log y against log x: a measured order of convergence."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def relative(a, b) -> float:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test problem is tiny: one torch thread is faster than two, and many times faster
    when the cores are shared (a second OpenMP thread only spins)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")
