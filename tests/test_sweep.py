"""Sweeps on dask.distributed: a LocalCluster of processes, and a scheduler given by address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import flowsim as fs
from conftest import relative
from flowsim import cli
from flowsim.sweeps import parse_over, sweep

distributed = pytest.importorskip("distributed")

#: mse on a teacher-student task: lr 0.5 trains, lr 5 overflows within its 6 steps
CONFIG = """
[model]
name = "mlp.mlp"
depth = 1
width = 4
[data]
name = "teacher_student"
n = 32
in_features = 8
hidden = 8
[problem]
loss = "mse"
[dynamics]
name = "DiscreteSGD"
lr = 0.5
[run]
t1 = 30.0
save_every = 10.0
dtype = "float64"
"""
OVER = {"lr": [0.5, 5.0], "seed": [0, 1]}


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of 2 worker processes, 1 thread each, for the module."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def one_by_one(tmp_path: Path, lr: float, seed: int) -> xr.Dataset:
    text = CONFIG.replace("lr = 0.5", f"lr = {lr}").replace("[run]", f"[run]\nseed = {seed}")
    with pytest.warns(RuntimeWarning) if lr == 5.0 else _nothing():
        return fs.run_config(text, progress=False)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def mtimes(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_sweep_local_cluster(tmp_path, client):
    """2 × 2 (lr × seed) on 2 worker processes: the runs made one by one, lr=5 diverged and
    recorded as such, and a second call does no new work."""
    out = tmp_path / "sweep"
    ds = sweep(CONFIG, over=OVER, client=client, out=out, progress=False)
    assert ds.value.dims == ("lr", "seed", "time", "quantity") and ds.loss.dims == ("lr", "seed", "time")
    assert ds.attrs["runs_executed"] == 4 and len(list(out.glob("*.zarr"))) == 4
    assert (ds.status.sel(lr=0.5) == "completed").all() and (ds.status.sel(lr=5.0) == "diverged").all()
    assert "non-finite" in str(ds.status_message.sel(lr=5.0, seed=0).values)
    for lr in OVER["lr"]:
        for seed in OVER["seed"]:
            alone = one_by_one(tmp_path, lr, seed)
            point = ds.sel(lr=lr, seed=seed).dropna("time", how="all", subset=["loss"])
            assert point.sizes["time"] == alone.sizes["time"]
            for name in ("value", "grad_sq", "loss", "grad_norm"):
                np.testing.assert_array_equal(point[name].values, alone[name].values, err_msg=f"{name} lr={lr} seed={seed}")
            np.testing.assert_array_equal(point.step.values, alone.step.values)
    assert float(ds.loss.sel(lr=0.5, seed=0).isel(time=-1)) < float(ds.loss.sel(lr=0.5, seed=0).isel(time=0))

    before = mtimes(out)
    again = sweep(CONFIG, over=OVER, client=client, out=out, progress=False)
    assert again.attrs["runs_executed"] == 0 and mtimes(out) == before
    xr.testing.assert_equal(again, ds)


def test_sweep_bad_grid_refused_before_work(tmp_path):
    with pytest.raises(fs.ConfigError, match="sweep.over.lr"):
        sweep(CONFIG, over={"lr": []}, out=tmp_path / "a")
    with pytest.raises(fs.ConfigError, match="run.t1"):  # lr = 100 cannot take one step in t1 = 50
        sweep(CONFIG, over={"lr": [0.5, 100.0]}, out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert parse_over(["lr=0.05,0.1", "seed=0:3", "dynamics.sampling=epoch"]) == {
        "lr": [0.05, 0.1],
        "seed": [0, 1, 2],
        "dynamics.sampling": ["epoch"],
    }


def test_sweep_cli_on_separate_scheduler_and_worker(tmp_path, capsys):
    """`dask scheduler` and `dask worker ADDRESS` as their own processes; the CLI gets only the
    address (and runs the two seeds as one ensemble task)."""
    short = CONFIG.replace("t1 = 30.0", "t1 = 20.0")  # 40 steps: this test is about reaching the workers
    config = tmp_path / "run.toml"
    config.write_text(short)
    with socket.socket() as probe:  # a free port, so that scheduler and worker start together
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    dask = [sys.executable, "-m", "dask"]
    scheduler = subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--dashboard-address", ":0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([*dask, "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--preload", "flowsim.sweeps"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = tmp_path / "sweep"
        code = cli.main(["sweep", str(config), "--over", "lr=0.5", "--over", "seed=0:2", "--scheduler", address, "--out", str(out), "--no-progress", "--ensemble-seeds"])
        assert code == 0, capsys.readouterr()
        assert "2 runs: 2 completed (2 run now, 1 ensembles, 0 run again" in capsys.readouterr().out
        # all done (the stores of the ensemble's members are those of plain runs): no cluster needed
        ds = sweep(short, over={"lr": [0.5], "seed": [0, 1]}, out=out, progress=False)
        assert ds.attrs["runs_executed"] == 0 and (ds.status == "completed").all()
        assert (ds.loss.isel(time=-1) < ds.loss.isel(time=0)).all() and ds.sizes["time"] == 3
    finally:
        for process in (worker, scheduler):  # started by this test; no graceful shutdown needed
            process.kill()
            process.wait(30)


#: mini-batch SGD with momentum: the seed gives each point its θ0 and its batch order
MINIBATCH = CONFIG.replace("lr = 0.5", "lr = 0.1\nbatch_size = 8\nmomentum = 0.9").replace("t1 = 30.0", "t1 = 2.0").replace(
    "save_every = 10.0", "save_every = 0.5"
)


def test_sweep_ensemble_seeds_equals_plain_sweep(tmp_path, client):
    """ensemble_seeds=True: each lr's two seeds run as one ensemble task; the Dataset has the
    plain sweep's dims, coords and values (float64, 1e-10 relative), and a second call does no work."""
    over = {"lr": [0.1, 0.25], "seed": [0, 1]}  # both save at t = 0, 0.5, …: no NaN from unmatched times
    plain = sweep(MINIBATCH, over=over, client=client, out=tmp_path / "plain", progress=False)
    out = tmp_path / "ensemble"
    ds = sweep(MINIBATCH, over=over, client=client, out=out, progress=False, ensemble_seeds=True)
    assert ds.attrs["ensembles_executed"] == 2 and ds.attrs["ensembles_rerun"] == 0 and ds.attrs["runs_executed"] == 4
    assert ds.value.dims == plain.value.dims and dict(ds.sizes) == dict(plain.sizes)
    assert (ds.status == "completed").all()
    for name in ds.coords:
        np.testing.assert_array_equal(ds[name].values, plain[name].values, err_msg=name)
    for name in ("value", "grad_sq", "loss", "grad_norm"):
        assert relative(ds[name].values, plain[name].values) < 1e-10, name
    assert relative(plain.loss.sel(seed=0).values, plain.loss.sel(seed=1).values) > 1e-3  # the seeds differ
    np.testing.assert_array_equal(ds.step.values, plain.step.values)
    np.testing.assert_array_equal(ds.nfe.values, plain.nfe.values)

    before = mtimes(out)
    again = sweep(MINIBATCH, over=over, client=client, out=out, progress=False, ensemble_seeds=True)
    assert again.attrs["runs_executed"] == 0 and again.attrs["ensembles_executed"] == 0 and mtimes(out) == before
    xr.testing.assert_identical(again.drop_attrs(), ds.drop_attrs())
    with pytest.raises(fs.ConfigError, match="sweep.ensemble_seeds"):
        sweep(MINIBATCH, over={"lr": [0.1]}, out=tmp_path / "no_seed", ensemble_seeds=True)


#: f(x) = w2 (w1·x), one hidden unit, no bias: the seed draws w1 and w2, and with them the
#: sharpness at θ0: λ_max = 4.71 for seed 39 (|w2| = 0.78), 0.86 for seed 1 (|w2| = 0.14).
#: Full-batch GD at lr 1.5 blows up for seed 39 (it does for every lr in [1.0, 2.2], within
#: 20 steps) and trains for seed 1 (it does for every lr up to 2.2); lr 0.25 < 2/λ_max for both.
ONE_DIVERGES = CONFIG.replace("width = 4", 'width = 1\nactivation = "identity"\nbias = false').replace("t1 = 30.0", "t1 = 15.0").replace(
    "save_every = 10.0", "save_every = 3.0"
)


@pytest.mark.parametrize("ensemble_seeds", [False, True])
def test_sweep_one_point_diverges(tmp_path, client, ensemble_seeds):
    """2 × 2 (lr × seed) where exactly one point diverges: it has status "diverged" with the
    reason, the three others complete with the records of their runs made one by one. With
    ensemble_seeds the lr = 1.5 ensemble diverges and its two seeds run again one by one."""
    over = {"lr": [0.25, 1.5], "seed": [1, 39]}
    ds = sweep(ONE_DIVERGES, over=over, client=client, out=tmp_path / "sweep", progress=False, ensemble_seeds=ensemble_seeds)
    status = {(lr, seed): str(ds.status.sel(lr=lr, seed=seed).values) for lr in over["lr"] for seed in over["seed"]}
    assert status == {(0.25, 1): "completed", (0.25, 39): "completed", (1.5, 1): "completed", (1.5, 39): "diverged"}
    assert "non-finite loss, parameters or gradient" in str(ds.status_message.sel(lr=1.5, seed=39).values)
    if ensemble_seeds:
        assert ds.attrs["ensembles_executed"] == 1 and ds.attrs["ensembles_rerun"] == 1
    for (lr, seed), expected in status.items():
        text = ONE_DIVERGES.replace("lr = 0.5", f"lr = {lr}").replace("[run]", f"[run]\nseed = {seed}")
        # dask starts its workers with OMP_NUM_THREADS=1 (distributed's pre-spawn environment), so
        # torch runs there on one thread: on one thread here too, a point is its run alone bit for bit
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with pytest.warns(RuntimeWarning) if expected == "diverged" else _nothing():
                alone = fs.run_config(text, progress=False)
        finally:
            torch.set_num_threads(threads)
        assert alone.attrs["status"] == expected
        point = ds.sel(lr=lr, seed=seed).dropna("time", how="all", subset=["loss"])
        assert point.sizes["time"] == alone.sizes["time"] >= 2
        for name in ("value", "loss"):
            assert relative(point[name].values, alone[name].values) < (1e-10 if ensemble_seeds else 1e-300), (lr, seed, name)
    assert float(ds.loss.sel(lr=1.5, seed=1).isel(time=-1)) < 0.8 * float(ds.loss.sel(lr=1.5, seed=1).isel(time=0))
