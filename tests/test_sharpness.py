"""The sharpness observer: the top k Hessian eigenvalues by warm-started Lanczos (flowsim.spectrum),
against the explicit Hessian; its warm start; members; resume; bad input."""

import numpy as np
import pytest
import torch

import flowsim as fs
from flowsim import record
from flowsim.spectrum import HessianOperator, top_eigenpairs

from conftest import roundoff, sum_lengths
from test_errors import GOOD
from test_resume import interrupt_at, same


def tanh_problem(seed: int = 0) -> fs.Problem:
    """A tanh MLP 64-8-10 (610 parameters) on 64 digits, mse on one-hot labels, float64."""
    X, y = fs.data.digits(n_train=64, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fs.models.mlp.mlp(depth=1, width=8, activation="tanh").double()
    return fs.Problem(model, (X, torch.nn.functional.one_hot(y, 10).double()), loss="mse")


def explicit_hessian(problem: fs.Problem, theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.hessian(lambda t: problem.per_example_losses(t).mean(), theta)


GD = {"t1": 3.0, "save_every": 1.0, "progress": False}  # 30 full-batch GD steps, 4 save points


@pytest.fixture(scope="module")
def gd_run():
    """GD at lr 0.1 with the top 3 eigenvalues and θ recorded at 4 save points."""
    problem = tanh_problem()
    return problem, fs.simulate(problem, fs.DiscreteSGD(lr=0.1), observe=("sharpness:3", "params"), **GD)


def test_top_k_equal_the_explicit_hessian(gd_run):
    """At every save point the recorded λ_1 ≥ λ_2 ≥ λ_3 equal the top 3 eigenvalues of the explicit
    Hessian (torch.autograd.functional.hessian, eigvalsh) to 1e-8 relative. Why that holds: the
    solver stops at a residual ‖Hv − θv‖ ≤ 1e-8·|θ|, which puts an eigenvalue within 1e-8·|θ| of θ
    (Bauer–Fike); the two Hessians differ by round-off, at most roundoff(P + the network's sums)·‖H‖
    (eigvalsh is backward stable). A missed or wrong eigenvalue is off by the gaps, ≥ 1e-3 here."""
    problem, ds = gd_run
    assert ds.sharpness.dims == ("time", "eigen") and list(ds.eigen.values) == [0, 1, 2]
    tol = record.sharpness_tolerance(torch.float64)
    assert tol == 1e-8
    for j in range(ds.sizes["time"]):
        theta = torch.as_tensor(ds.params.values[j])
        exact = torch.linalg.eigvalsh(explicit_hessian(problem, theta)).flip(0)
        recorded = torch.as_tensor(ds.sharpness.values[j])
        bound = tol * exact[:3].abs() + roundoff(n_ops=problem.n_params + sum_lengths(problem)) * exact.abs().max()
        assert ((recorded - exact[:3]).abs() <= bound).all(), (j, recorded, exact[:3])
        assert float(((recorded - exact[:3]).abs() / exact[:3].abs()).max()) <= 1e-8
        assert float((exact[:3] - exact[1:4]).min()) > 1e-3  # the gaps the docstring counts on


def test_warm_start_takes_fewer_products_than_a_cold_start(gd_run):
    """Each save point after the first starts from the last one's Ritz vectors: it takes fewer
    Hessian-vector products (recorded in ``sharpness_matvecs``) than the same solve from the
    seeded random block of the first save point, at the same θ, to the same tolerance."""
    problem, ds = gd_run
    matvecs = ds.sharpness_matvecs.values
    cold_start = torch.randn(problem.n_params, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for j in range(1, ds.sizes["time"]):
        theta = torch.as_tensor(ds.params.values[j])
        cold = top_eigenpairs(HessianOperator(problem, theta), cold_start, 3, tol=record.sharpness_tolerance(theta.dtype))
        assert cold.converged and matvecs[j] < cold.matvecs, (j, matvecs[j], cold.matvecs)
        np.testing.assert_allclose(cold.values.numpy(), ds.sharpness.values[j], rtol=2e-8)
    assert matvecs[0] > matvecs[1:].max()  # the first save point is the cold start


def test_k_1_keeps_the_one_variable_and_members_get_their_own():
    """ "sharpness" alone is the largest eigenvalue along time; an ensemble records each member's
    top 2 (time, member, eigen), each equal to its own explicit Hessian's."""
    problem = tanh_problem()
    ds = fs.simulate(problem, fs.DiscreteSGD(lr=0.1), observe=("sharpness",), t1=0.2, save_every=0.1, progress=False)
    assert ds.sharpness.dims == ("time",) and "eigen" not in ds.dims
    both = fs.simulate(
        problem,
        fs.GradientFlow(),
        fs.integrators.ODE("euler", step_size=0.1),
        t1=0.2,
        save_every=0.1,
        ensemble=2,
        observe=("sharpness:2", "params"),
        progress=False,
    )
    assert both.sharpness.dims == ("time", "member", "eigen") and both.sharpness_matvecs.dims == ("time", "member")
    for member in range(2):
        theta = torch.as_tensor(both.params.values[-1, member])
        exact = torch.linalg.eigvalsh(explicit_hessian(problem, theta)).flip(0)[:2].numpy()
        np.testing.assert_allclose(both.sharpness.values[-1, member], exact, rtol=1e-8)
    assert not np.allclose(both.sharpness.values[-1, 0], both.sharpness.values[-1, 1])  # two members, two spectra


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    """A run stopped (Ctrl-C) at its 4th save point and resumed equals the uninterrupted one bit for bit:
    the checkpoint carries the eigen-solver's subspace, so the resumed save points start from
    the same block as the uninterrupted run's."""
    problem = tanh_problem()
    args = dict(observe=("sharpness:2",), t1=0.5, save_every=0.1, progress=False)
    whole = fs.simulate(problem, fs.DiscreteSGD(lr=0.1), **args)
    out = tmp_path / "run.zarr"
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        fs.simulate(problem, fs.DiscreteSGD(lr=0.1), out=out, checkpoint_every=1000.0, **args)  # the checkpoint at Ctrl-C
    monkeypatch.undo()
    stopped = fs.open_record(out)
    assert stopped.attrs["status"] == "interrupted" and stopped.sizes["time"] == 3
    resumed = fs.simulate(problem, fs.DiscreteSGD(lr=0.1), out=out, resume=True, **args)
    same(resumed, whole.assign_attrs(resumed.attrs))


def test_observe_names_and_toml():
    """ "sharpness:k" from Python and from a TOML config; malformed names are ConfigErrors naming run.observe."""
    assert record.check_observe(["loss", "sharpness:1"]) == ("loss", "sharpness")
    assert record.check_observe(["sharpness:4"]) == ("sharpness:4",) and record.sharpness_k(["sharpness:4"]) == 4
    for bad in (["sharpness:0"], ["sharpness:two"], ["sharpness:"], ["sharpness", "sharpness:2"], ["sharpness:-1"]):
        with pytest.raises(fs.ConfigError, match="run.observe"):
            record.check_observe(bad)
    ds = fs.run_config(GOOD.replace("save_every = 0.1", 'save_every = 0.5\nobserve = ["loss", "sharpness:2"]'), progress=False)
    assert ds.sharpness.dims == ("time", "eigen") and (ds.sharpness.diff("eigen") <= 0).all()
    with pytest.raises(fs.ConfigError, match="run.observe"):
        fs.simulate(tanh_problem(), fs.DiscreteSGD(lr=0.1), observe=("sharpness:611",), t1=0.1, save_every=0.1, progress=False)


def test_spectrum_refuses_bad_input_before_any_product():
    calls = []

    def matvec(v):
        calls.append(v)
        return v

    good = torch.randn(10, 3, dtype=torch.float64)
    for kwargs, field in [
        ({"start": good, "k": 0}, "k"),
        ({"start": good, "k": 4}, "start"),
        ({"start": good[:, 0], "k": 1}, "start"),
        ({"start": torch.full((10, 3), float("nan")), "k": 1}, "start"),
        ({"start": good, "k": 1, "tol": 0.0}, "tol"),
        ({"start": good, "k": 1, "max_basis": 2}, "max_basis"),
    ]:
        with pytest.raises(fs.ConfigError, match=field):
            top_eigenpairs(matvec, **kwargs)
    assert not calls


def test_spectrum_on_a_known_spectrum():
    """A diagonal operator with eigenvalues 100, 99, …, −99 (indefinite, the top ones clustered):
    the top 4 to the tolerance, orthonormal eigenvectors, and a warm start from the answer
    converges at once (one block of products)."""
    eigenvalues = torch.arange(100.0, -100.0, -1.0, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    start = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    found = top_eigenpairs(lambda v: matrix @ v, start, 4, tol=1e-10)
    assert found.converged
    assert float((found.values - eigenvalues[:4]).abs().max()) <= 1e-10 * 100 + roundoff(n_ops=200) * 100
    assert float((found.vectors.T @ found.vectors - torch.eye(4, dtype=torch.float64)).abs().max()) <= roundoff(n_ops=200 * 4)
    again = top_eigenpairs(lambda v: matrix @ v, found.subspace, 4, tol=1e-10)
    assert again.converged and again.matvecs == 6
