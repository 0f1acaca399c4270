"""Ensembles: K members moved at once by vmap equal K runs of their own."""

from __future__ import annotations

import pytest
import torch
from conftest import build_problem, gradient_condition, relative, roundoff, sum_lengths

import flowsim as fs
from flowsim.ensemble import Ensemble, StackedLayers, initial_members
from flowsim.integrators import ODE

K = 4
CASES = {
    "gradient_flow_rk4": (fs.GradientFlow(), ODE("rk4", step_size=0.1), 0.4, 0.2),
    "modified_flow_rk4": (fs.ModifiedFlow(lr=0.1), ODE("rk4", step_size=0.1), 0.4, 0.2),
    "sgd_momentum_minibatch": (fs.DiscreteSGD(lr=0.1, batch_size=8, momentum=0.9), None, 1.0, 0.5),
}


@pytest.mark.parametrize("case", CASES)
def test_ensemble_equals_separate_runs(case):
    """Every member's record equals the run started alone from its θ0 (float64, 1e-10 relative).

    The members' gradients are one batched (vmap/GEMM) evaluation against K single ones: each
    differs by roundoff(sum_lengths, gradient_condition) ≈ 3e-13 of |g| (see
    test_stacked_layers_equal_vmap), entering θ as h·δg per stage over n ≤ 10 steps: ≤ 3e-12,
    ×1/(1 − β) = 10 where heavy ball sums past gradients, 3e-11; 1e-10 leaves ×3 for growth
    through negative curvature over those steps (|ηλ_min| ≪ 1 here). Not a bound at round-off
    (it is 1e4 above the measured 8.6e-15); a member moved with another's θ0, batches or data
    is off by ≥ 1e-3 (checked below)."""
    dynamics, integrator, t1, save_every = CASES[case]
    problem = build_problem(n=32, weight_decay=1e-3, width=6)
    observe = ("loss", "grad_norm", "params")
    ds = fs.simulate(problem, dynamics, integrator, t1=t1, save_every=save_every, ensemble=K, observe=observe, progress=False)
    assert ds.value.dims == ("time", "member", "quantity") and ds.sizes["member"] == K
    assert ds.attrs["status"] == "completed" and ds.attrs["ensemble"] == K
    theta0 = initial_members(problem.to(dtype=torch.float64), K, seed=0)
    assert relative(theta0[0], problem.initial_theta().double()) == 0.0
    assert min(relative(theta0[i], theta0[j]) for i in range(K) for j in range(i)) > 0.1  # distinct draws
    for k in range(K):
        alone = problem.to(dtype=torch.float64)
        alone.load_into_model(theta0[k])
        one = fs.simulate(alone, dynamics, integrator, t1=t1, save_every=save_every, observe=observe, progress=False)
        assert one.sizes["time"] == ds.sizes["time"] >= 3
        for name in ("params", "value", "grad_sq", "loss", "grad_norm"):
            assert relative(ds[name].isel(member=k).values, one[name].values) < 1e-10, (k, name)
        assert float(abs(one.params[-1] - one.params[0]).max()) > 1e-3  # the members moved


def test_ensemble_initial_parameters_given():
    """A (K, P) tensor is used as the members' θ0 as it is (here: scaled copies of one init)."""
    problem = build_problem(n=16, width=4)
    theta = problem.initial_theta().double()
    start = torch.stack([theta, 0.5 * theta])
    ds = fs.simulate(problem, fs.GradientFlow(), ODE("euler", step_size=0.1), t1=0.2, save_every=0.1, ensemble=start, observe=("params",), progress=False)
    assert relative(ds.params.isel(time=0).values, start) == 0.0


def test_error_norm_is_worst_member():
    """The adaptive solver's norm for an ensemble is the largest member RMS, not the RMS of all."""
    problem = build_problem(n=16, width=4)
    ensemble = Ensemble(problem, 3)
    ratio = torch.zeros(3, problem.n_params, dtype=problem.dtype)
    ratio[1] = 2.0
    assert float(ensemble.error_norm(ratio)) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "dynamics, ensemble, field",
    [
        (fs.GradientFlow(), 0, "run.ensemble"),
        (fs.GradientFlow(), torch.zeros(2, 3), "run.ensemble"),
        (fs.SGDNoise(lr=0.1, batch_size=4), 2, "run.ensemble"),
    ],
)
def test_bad_ensemble_refused(tmp_path, dynamics, ensemble, field):
    problem = build_problem(n=16, width=4)
    out = tmp_path / "run.zarr"
    with pytest.raises(fs.ConfigError, match=field):
        fs.simulate(problem, dynamics, t1=0.1, save_every=0.1, ensemble=ensemble, out=out, progress=False)
    assert not out.exists()


def test_member_seeds_draw_their_own_batches():
    """With member_seeds, member k equals the run of its own with seed s_k: its own θ0 and its
    own mini-batch order (float64, 1e-10 relative, as test_ensemble_equals_separate_runs); the
    seed coordinate runs along member."""
    problem = build_problem(n=32, width=6)
    dynamics, seeds = fs.DiscreteSGD(lr=0.1, batch_size=8, momentum=0.9), [5, 2, 7]
    theta0 = initial_members(problem.to(dtype=torch.float64), len(seeds), seed=0)
    run = dict(t1=1.0, save_every=0.5, observe=("loss", "params"), progress=False)
    ds = fs.simulate(problem, dynamics, ensemble=theta0, member_seeds=seeds, **run)
    assert ds.seed.dims == ("member",) and list(ds.seed.values) == seeds
    for k, seed in enumerate(seeds):
        alone = problem.to(dtype=torch.float64)
        alone.load_into_model(theta0[k])
        one = fs.simulate(alone, dynamics, seed=seed, **run)
        for name in ("params", "value", "loss"):
            assert relative(ds[name].isel(member=k).values, one[name].values) < 1e-10, (k, name)
        other = fs.simulate(alone, dynamics, seed=seed + 1, **run)  # the batch order matters here
        assert relative(ds.params.isel(member=k, time=-1).values, other.params.isel(time=-1).values) > 1e-3
    with pytest.raises(fs.ConfigError, match="run.member_seeds"):
        fs.simulate(problem, dynamics, ensemble=2, member_seeds=[1, 2, 3], **run)


def test_stacked_layers_equal_vmap():
    """The MLP's hand-batched forward pass (first layer one GEMM over the members) gives the
    losses, gradients and Hessian-vector products of the vmap path, shared or per-member batches:
    the same sums in other orders, within roundoff(n_ops = sum_lengths, cond) (conftest; twice
    the lengths for the double backward of an HVP), cond = the members' worst gradient_condition
    (1 would do for the losses): ~3e-13. A wrong member's weights or batch is off by O(1)."""
    problem = build_problem(n=32, width=6).to(dtype=torch.float64)
    theta = initial_members(problem, K, seed=0)
    stacked, vmapped = Ensemble(problem, K), Ensemble(problem, K)
    vmapped.stacked = None
    assert isinstance(stacked.stacked, StackedLayers)
    index = torch.stack([torch.randperm(32, generator=torch.Generator().manual_seed(k))[:8] for k in range(K)])
    condition = max(gradient_condition(problem, member) for member in theta)
    bound = roundoff(n_ops=sum_lengths(problem), cond=condition)
    for batch in (None, index[0], index):
        for a, b in zip(stacked.loss_and_grad(theta, batch), vmapped.loss_and_grad(theta, batch)):
            assert relative(a, b) < bound
    for a, b in zip(stacked.loss_grad_hvp(theta, shift=0.1), vmapped.loss_grad_hvp(theta, shift=0.1)):
        assert relative(a, b) < 2 * bound
    assert StackedLayers.of(build_problem("cnn", n=16)) is None  # convolutions: vmap


def test_ensemble_of_a_cnn_equals_separate_runs():
    """A network StackedLayers does not batch (convolutions, pooling) goes through vmap: still each
    member's own run (1e-10 relative, as test_ensemble_equals_separate_runs)."""
    problem = build_problem("cnn", n=16)
    assert Ensemble(problem, 2).stacked is None
    run = dict(t1=0.2, save_every=0.1, observe=("loss", "params"), progress=False)
    integrator = ODE("rk4", step_size=0.05)
    ds = fs.simulate(problem, fs.GradientFlow(), integrator, ensemble=2, **run)
    theta0 = initial_members(problem.to(dtype=torch.float64), 2, seed=0)
    for k in range(2):
        alone = problem.to(dtype=torch.float64)
        alone.load_into_model(theta0[k])
        one = fs.simulate(alone, fs.GradientFlow(), integrator, **run)
        for name in ("params", "value", "loss"):
            assert relative(ds[name].isel(member=k).values, one[name].values) < 1e-10, (k, name)
        assert float(abs(one.params[-1] - one.params[0]).max()) > 1e-4  # the members moved
