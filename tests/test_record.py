"""The record: schema, metadata, zarr and netCDF round trips, streaming."""

import json
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

import flowsim as fs

from conftest import build_problem


@pytest.fixture(scope="module")
def sgd_record(tmp_path_factory):
    problem = build_problem("cnn", n=64, weight_decay=1e-3, batch_norm=True)
    out = tmp_path_factory.mktemp("run") / "sgd.zarr"
    ds = fs.simulate(
        problem,
        fs.DiscreteSGD(lr=0.1, batch_size=16, momentum=0.9),
        t1=1.0,
        save_every=0.1,
        out=out,
        observe=("loss", "grad_norm", "sharpness"),
        progress=False,
    )
    return ds, out


def test_schema(sgd_record):
    ds, _ = sgd_record
    assert set(ds.dims) == {"time", "quantity"}
    assert {"value", "grad_sq", "velocity_sq", "loss", "grad_norm", "sharpness", "nfe", "wall_time"} <= set(ds.data_vars)
    assert ds.value.dims == ("time", "quantity") and ds.loss.dims == ("time",)
    for coord in ("step", "law", "site", "component", "exact", "scale"):
        assert coord in ds.coords
    assert ds.time.attrs["units"] == "t = step * lr"
    for name, var in ds.variables.items():
        assert "long_name" in var.attrs, name
    # scalar coords carry what varies between runs
    assert (
        float(ds.lr) == 0.1
        and int(ds.batch_size) == 16
        and float(ds.momentum) == 0.9
        and float(ds.weight_decay) == 1e-3
        and int(ds.seed) == 0
    )
    for key in (
        "flowsim_version",
        "torch_version",
        "problem",
        "dynamics",
        "integrator",
        "seed",
        "device",
        "dtype",
        "status",
        "status_message",
        "config",
    ):
        assert key in ds.attrs, key
    assert all(isinstance(v, (str, int, float)) for v in ds.attrs.values())
    assert json.loads(ds.attrs["dynamics"])["name"] == "DiscreteSGD"
    assert ds.attrs["status"] == "completed" and ds.attrs["dtype"] == "float64"
    assert not ds.exact.sel(quantity=ds.law == "scale").any() and ds.exact.sel(quantity=ds.law == "rescale").all()
    assert (ds.sharpness > 0).all()


def test_zarr_round_trip_without_flowsim(sgd_record):
    ds, out = sgd_record
    xr.testing.assert_identical(xr.open_zarr(out).load(), ds)
    script = f"import sys, xarray as xr; ds = xr.open_zarr({str(out)!r}); assert 'flowsim' not in sys.modules; print(ds.sizes['time'], ds.attrs['status'])"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["11", "completed"]


def test_netcdf_round_trip(tmp_path):
    problem = build_problem("mlp", n=32)
    out = tmp_path / "gf.nc"
    ds = fs.simulate(problem, fs.GradientFlow(), t1=0.5, save_every=0.1, out=out, observe=("loss", "params"), progress=False)
    back = xr.open_dataset(out).load()
    xr.testing.assert_identical(back, ds)
    assert back.exact.dtype == bool and back.params.shape == (6, problem.n_params)
    assert not (tmp_path / "gf.nc.tmp").exists()


def test_zarr_is_appended_as_the_run_goes(tmp_path, monkeypatch):
    """With a flush every 3 save points, the store's written rows grow during the run; its
    arrays grow with them (doubling, within the save grid), so plain xarray reads at most twice
    the rows written, and host memory holds only the rows not yet written."""
    from flowsim import record, store

    sizes, allocated, held = [], [], []
    original = store.ZarrStore.write

    def spy(self, *args):
        original(self, *args)
        sizes.append(fs.open_record(self.path).sizes["time"])  # the rows written so far
        allocated.append(xr.open_zarr(self.path).sizes["time"])

    original_flush = record.Recorder.flush

    def flush_spy(self):
        original_flush(self)
        held.append(sum(len(c) for column in self.columns.values() for c in column))

    monkeypatch.setattr(store.ZarrStore, "write", spy)
    monkeypatch.setattr(record.Recorder, "flush", flush_spy)
    original_init = record.Recorder.__init__

    def flush_every_three(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.flush_every = 3

    monkeypatch.setattr(record.Recorder, "__init__", flush_every_three)
    out = tmp_path / "stream.zarr"
    ds = fs.simulate(build_problem("mlp", n=32), fs.DiscreteSGD(lr=0.1), t1=1.0, save_every=0.1, out=out, progress=False)
    assert sizes == [3, 6, 9, 11]
    assert allocated == [3, 6, 11, 11]  # 3, doubled to 6, doubled to 12 but the grid has 11
    assert max(held) == 0  # every flush moved its rows to the store
    xr.testing.assert_identical(xr.open_zarr(out).load(), ds)


def test_accessor_drift_summary_and_plot(sgd_record, tmp_path):
    ds, _ = sgd_record
    drift = ds.flowsim.drift()
    assert drift.dims == ("time", "quantity") and float(abs(drift.isel(time=0)).max()) == 0
    summary = ds.flowsim.summary()
    assert sorted(summary.law.values) == ["rescale", "scale", "translation"]  # in the order detection finds them
    assert int(summary.components.sum()) == ds.sizes["quantity"]
    fig = ds.flowsim.plot(tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and len(fig.axes) == 4


def test_open_record_refuses_what_is_not_a_record(tmp_path):
    with pytest.raises(fs.RecordError, match="does not exist"):
        fs.open_record(tmp_path / "missing.zarr")
    bad = tmp_path / "bad.nc"
    bad.write_text("not netcdf")
    with pytest.raises(fs.RecordError, match="not a readable"):
        fs.open_record(bad)


def test_wall_time_and_nfe_grow(sgd_record):
    ds, _ = sgd_record
    assert (np.diff(ds.wall_time.values) >= 0).all() and (np.diff(ds.nfe.values) > 0).all()
