"""Stops and resumes: Ctrl-C, SIGKILL at random moments, failures; checkpoints; determinism;
divergence. A resumed run equals the uninterrupted one, wall_time aside (it counts seconds)."""

import functools
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import xarray as xr

import flowsim as fs
from flowsim import record
from flowsim.checkpoint import checkpoint_path
from flowsim.cli import main
from flowsim.integrators import ODE, RK, SDE, Exponential, FusedEulerMaruyama

from conftest import build_problem
from test_errors import GOOD


@functools.cache
def small_problem() -> fs.Problem:
    """Built once: simulate works on its own copy (Problem.to), never on this one."""
    return build_problem("mlp", n=64, weight_decay=1e-3, depth=1, width=8)


def case(name: str):
    """(problem, dynamics, integrator, simulate keywords) of a small run with many save points."""
    problem = small_problem()
    if name == "sgd":  # mini-batches (4 per epoch) and momentum
        return problem, fs.DiscreteSGD(lr=0.1, batch_size=16, momentum=0.9), None, {"t1": 1.2, "save_every": 0.1}
    if name == "gf":
        return problem, fs.GradientFlow(), ODE("dopri5", rtol=1e-4, atol=1e-6), {"t1": 0.6, "save_every": 0.05}
    if name == "sde":  # two Brownian paths, two fused Euler–Maruyama steps per save interval
        return problem, fs.SGDNoise(lr=0.1, batch_size=16, paths=2), FusedEulerMaruyama(dt=0.05), {"t1": 1.2, "save_every": 0.1}
    if name == "torchsde":
        return problem, fs.SGDNoise(lr=0.1, batch_size=16, paths=2), SDE("euler", dt=0.05), {"t1": 0.6, "save_every": 0.1}
    raise ValueError(name)


def run(name: str, **kwargs) -> xr.Dataset:
    problem, dynamics, integrator, grid = case(name)
    return fs.simulate(problem, dynamics, integrator, progress=False, **grid, **kwargs)


def run_in_child(name: str, out: str) -> None:
    """The body of a process that gets killed: a run checkpointed at every save point."""
    torch.set_num_threads(1)
    run(name, out=out, checkpoint_every=0)


def same(a: xr.Dataset, b: xr.Dataset) -> None:
    """Identical Datasets (values bit for bit, coords, attrs), wall_time aside."""
    xr.testing.assert_identical(a.drop_vars("wall_time"), b.drop_vars("wall_time"))


def interrupt_at(monkeypatch, n: int) -> None:
    """Ctrl-C while recording the n-th save point of the next run."""
    original, calls = record.Recorder.add, [0]

    def add(self, point, wall_time):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return original(self, point, wall_time)

    monkeypatch.setattr(record.Recorder, "add", add)


@pytest.fixture(scope="module")
def references():
    return {name: run(name) for name in ("sgd", "gf", "sde")}


@pytest.mark.parametrize("name, suffix", [("sgd", ".zarr"), ("sgd", ".nc"), ("gf", ".zarr"), ("gf", ".nc"), ("sde", ".zarr")])
def test_ctrl_c_saves_everything_and_resume_is_bit_for_bit(name, suffix, references, tmp_path, monkeypatch):
    out = tmp_path / f"run{suffix}"
    interrupt_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run(name, out=out, checkpoint_every=1000.0)  # no periodic checkpoint: the one at Ctrl-C
    monkeypatch.undo()
    stopped = fs.open_record(out)
    assert stopped.attrs["status"] == "interrupted"
    assert f"after t={float(references[name].time[4]):g};" in stopped.attrs["status_message"]
    same(stopped, references[name].isel(time=slice(0, 5)).assign_attrs(stopped.attrs))  # every point up to Ctrl-C
    assert checkpoint_path(out).exists()
    resumed = run(name, out=out, resume=True)
    same(resumed, references[name])
    same(fs.open_record(out), references[name])
    assert not checkpoint_path(out).exists()  # the run has ended: nothing to resume
    # wall_time goes on from the seconds spent before the stop
    assert (np.diff(resumed.wall_time.values) >= 0).all()


@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.03}), ("implicit_adams", {"step_size": 0.05})])
def test_fixed_grid_and_adams_resume_bit_for_bit(method, options, tmp_path, monkeypatch):
    """A fixed-grid checkpoint is the node before the step that passed the save time (and the
    Adams history there): resuming takes that step again, identically."""
    problem = build_problem("mlp", n=32, depth=1, width=8)
    integrator = ODE(method, **options)
    kwargs = {"t1": 0.6, "save_every": 0.1, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchdiffeq: Adams functional iteration
        reference = fs.simulate(problem, fs.GradientFlow(), integrator, **kwargs)
        interrupt_at(monkeypatch, 4)
        with pytest.raises(KeyboardInterrupt):
            fs.simulate(problem, fs.GradientFlow(), integrator, out=tmp_path / "r.zarr", **kwargs)
        monkeypatch.undo()
        same(fs.simulate(problem, fs.GradientFlow(), integrator, out=tmp_path / "r.zarr", resume=True, **kwargs), reference)


class CountingFlow(fs.GradientFlow):
    """Gradient flow that counts its evaluations (to see that a resume does not start over)."""

    calls = 0

    def derivative(self, problem, t, y):
        CountingFlow.calls += 1
        return super().derivative(problem, t, y)


class CountingMomentum(fs.MomentumFlow):
    calls = 0

    def nonlinear_part(self, problem, t, y):
        CountingMomentum.calls += 1
        return super().nonlinear_part(problem, t, y)


@pytest.mark.parametrize(
    "dynamics, integrator",
    [
        (CountingFlow(), RK("dopri5", rtol=1e-6, atol=1e-6)),
        (CountingFlow(), RK("rk4", step_size=0.03)),
        (CountingMomentum(lr=0.1, momentum=0.9), Exponential(rtol=1e-6, atol=1e-6)),
        (CountingFlow(), Exponential(step_size=0.03)),
    ],
    ids=["rk-dopri5", "rk-rk4", "exponential-momentum", "exponential-fixed"],
)
def test_rk_and_exponential_resume_from_their_checkpoint_bit_for_bit(dynamics, integrator, tmp_path, monkeypatch):
    """The fused RK loops and the exponential integrator checkpoint their whole state: stopped at
    the 4th save point and resumed, the run is the uninterrupted one bit for bit, and the resumed
    part evaluates the dynamics only after the checkpoint (fewer calls than the whole run)."""
    problem = build_problem("mlp", n=32, depth=1, width=8)
    kwargs = {"t1": 0.6, "save_every": 0.1, "progress": False}
    counter = type(dynamics)
    counter.calls = 0
    reference = fs.simulate(problem, dynamics, integrator, **kwargs)
    whole = counter.calls
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        fs.simulate(problem, dynamics, integrator, out=tmp_path / "r.zarr", **kwargs)
    monkeypatch.undo()
    counter.calls = 0
    same(fs.simulate(problem, dynamics, integrator, out=tmp_path / "r.zarr", resume=True, **kwargs), reference)
    assert 0 < counter.calls < whole


def test_torchsde_resume_replays_the_same_brownian_path(tmp_path, monkeypatch):
    """torchsde's Euler–Maruyama stopped at its 4th save point and resumed: the same paths,
    bit for bit, as the uninterrupted run (its increments are a function of (seed, path, step))."""
    reference = run("torchsde")
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run("torchsde", out=tmp_path / "s.zarr")
    monkeypatch.undo()
    assert fs.open_record(tmp_path / "s.zarr").sizes["time"] == 3
    same(run("torchsde", out=tmp_path / "s.zarr", resume=True), reference)


def test_sigkill_at_20_random_moments(references, tmp_path):
    """Runs checkpointed at every save point, killed with SIGKILL at 20 random moments (from
    before the store exists to after the run ended): every store opens with plain xarray, its
    rows are the reference's, and every resume gives the uninterrupted run: bit for bit for
    DiscreteSGD (mini-batches, momentum) and dopri5 (its whole Runge–Kutta state is in the
    checkpoint), and the same Brownian paths for the SDE."""
    ctx = multiprocessing.get_context("fork")  # no start-up: a kill lands in the run, not in imports
    durations = {}
    for name in ("sgd", "gf", "sde"):
        child = ctx.Process(target=run_in_child, args=(name, str(tmp_path / f"full-{name}.zarr")))
        began = time.perf_counter()
        child.start()
        child.join()
        durations[name] = time.perf_counter() - began
        assert child.exitcode == 0
        same(fs.open_record(tmp_path / f"full-{name}.zarr"), references[name])
    rng = random.Random(20)
    landed = {"before the store": 0, "mid-run": 0, "after the end": 0}
    for i in range(20):
        name = ("sgd", "gf", "sde")[i % 3]
        reference = references[name]
        out = tmp_path / f"killed-{i}.zarr"
        child = ctx.Process(target=run_in_child, args=(name, str(out)))
        child.start()
        time.sleep(rng.uniform(0.0, durations[name]))
        child.kill()  # SIGKILL
        child.join()
        if out.exists():
            with xr.open_zarr(out) as raw:  # plain xarray opens it, whatever the moment
                raw.load()
            saved = fs.open_record(out)
            n = saved.sizes["time"]
            same(saved, reference.isel(time=slice(0, n)).assign_attrs(saved.attrs))
            landed["after the end" if saved.attrs["status"] == "completed" else "mid-run"] += 1
        else:
            landed["before the store"] += 1
        if out.exists() or checkpoint_path(out).exists():
            resumed = run(name, out=out, resume=True)
        else:  # killed before it wrote anything: nothing to resume
            with pytest.raises(fs.ConfigError, match="run.resume"):
                run(name, out=out, resume=True)
            resumed = run(name, out=out)
        same(resumed, reference)
        same(fs.open_record(out), reference)
        assert not checkpoint_path(out).exists()
    assert landed["mid-run"] >= 5, landed


def _killed_before_counting_its_first_rows(name: str, out: str) -> None:
    """A child run that dies (as by SIGKILL) at its second checkpoint write: its first rows are in
    the store, its checkpoint still says none are."""
    from flowsim import checkpoint

    original, calls = checkpoint.save, [0]

    def save(path, state):
        calls[0] += 1
        if calls[0] == 2:
            os._exit(9)
        original(path, state)

    checkpoint.save = save
    run_in_child(name, out)


@pytest.mark.parametrize("name", ["sgd", "gf"])
def test_resume_after_a_kill_between_the_first_rows_and_their_checkpoint(name, references, tmp_path):
    """The store exists with rows its checkpoint does not count (n_saved = 0): resume writes
    them again into that store and gives the uninterrupted run (found by the SIGKILL test)."""
    out = tmp_path / "k.zarr"
    child = multiprocessing.get_context("fork").Process(target=_killed_before_counting_its_first_rows, args=(name, str(out)))
    child.start()
    child.join()
    assert child.exitcode == 9 and out.exists() and checkpoint_path(out).exists()
    assert fs.open_record(out).sizes["time"] >= 1
    same(run(name, out=out, resume=True), references[name])


def test_a_failing_run_is_saved_then_resumed(references, tmp_path, monkeypatch):
    """Any other error (here the model raising at one evaluation) stamps status "failed", keeps
    the rows and a checkpoint, and re-raises; once the cause is gone, resume completes it."""
    original, calls = fs.Problem.loss_and_grad, [0]

    def flaky(self, theta, index=None):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("device lost")
        return original(self, theta, index)

    monkeypatch.setattr(fs.Problem, "loss_and_grad", flaky)
    out = tmp_path / "f.zarr"
    with pytest.raises(RuntimeError, match="device lost"):
        run("sgd", out=out, checkpoint_every=0)
    monkeypatch.undo()
    failed = fs.open_record(out)
    assert failed.attrs["status"] == "failed" and "RuntimeError" in failed.attrs["status_message"]
    assert failed.sizes["time"] == 4 and checkpoint_path(out).exists()
    same(run("sgd", out=out, resume=True), references["sgd"])


def test_resume_refuses_another_run(tmp_path, monkeypatch):
    out = tmp_path / "r.zarr"
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run("sgd", out=out)
    monkeypatch.undo()
    problem, dynamics, _, grid = case("sgd")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    changed = {
        "dynamics.momentum": lambda: fs.simulate(problem, fs.DiscreteSGD(lr=0.1, batch_size=16, momentum=0.5), **grid, out=out, resume=True),
        "run.seed": lambda: fs.simulate(problem, dynamics, **grid, seed=1, out=out, resume=True),
        "run.t1": lambda: fs.simulate(problem, dynamics, t1=2.0, save_every=0.1, out=out, resume=True),
        "run.observe": lambda: fs.simulate(problem, dynamics, **grid, observe=("loss",), out=out, resume=True),
        "problem.weight_decay": lambda: fs.simulate(
            build_problem("mlp", n=64, weight_decay=1e-2, depth=1, width=8), dynamics, **grid, out=out, resume=True
        ),
        "model (its initial parameters)": lambda: fs.simulate(
            build_problem("mlp", n=64, weight_decay=1e-3, depth=1, width=8, seed=1), dynamics, **grid, out=out, resume=True
        ),
        "run.dtype": lambda: fs.simulate(problem, dynamics, **grid, dtype="float32", out=out, resume=True),
    }
    for field, attempt in changed.items():
        with pytest.raises(fs.ConfigError) as info:
            attempt()
        assert str(info.value).startswith(field) and "resume it with the same arguments" in str(info.value), str(info.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and fs.open_record(out).attrs["status"] == "interrupted"
    # the ended run: resuming returns it (and still refuses another run)
    ended = run("sgd", out=out, resume=True)
    assert run("sgd", out=out, resume=True).equals(ended)
    with pytest.raises(fs.ConfigError, match="run.seed"):
        fs.simulate(problem, dynamics, **grid, seed=3, out=out, resume=True)


def test_cli_ctrl_c_exits_130_and_resume_completes(tmp_path):
    """A real SIGINT to `flowsim run`: exit 130, status "interrupted" with every row so far;
    `flowsim run --resume` completes it, equal to the uninterrupted run. The resume reads a
    copy of the config that checkpoints less often: checkpoint_every does not define the run."""
    every_row = GOOD.replace("t1 = 0.5\nsave_every = 0.1", "t1 = 30.0\nsave_every = 0.1\ncheckpoint_every = 0.0")
    (tmp_path / "run.toml").write_text(every_row)
    (tmp_path / "resume.toml").write_text(every_row.replace("checkpoint_every = 0.0", "checkpoint_every = 60.0"))
    out = tmp_path / "run.zarr"
    # the real CLI, each save point held back 20 ms so that the SIGINT surely lands mid-run, with
    # Python's Ctrl-C handler even where the test runs as a background job (which ignores SIGINT)
    slowed = (
        "import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from flowsim import cli, record; add = record.Recorder.add; "
        "record.Recorder.add = lambda self, *a, **k: (time.sleep(0.02), add(self, *a, **k))[1]; sys.exit(cli.main())"
    )
    command = [sys.executable, "-c", slowed, "run", str(tmp_path / "run.toml"), "--out", str(out)]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while (not out.exists() or fs.open_record(out).sizes["time"] < 3) and time.monotonic() < deadline:
        time.sleep(0.1)  # the live store is readable while it is written
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=120) == 130, child.stderr.read()
    stopped = fs.open_record(out)
    assert stopped.attrs["status"] == "interrupted" and 3 <= stopped.sizes["time"] < 301
    reference = fs.run_config(GOOD.replace("t1 = 0.5", "t1 = 3.0"), progress=False)  # the first 31 rows
    n = min(stopped.sizes["time"], 31)
    same(stopped.isel(time=slice(0, n)), reference.isel(time=slice(0, n)).assign_attrs(stopped.attrs))
    assert main(["run", str(tmp_path / "resume.toml"), "--out", str(out), "--resume", "--no-progress"]) == 0
    done = fs.open_record(out)
    assert done.attrs["status"] == "completed" and done.sizes["time"] == 301
    same(done.isel(time=slice(0, 31)), reference.assign_attrs(done.attrs))


def test_same_run_twice_is_the_same_dataset():
    """Same arguments, seed, device and dtype: identical Datasets, sharpness (power iteration
    from a seeded vector) and parameters included."""
    runs = {}
    for name in ("sgd", "gf", "sde"):
        runs[name], again = (run(name, observe=("loss", "grad_norm", "sharpness", "params"), seed=5) for _ in range(2))
        same(runs[name], again)
    for name in ("sgd", "sde"):  # the seed does choose the batches and the Brownian paths
        assert not np.array_equal(run(name, observe=("loss",), seed=6).loss.values, runs[name].loss.values)


def test_a_diverging_run_keeps_every_point_before_it(tmp_path):
    """lr far too large: the loss overflows. Status "diverged", the time it did, and every saved
    point before it the same as in the same run stopped just before."""
    X, y = fs.data.teacher_student(n=32)
    torch.manual_seed(0)
    problem = fs.Problem(fs.models.mlp.mlp(in_features=16, out_features=1, depth=1, width=8), (X, y), loss="mse")
    dynamics = fs.DiscreteSGD(lr=5.0)
    with pytest.warns(RuntimeWarning, match="diverged"):
        ds = fs.simulate(problem, dynamics, t1=5000.0, save_every=5.0, out=tmp_path / "d.zarr", progress=False)
    n = ds.sizes["time"]
    assert ds.attrs["status"] == "diverged" and 3 <= n < 1001
    message = ds.attrs["status_message"]
    assert f"at t={n * 5.0:g} (step {n})" in message and f"up to t={float(ds.time[-1]):g}" in message, message
    same(fs.open_record(tmp_path / "d.zarr"), ds)
    assert not checkpoint_path(tmp_path / "d.zarr").exists()
    before = fs.simulate(problem, dynamics, t1=float(ds.time[-1]), save_every=5.0, progress=False)
    assert before.attrs["status"] == "completed" and np.isfinite(before.loss).all()
    same(ds, before.assign_attrs(ds.attrs))


def test_throw_decides_what_a_diverged_run_does(tmp_path):
    """throw=None warns, False is quiet (the status says it), True raises IntegrationError, each
    after saving the same record (fs.Status names the outcomes)."""
    X, y = fs.data.teacher_student(n=32)
    torch.manual_seed(0)
    problem = fs.Problem(fs.models.mlp.mlp(in_features=16, out_features=1, depth=1, width=8), (X, y), loss="mse")
    kwargs = {"t1": 500.0, "save_every": 5.0, "progress": False}
    with pytest.warns(RuntimeWarning, match="diverged"):
        warned = fs.simulate(problem, fs.DiscreteSGD(lr=5.0), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = fs.simulate(problem, fs.DiscreteSGD(lr=5.0), throw=False, **kwargs)
    assert warned.attrs["status"] == quiet.attrs["status"] == fs.Status.DIVERGED
    with pytest.raises(fs.IntegrationError, match="run diverged: non-finite.*the record is at"):
        fs.simulate(problem, fs.DiscreteSGD(lr=5.0), throw=True, out=tmp_path / "t.zarr", **kwargs)
    same(fs.open_record(tmp_path / "t.zarr"), quiet.assign_attrs(fs.open_record(tmp_path / "t.zarr").attrs))
    with pytest.raises(fs.ConfigError, match="run.throw"):
        fs.simulate(problem, fs.DiscreteSGD(lr=5.0), throw="yes", **kwargs)


def test_max_steps_ends_the_run_as_diverged_with_when_and_why():
    problem = build_problem("mlp", n=32, depth=1, width=8)
    with pytest.warns(RuntimeWarning, match="max_steps"):
        ds = fs.simulate(problem, fs.GradientFlow(), ODE("dopri5", rtol=1e-9, atol=1e-9, max_steps=25), t1=5.0, save_every=0.5, progress=False)
    assert ds.attrs["status"] == "diverged" and ds.sizes["time"] >= 1
    assert "integrator.max_steps = 25 steps taken by t=" in ds.attrs["status_message"]
    assert int(ds.step[-1]) <= 25


def test_step_size_underflow_ends_the_run_as_diverged_with_when_and_why(monkeypatch):
    """The flow turns NaN after t = 0.25: dopri5 rejects every step there until its step size
    collapses; the run is "diverged", says where the solver stopped and why, and keeps every
    save point before it, equal to the run that was never broken."""
    reference = run("gf")
    derivative = fs.GradientFlow.derivative

    def broken(self, problem, t, y):
        return derivative(self, problem, t, y) * (torch.nan if float(t) > 0.25 else 1.0)

    monkeypatch.setattr(fs.GradientFlow, "derivative", broken)
    with pytest.warns(RuntimeWarning, match="diverged"):
        ds = run("gf")
    message = ds.attrs["status_message"]
    assert ds.attrs["status"] == "diverged" and "underflow in dt" in message, message
    stopped = float(re.search(r"torchdiffeq stopped at t=([0-9.e-]+), before the save time t=0.25", message)[1])
    assert 0.2 < stopped <= 0.25 and message.endswith("(last saved t=0.2)"), message
    assert ds.sizes["time"] == 5
    same(ds, reference.isel(time=slice(0, 5)).assign_attrs(ds.attrs))
