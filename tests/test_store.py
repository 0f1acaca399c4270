"""What is on disk is safe: overwrite swaps a finished record in, flowsim replaces only records it
wrote, one process writes an output at a time, a finished run is resumed only by the same run,
kept rows are finite, and a live store is read cheaply."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import xarray as xr

import flowsim as fs
from flowsim import store
from flowsim.cli import main
from flowsim.lock import lock_path, output_lock

from conftest import build_problem
from test_errors import GOOD

def snapshot(path):
    """Every file under `path` (or the file itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def sgd(**kwargs):
    problem = build_problem("mlp", n=40, depth=1, width=4)
    return fs.simulate(problem, fs.DiscreteSGD(lr=0.1, batch_size=8), t1=0.5, save_every=0.1, progress=False, **kwargs)


def leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_overwrite_swaps_the_new_record_in_when_it_ends(tmp_path, suffix):
    out = tmp_path / f"run{suffix}"
    first = sgd(out=out)
    again = sgd(out=out, overwrite=True, seed=1)
    assert first.attrs["seed"] == 0 and fs.open_record(out).attrs["seed"] == 1
    xr.testing.assert_identical(fs.open_record(out).drop_vars("wall_time"), again.drop_vars("wall_time"))
    assert leftovers(tmp_path, {out.name}) == []  # no staging, checkpoint or lock left


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_an_overwrite_that_fails_leaves_the_old_record_as_it_was(tmp_path, monkeypatch, suffix, capsys):
    """A write that fails (a read-only folder, a full disk) ends with a RecordError naming run.out,
    and the record that was there is byte for byte the same: the new one was built beside it."""
    out = tmp_path / f"run{suffix}"
    sgd(out=out)
    before = snapshot(out)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store.ZarrStore if suffix == ".zarr" else store.NetCDFStore, "write" if suffix == ".zarr" else "write_all", refuse)
    with pytest.raises(fs.RecordError, match=r"^run\.out: writing .* failed .*the record before this run is kept"):
        sgd(out=out, overwrite=True, seed=1)
    assert snapshot(out) == before and leftovers(tmp_path, {out.name}) == []
    config = tmp_path / "run.toml"
    config.write_text(GOOD)
    assert main(["run", str(config), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and snapshot(out) == before


def test_a_folder_without_write_permission_is_refused_before_anything(tmp_path, monkeypatch):
    out = tmp_path / "run.zarr"
    sgd(out=out)
    before = snapshot(out)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode))
    with pytest.raises(fs.ConfigError, match=r"^run\.out: cannot write in the folder"):
        sgd(out=out, overwrite=True)
    assert snapshot(out) == before and leftovers(tmp_path, {out.name}) == []


@pytest.mark.parametrize("name", ["data.zarr", "data.nc", "killed.zarr"])
def test_what_flowsim_did_not_write_is_never_replaced(tmp_path, name, capsys):
    """A user's folder or file that merely ends in .zarr or .nc is refused, overwrite or resume."""
    out = tmp_path / name
    if name == "data.zarr":
        out.mkdir()
        (out / "precious.txt").write_text("mine")
        xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(out / "inner.zarr", zarr_format=2)
    elif name == "data.nc":
        xr.Dataset({"a": ("x", np.arange(3))}).to_netcdf(out)
    else:  # a zarr store of someone else's, with a .zattrs of its own
        xr.Dataset({"a": ("x", np.arange(3))}, attrs={"writer": "me"}).to_zarr(out, zarr_format=2)
    before = snapshot(out)
    for kwargs in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(fs.FlowsimError, match=r"is not a flowsim record"):
            sgd(out=out, **kwargs)
    config = tmp_path / "run.toml"
    config.write_text(GOOD)
    assert main(["run", str(config), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert "not a flowsim record" in capsys.readouterr().err
    assert snapshot(out) == before


def test_an_overwrite_killed_midway_leaves_the_old_record(tmp_path):
    """SIGKILL during an overwrite: the old record is untouched; the next overwrite clears what the
    killed one left beside it and swaps its own record in."""
    out = tmp_path / "run.zarr"
    sgd(out=out)
    before = snapshot(out)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import flowsim as fs
        from flowsim import record
        from conftest import build_problem
        original = record.Recorder.add
        def add(self, point, wall_time):
            if point.step == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, point, wall_time)
        record.Recorder.add = add
        problem = build_problem("mlp", n=40, depth=1, width=4)
        fs.simulate(problem, fs.DiscreteSGD(lr=0.1, batch_size=8), t1=0.5, save_every=0.1, progress=False,
                    out={str(out)!r}, overwrite=True, seed=1, checkpoint_every=0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert snapshot(out) == before and fs.open_record(out).attrs["seed"] == 0
    assert (tmp_path / "run.zarr.new").exists()  # the killed run's partial record, beside
    sgd(out=out, overwrite=True, seed=1)
    assert fs.open_record(out).attrs["seed"] == 1 and leftovers(tmp_path, {out.name}) == []


def test_one_process_writes_an_output_at_a_time(tmp_path, capsys):
    """Another process holding the output (a live run): a second run, an overwrite or a resume of
    it is refused naming the holder, and nothing of the live run is touched."""
    out = tmp_path / "run.zarr"
    sgd(out=out)
    before = snapshot(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from flowsim.lock import output_lock\nimport time\nwith output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        for kwargs in ({"overwrite": True}, {"resume": True}, {}):
            with pytest.raises(fs.RecordError, match=rf"^run\.out: .* is being written by pid {holder.pid} "):
                sgd(out=out, **kwargs)
        config = tmp_path / "run.toml"
        config.write_text(GOOD)
        assert main(["run", str(config), "--out", str(out), "--overwrite", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {holder.pid}" in err
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the kernel did, and its stale lock file is taken over
    assert lock_path(out).exists()
    sgd(out=out, overwrite=True)
    assert not lock_path(out).exists()


def test_two_runs_started_at_once_one_wins(tmp_path):
    """Two `flowsim run` of the same new output started together: exactly one writes it, the
    other exits 2 before touching it (no race on the store being created)."""
    config = tmp_path / "run.toml"
    config.write_text(GOOD.replace("t1 = 0.5", "t1 = 5.0").replace("save_every = 0.1", "save_every = 0.5"))
    out = tmp_path / "run.zarr"
    command = [sys.executable, "-m", "flowsim.cli", "run", str(config), "--out", str(out), "--no-progress"]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE) for _ in range(2)]
    codes = sorted(r.wait(timeout=300) for r in runs)
    errors = [r.stderr.read().decode() for r in runs]
    assert codes == [0, 2], errors
    assert any("is being written by pid" in e or "exists; pass overwrite" in e for e in errors), errors
    assert fs.open_record(out).attrs["status"] == "completed"


def test_the_lock_is_released_and_removed(tmp_path):
    out = tmp_path / "run.zarr"
    with output_lock(out):
        assert lock_path(out).read_text().startswith(f"pid {os.getpid()} ")
        with pytest.raises(fs.RecordError, match="is being written by"):  # a second holder, even in-process
            with output_lock(out):
                pass
    assert not lock_path(out).exists()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"seed": 1}, "run.seed"),
        ({"save_every": 0.2}, "run.save_every"),
        ({"observe": ("loss",)}, "run.observe"),
        ({"t1": 0.8}, "run.t1"),
        ({"data_seed": 1}, "data"),
        ({"dynamics": fs.GradientFlow()}, "dynamics.name"),
    ],
)
def test_a_finished_run_is_resumed_only_by_the_same_run(tmp_path, change, field):
    """Resuming a completed record with another data subset, save_every, observers, t1 or
    dynamics is refused, naming the field, as for an unfinished run; the same run returns it."""
    out = tmp_path / "run.zarr"
    done = sgd(out=out)
    change = dict(change)
    problem = build_problem("mlp", n=40, depth=1, width=4, seed=0)
    if "data_seed" in change:
        X, y = fs.data.digits(n_train=40, seed=change.pop("data_seed"))
        problem = fs.Problem(problem.model, (X, y))
    dynamics = change.pop("dynamics", fs.DiscreteSGD(lr=0.1, batch_size=8))
    kwargs = {"t1": 0.5, "save_every": 0.1, **change}
    with pytest.raises(fs.ConfigError, match=rf"^{field}: differs from the run"):
        fs.simulate(problem, dynamics, progress=False, out=out, resume=True, **kwargs)
    same = sgd(out=out, resume=True)
    xr.testing.assert_identical(same, done)


def test_a_diverging_run_keeps_only_finite_rows(tmp_path, capsys):
    """Full-batch SGD at lr 3 on a teacher-student MSE diverges: every kept row is finite in
    every variable (θ, loss, gradient companions, norms), and the record plots."""
    X, y = fs.data.teacher_student(n=32)
    model = fs.models.mlp.mlp(in_features=X.shape[1], out_features=1, depth=1, width=16)
    problem = fs.Problem(model, (X, y), loss="mse")
    out = tmp_path / "run.zarr"
    with pytest.warns(RuntimeWarning, match="diverged"):
        ds = fs.simulate(problem, fs.DiscreteSGD(lr=3.0), t1=300.0, save_every=3.0, progress=False, out=out, observe=("loss", "grad_norm", "params"))
    assert ds.attrs["status"] == "diverged" and ds.sizes["time"] >= 1
    for name, var in ds.data_vars.items():
        if np.issubdtype(var.dtype, np.floating):
            assert np.isfinite(var.values).all(), name
    assert main(["plot", str(out), "-o", str(tmp_path / "run.png")]) == 0


def test_a_record_too_large_for_memory_needs_a_zarr_store(tmp_path):
    """Without an output (or to netCDF) the record is held in host memory: one that would take
    more than half of it is refused before any work; a zarr store holds a window of rows."""
    problem = build_problem("mlp", n=16, depth=2, width=256)  # P ≈ 85,000: 0.7 MB a row with params
    for out in (None, tmp_path / "run.nc"):  # 1e6 rows: 680 GB, more than any machine of this kind holds
        with pytest.raises(fs.ConfigError, match=r"^run\.out: the record held in memory .* would take .* GiB"):
            fs.simulate(problem, fs.DiscreteSGD(lr=1e-6), t1=1.0, save_every=1e-6, observe=("params",), progress=False, out=out)


def test_info_and_plot_refuse_a_store_without_its_values(tmp_path, capsys):
    out = tmp_path / "run.zarr"
    sgd(out=out)
    import shutil

    shutil.rmtree(out / "value")
    zmeta = json.loads((out / ".zmetadata").read_text())
    zmeta["metadata"] = {k: v for k, v in zmeta["metadata"].items() if not k.startswith("value/")}
    (out / ".zmetadata").write_text(json.dumps(zmeta))
    for command in (["info", str(out)], ["plot", str(out), "-o", str(tmp_path / "x.png")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'value' variable is missing" in err, err
    text = tmp_path / "notes.zarr"
    text.write_text("a line\nanother line\n")
    assert main(["info", str(text)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_live_store_reads_cheaply_with_plain_xarray(tmp_path):
    """During a long run (1e5 save points allocated in the grid) plain xr.open_zarr(...).load()
    of the live store reads about the rows written, not the whole grid."""
    out = tmp_path / "run.zarr"
    problem = build_problem("mlp", n=16, depth=1, width=4)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import flowsim as fs
        from conftest import build_problem
        problem = build_problem("mlp", n=16, depth=1, width=4)
        fs.simulate(problem, fs.DiscreteSGD(lr=0.01), t1=1000.0, save_every=0.01, progress=False,
                    out={str(out)!r}, checkpoint_every=0, observe=("loss", "params"))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline, rows, allocated = time.monotonic() + 120, 0, 0
        while rows < 40 and time.monotonic() < deadline:
            time.sleep(0.2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    live = xr.open_zarr(out).load()  # what plain xarray reads of the live store
                except (OSError, ValueError, KeyError):
                    continue
            rows, allocated = int(np.isfinite(live.time.values).sum()), live.sizes["time"]
        # one row per flush here (a checkpoint at every save point): allocated doubles past rows
        assert rows >= 40 and allocated <= 2 * rows, (rows, allocated)
        assert live.params.shape[1] == problem.n_params
    finally:
        child.kill()
        child.wait()


def test_a_live_record_without_its_checkpoint_cannot_be_resumed(tmp_path):
    out = tmp_path / "run.zarr"
    sgd(out=out)
    attrs = dict(fs.open_record(out).attrs, status="running")
    store.ZarrStore(out).set_attrs(attrs)
    with pytest.raises(fs.RecordError, match=r"^run\.resume: .*status 'running'.* has no checkpoint"):
        sgd(out=out, resume=True)
