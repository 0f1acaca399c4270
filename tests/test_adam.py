"""DiscreteAdam is PyTorch's Adam (and AdamW), bit for bit; it resumes bit for bit, reads from a
config, refuses bad hyper-parameters naming them, and records the laws (also as an ensemble)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

import flowsim as fs
from flowsim import record
from flowsim.checkpoint import checkpoint_path
from flowsim.ensemble import initial_members

from conftest import build_problem, relative, roundoff

STEPS = 20


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_every_step_is_torch_optim_adam_bit_for_bit(decoupled):
    """θ at each of 20 steps (mini-batches of 16 of 64 digits: five epochs, weight decay 1e-2)
    equals ``torch.optim.Adam(foreach=False)`` (``AdamW`` when decoupled) stepping one flat
    parameter on the same batches' gradients: the same ops in the same order on the same
    numbers, so ``torch.equal`` (Adam's and AdamW's first steps already differ by 2e-2 here).
    The gradients are flowsim's (``Problem.loss_and_grad``), so what is checked is the update; a
    plain loop over the model's own parameters gave the same bits too (measured, not asserted:
    kernels may round otherwise at other addresses, as test_discrete_sgd says)."""
    problem = build_problem("mlp", n=64, weight_decay=1e-2)
    dynamics = fs.DiscreteAdam(lr=0.01, batch_size=16, decoupled=decoupled)
    dt = dynamics.time_step
    ds = fs.simulate(problem, dynamics, t1=STEPS * dt, save_every=dt, observe=("params",), seed=3, progress=False)
    assert list(ds.step.values) == list(range(STEPS + 1))
    bound = problem.to(dtype=torch.float64)
    param = torch.nn.Parameter(bound.initial_theta().clone())
    optimizer = (torch.optim.AdamW if decoupled else torch.optim.Adam)(
        [param], lr=0.01, weight_decay=problem.weight_decay, foreach=False
    )
    for k in range(STEPS + 1):
        assert torch.equal(torch.as_tensor(ds.params.values[k]), param.detach()), k
        if k < STEPS:
            param.grad = bound.loss_and_grad(param.detach(), dynamics.batch(bound, k, seed=3))[1]
            optimizer.step()
    assert float(abs(ds.params[-1] - ds.params[0]).max()) > 1e-2  # it moved


def test_records_the_velocity_of_each_step():
    """value, grad_sq and velocity_sq are recorded and finite, and v is the velocity of the step:
    θ_{k+1} = θ_k − η v_{k+1} (AdamW: v = m̂/(√ŝ + ε) + λθ_k), so a translation law, a sum of
    K = 10 entries, moves by −η times its form of v. To round-off: per entry θ_{k+1} rounds 4
    times (θ(1 − ηλ), then addcdiv's division, product and sum) and v 3 more (its division by
    1 − β₁ⁿ, λθ and the sum), ε/2 each of at most |θ| + |ηv|; the law's forms of θ_k, θ_{k+1}
    and v are sums of K terms (ε each): 3.5K + 3K ≤ 9K, roundoff(9K) of the magnitude
    Σ_j |θ_j| + Σ_j |ηv_j| (the latter from the record as Σ_j |θ_{k+1} − θ_k|_j) at its largest
    over the run. A velocity of another step, or without the bias correction, is off by ≥ 1e-2."""
    problem = build_problem("mlp", n=32, weight_decay=1e-2)
    lr = 0.01
    ds = fs.simulate(problem, fs.DiscreteAdam(lr=lr, decoupled=True), t1=10 * lr, save_every=lr, observe=("params",), progress=False)
    for name in ("value", "grad_sq", "velocity_sq"):
        assert name in ds and np.isfinite(ds[name].values).all(), name
    translation = (ds.law == "translation").values
    assert translation.any()
    moved = ds.value.values[1:, translation] - ds.value.values[:-1, translation]
    law_set = fs.laws.LawSet(fs.laws.detect(problem.model), problem.names, problem.shapes)
    theta = torch.as_tensor(ds.params.values)
    magnitude = law_set.magnitude(theta[:-1].T).T + law_set.magnitude((theta[1:] - theta[:-1]).T).T
    bound = roundoff(n_ops=9 * 10) * float(magnitude[:, translation].max())
    assert np.abs(moved + lr * ds.velocity_sq.values[:-1, translation]).max() < bound


def test_adam_breaks_the_translation_laws_without_weight_decay():
    """At λ = 0 the gradient is orthogonal to a translation law's direction d, so GD keeps dᵀθ
    (tests/test_discrete_sgd.py); Adam's per-entry scaling m̂/(√ŝ + ε) is not: in 5 full-batch
    steps the law moves by 0.2 of its magnitude (measured), far above round-off (≤ 1e-15)."""
    problem = build_problem("mlp", n=32)
    ds = fs.simulate(problem, fs.DiscreteAdam(lr=0.01), t1=0.05, save_every=0.01, observe=("params",), progress=False)
    translation = (ds.law == "translation").values
    law_set = fs.laws.LawSet(fs.laws.detect(problem.model), problem.names, problem.shapes)
    magnitude = law_set.magnitude(torch.as_tensor(ds.params.values).T).T[:, translation].max(0).values
    drift = np.abs(ds.value.values[:, translation] - ds.value.values[0, translation]).max(0) / magnitude.numpy()
    assert drift.max() > 1e-2


def _interrupt_at(monkeypatch, n: int) -> None:
    """Ctrl-C while recording the n-th save point of the next run."""
    original, calls = record.Recorder.add, [0]

    def add(self, point, wall_time):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return original(self, point, wall_time)

    monkeypatch.setattr(record.Recorder, "add", add)


def _same(a: xr.Dataset, b: xr.Dataset) -> None:
    """Identical Datasets (values bit for bit, coords, attrs), wall_time aside."""
    xr.testing.assert_identical(a.drop_vars("wall_time"), b.drop_vars("wall_time"))


def test_ctrl_c_then_resume_is_bit_for_bit(tmp_path, monkeypatch):
    """Stopped at the 6th save point and resumed from the checkpoint (θ and both moments; the
    step count is the loop's), the record is the uninterrupted run's, bit for bit."""
    problem = build_problem("mlp", n=64, weight_decay=1e-3, depth=1, width=8)
    dynamics = fs.DiscreteAdam(lr=0.05, batch_size=16)
    run = lambda **kw: fs.simulate(problem, dynamics, t1=0.6, save_every=0.05, progress=False, **kw)  # noqa: E731
    reference = run()
    out = tmp_path / "run.zarr"
    _interrupt_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run(out=out, checkpoint_every=1000.0)  # no periodic checkpoint: the one at Ctrl-C
    monkeypatch.undo()
    stopped = fs.open_record(out)
    assert stopped.attrs["status"] == "interrupted" and checkpoint_path(out).exists()
    assert set(torch.load(checkpoint_path(out), weights_only=True)["integrator"]["state"]) == {"theta", "exp_avg", "exp_avg_sq"}
    _same(run(out=out, resume=True), reference)
    assert not checkpoint_path(out).exists()


def test_config_round_trip(tmp_path, monkeypatch):
    """[dynamics] name = "DiscreteAdam" builds the dynamics of its keys; the run equals the
    same run from Python; the record's dynamics attribute builds that dynamics again."""
    monkeypatch.chdir(tmp_path)
    text = """
[model]
name = "mlp.mlp"
depth = 1
width = 8
[data]
name = "digits"
n_train = 32
[problem]
weight_decay = 1e-3
[dynamics]
name = "DiscreteAdam"
lr = 0.05
beta1 = 0.8
beta2 = 0.99
eps = 1e-6
batch_size = 8
sampling = "independent"
decoupled = true
[run]
t1 = 0.25
save_every = 0.05
seed = 4
progress = false
"""
    expected = fs.DiscreteAdam(lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6, batch_size=8, sampling="independent", decoupled=True)
    config = fs.load_config(text)
    assert config.dynamics == expected
    ds = config.simulate()
    direct = fs.simulate(config.problem, expected, t1=0.25, save_every=0.05, seed=4, progress=False)
    xr.testing.assert_identical(ds.drop_vars("wall_time"), direct.drop_vars("wall_time").assign_attrs(ds.attrs))
    described = json.loads(ds.attrs["dynamics"])
    assert described.pop("name") == "DiscreteAdam"
    assert fs.DiscreteAdam(**described) == expected
    assert float(ds.lr) == 0.05 and int(ds.batch_size) == 8


@pytest.mark.parametrize(
    "args, field",
    [
        ({"lr": 0.0}, "dynamics.lr"),
        ({"lr": -0.1}, "dynamics.lr"),
        ({"lr": float("nan")}, "dynamics.lr"),
        ({"beta1": 1.0}, "dynamics.beta1"),
        ({"beta1": -0.1}, "dynamics.beta1"),
        ({"beta2": 1.0}, "dynamics.beta2"),
        ({"beta2": float("inf")}, "dynamics.beta2"),
        ({"beta2": "0.9"}, "dynamics.beta2"),
        ({"eps": 0.0}, "dynamics.eps"),
        ({"eps": -1e-8}, "dynamics.eps"),
        ({"batch_size": 0}, "dynamics.batch_size"),
        ({"batch_size": 2.5}, "dynamics.batch_size"),
        ({"sampling": "bootstrap"}, "dynamics.sampling"),
        ({"decoupled": 1}, "dynamics.decoupled"),
    ],
)
def test_bad_hyper_parameters_name_their_field(args, field):
    with pytest.raises(fs.ConfigError, match=f"^{field}:"):
        fs.DiscreteAdam(**{"lr": 0.1, **args})


def test_batch_larger_than_the_data_is_refused():
    with pytest.raises(fs.ConfigError, match="^dynamics.batch_size:"):
        fs.simulate(build_problem("mlp", n=16, width=4), fs.DiscreteAdam(lr=0.1, batch_size=17), t1=0.2, save_every=0.1, progress=False)


def test_ensemble_equals_separate_runs():
    """Two members moved at once (one batched gradient) each follow the run started alone from
    their θ0, to 1e-10 relative, with a `member` dimension on every law. The members' gradients
    differ from single ones by round-off (≈ 3e-13 of |g|, tests/test_ensemble.py); Adam's step
    η m̂/(√ŝ + ε) is invariant to the gradients' scale, so a relative error of its inputs stays
    relative, save for entries with |ĝ| ≲ ε, where 1/ε could amplify it (none here: measured
    ≤ 2e-15 on every variable). Not a bound at round-off; a member moved with the other's θ0
    is off by ≥ 1e-3 (checked below)."""
    problem = build_problem(n=32, weight_decay=1e-3, width=6)
    dynamics = fs.DiscreteAdam(lr=0.01, batch_size=8)
    observe = ("loss", "grad_norm", "params")
    ds = fs.simulate(problem, dynamics, t1=0.06, save_every=0.02, ensemble=2, observe=observe, progress=False)
    assert ds.attrs["status"] == "completed" and ds.sizes["member"] == 2
    for name in ("value", "grad_sq", "velocity_sq"):
        assert ds[name].dims == ("time", "member", "quantity") and np.isfinite(ds[name].values).all(), name
    theta0 = initial_members(problem.to(dtype=torch.float64), 2, seed=0)
    alone = []
    for k in range(2):
        single = problem.to(dtype=torch.float64)
        single.load_into_model(theta0[k])
        alone.append(fs.simulate(single, dynamics, t1=0.06, save_every=0.02, observe=observe, progress=False))
        for name in ("params", "value", "grad_sq", "velocity_sq", "loss", "grad_norm"):
            assert relative(ds[name].isel(member=k).values, alone[k][name].values) < 1e-10, (k, name)
    assert relative(ds.params.isel(member=0).values, alone[1].params.values) > 1e-3
