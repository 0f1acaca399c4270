"""Gradient flow conserves every detected law (float64, dopri5)."""

import warnings

import pytest
import torch

import flowsim as fs
from flowsim.integrators import ODE

from conftest import build_problem

TIGHT = ODE("dopri5", rtol=1e-10, atol=1e-10)


def max_drift(ds) -> float:
    assert ds.attrs["status"] == "completed", ds.attrs["status_message"]
    return float(abs(ds.flowsim.drift()).max())


@pytest.mark.parametrize(
    "name, args",
    [
        ("mlp", {}),
        ("cnn", {"pool_every": 0}),
        ("cnn", {"pool_every": 0, "batch_norm": True, "bn_eps": 1e-12}),
    ],
    ids=["mlp", "cnn", "cnn_bn"],
)
def test_laws_conserved_to_1e_7_at_tight_tolerance(name, args):
    """dopri5 at rtol=atol=1e-10 to t=1 on networks whose flow is smooth (identity activations,
    no max-pool): every law kind stays within 1e-7 of its start, relative to its scale."""
    problem = build_problem(name, n=64, activation="identity", **args)
    ds = fs.simulate(problem, fs.GradientFlow(), TIGHT, t1=1.0, save_every=0.25, progress=False)
    assert float(ds.loss[-1]) < float(ds.loss[0])  # it trains
    assert set(ds.law.values) >= ({"scale", "rescale", "translation"} if "batch_norm" in args else {"rescale", "translation"})
    assert max_drift(ds) < 1e-7


def test_relu_laws_conserved_to_1e_7():
    """ReLU flows are non-smooth: where a pre-activation slides along the kink, an adaptive
    solver at rtol=1e-10 crawls with tiny steps (README, "Non-smooth flows"). At rtol=1e-8 the
    same 1e-7 bound holds on a ReLU MLP."""
    problem = build_problem("mlp", n=128)
    ds = fs.simulate(problem, fs.GradientFlow(), ODE("dopri5", rtol=1e-8, atol=1e-8), t1=1.0, save_every=0.5, progress=False)
    assert max_drift(ds) < 1e-7


def test_weight_decay_breaks_the_laws():
    problem = build_problem("mlp", n=64, weight_decay=0.1, activation="identity")
    ds = fs.simulate(problem, fs.GradientFlow(), ODE("dopri5", rtol=1e-9, atol=1e-9), t1=1.0, save_every=0.5, progress=False)
    translation = ds.value.where(ds.law == "translation", drop=True)
    # Σ_k W[k, j] obeys s' = −λ s exactly under gradient flow with weight decay
    ratio = translation.isel(time=-1) / translation.isel(time=0)
    assert float(abs(ratio - torch.exp(torch.tensor(-0.1)).item()).max()) < 1e-7


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "bosh3", "adaptive_heun", "dopri8"])
def test_every_torchdiffeq_method_runs(method):
    problem = build_problem("mlp", n=32)
    integrator = (
        ODE(method, rtol=1e-6, atol=1e-6) if method in ("bosh3", "adaptive_heun", "dopri8") else ODE(method, step_size=0.05)
    )
    ds = fs.simulate(problem, fs.GradientFlow(), integrator, t1=0.2, save_every=0.1, progress=False)
    assert ds.attrs["status"] == "completed" and ds.sizes["time"] == 3
    assert (ds.nfe.diff("time") > 0).all() and (ds.step.diff("time") >= 0).all()
    if method == "rk4":
        assert list(ds.nfe.values) == [0, 8, 16] and list(ds.step.values) == [0, 2, 4]  # 4 stages a step


def test_float32_with_a_tolerance_it_cannot_reach_is_refused():
    problem = build_problem("mlp", n=16)
    tight = ODE("dopri5", rtol=1e-10, atol=1e-10, options={"max_num_steps": 2})
    with pytest.raises(fs.ConfigError, match="integrator.rtol: got 1e-10; expected at least 9.5e-07 in float32"):
        fs.simulate(problem, fs.GradientFlow(), tight, t1=0.1, save_every=0.1, dtype=torch.float32, progress=False)


def test_step_size_collapse_ends_the_run_as_diverged():
    problem = build_problem("mlp", n=16)
    integrator = ODE("dopri5", rtol=1e-12, atol=1e-12, options={"max_num_steps": 3})
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ds = fs.simulate(problem, fs.GradientFlow(), integrator, t1=1.0, save_every=0.5, progress=False)
    assert ds.attrs["status"] == "diverged" and "max_num_steps" in ds.attrs["status_message"]
    assert ds.sizes["time"] >= 1 and float(ds.time[0]) == 0.0
