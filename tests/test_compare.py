"""fs.compare and `flowsim compare`: errors between two runs at matched times."""

import numpy as np
import pytest
import xarray as xr

import flowsim as fs
from flowsim.cli import main
from flowsim.integrators import ODE

from conftest import build_problem, roundoff

ACCURATE = ODE("dopri5", rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def runs():
    """Gradient flow and full-batch GD (η = 0.1) from the same start, saved at t = 0, 0.2, …, 1."""
    problem = build_problem("mlp", n=32, activation="tanh")
    common = dict(t1=1.0, save_every=0.2, observe=("loss", "params"), progress=False)
    flow = fs.simulate(problem, fs.GradientFlow(), ACCURATE, **common)
    sgd = fs.simulate(problem, fs.DiscreteSGD(lr=0.1), **common)
    return flow, sgd


def test_errors_at_matched_times(runs):
    flow, sgd = runs
    errors = fs.compare(flow, sgd)
    assert errors.sizes == {"time": 6, "quantity": flow.sizes["quantity"]}
    np.testing.assert_allclose(errors.time.values, sgd.time.values)
    np.testing.assert_array_equal(errors.value_diff.values, flow.value.values - sgd.value.values)
    np.testing.assert_array_equal(errors.loss_diff.values, flow.loss.values - sgd.loss.values)
    distance = np.linalg.norm(flow.params.values - sgd.params.values, axis=1)
    # compare's own np.linalg.norm of the same differences (equal here), which may sum the P
    # squares in another order (another memory layout after aligning): roundoff(P) of Σx², a
    # sum of positive terms (a wrong pairing of times or a missing root is off by O(1))
    np.testing.assert_allclose(errors.param_distance.values, distance, rtol=roundoff(n_ops=flow.sizes["parameter"]))
    assert errors.param_distance[0] == 0 and (errors.param_distance[1:] > 0).all()  # same start, then apart
    np.testing.assert_allclose(errors.max_value_error.values, errors.value_error.max("quantity").values)
    assert set(errors.law.values) == set(flow.law.values)
    assert "GradientFlow" in errors.attrs["a_dynamics"] and "DiscreteSGD" in errors.attrs["b_dynamics"]
    # a run against itself: every error is zero
    itself = fs.compare(sgd, sgd)
    assert float(abs(itself.value_diff).max()) == 0 and float(itself.param_distance.max()) == 0


def test_times_that_do_not_match_are_refused_unless_inner(runs):
    flow, sgd = runs
    with pytest.raises(fs.RecordError, match="different times.*join='inner'"):
        fs.compare(flow.isel(time=slice(0, None, 2)), sgd)
    inner = fs.compare(flow.isel(time=slice(0, None, 2)), sgd, join="inner")
    np.testing.assert_allclose(inner.time.values, [0.0, 0.4, 0.8])
    np.testing.assert_array_equal(inner.value_diff.values, flow.value.values[::2] - sgd.value.values[::2])
    with pytest.raises(fs.RecordError, match="no save time"):
        fs.compare(flow.isel(time=[1]), sgd.isel(time=[2]), join="inner")
    with pytest.raises(fs.ConfigError, match="compare.join"):
        fs.compare(flow, sgd, join="outer")


def test_different_schemas_are_refused(runs):
    flow, sgd = runs
    with pytest.raises(fs.RecordError, match="different laws"):
        fs.compare(flow.isel(quantity=slice(1, None)), sgd)
    with pytest.raises(fs.RecordError, match="no 'value'"):
        fs.compare(flow.drop_vars("value"), sgd)
    other = flow.isel(parameter=slice(1, None))
    with pytest.raises(fs.RecordError, match="parameters"):
        fs.compare(other, sgd)
    # without params on one side there is no parameter distance, the rest is compared
    assert "param_distance" not in fs.compare(flow.drop_vars("params"), sgd)


def test_cli_compare(runs, tmp_path, capsys):
    flow, sgd = runs
    flow.to_zarr(tmp_path / "flow.zarr", zarr_format=2)
    sgd.to_netcdf(tmp_path / "sgd.nc")
    assert main(["compare", str(tmp_path / "flow.zarr"), str(tmp_path / "sgd.nc"), "-o", str(tmp_path / "err.nc")]) == 0
    out = capsys.readouterr().out
    assert "GradientFlow" in out and "6 matched" in out and "translation" in out and "|θ_a − θ_b|" in out
    saved = xr.open_dataset(tmp_path / "err.nc")
    np.testing.assert_allclose(saved.param_distance.values, fs.compare(flow, sgd).param_distance.values)
    sgd.isel(time=slice(0, 3)).to_netcdf(tmp_path / "short.nc")
    assert main(["compare", str(tmp_path / "flow.zarr"), str(tmp_path / "short.nc")]) == 2
    assert "different times" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "flow.zarr"), str(tmp_path / "short.nc"), "--join", "inner"]) == 0
    assert main(["compare", str(tmp_path / "flow.zarr"), str(tmp_path / "missing.zarr")]) == 2
