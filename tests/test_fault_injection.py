"""SIGKILL at chosen writes of a run's store and checkpoint, then resume: the result is the
uninterrupted run, bit for bit (``wall_time`` and timing attrs aside).

A run is killed at its N-th write to disk, N chosen from the writes an uninterrupted run makes
(counted first, in the same way), for the ODE (GradientFlow, dopri5), SGD (DiscreteSGD with
mini-batches and momentum; zarr and netCDF), SDE (SGDNoise, fused Euler–Maruyama), config +
``flowsim run --resume``, overwrite and sweep paths. "A write" is any call that changes the
file system under the test's folder, caught at the lowest level that outlives refactoring:
``os`` (replace, rename, link, unlink, remove, rmdir, mkdir, open for writing, write, pwrite,
truncate, ftruncate, fsync), ``shutil.rmtree`` and Python file objects opened for writing
(``open``/``io.open``, which zarr's chunk and metadata writes and the checkpoint use). A kill at
a ``write`` of a file object first writes half of the bytes: a torn file. (Calls made from C,
such as netCDF's own writes or a renameat2 through ctypes, are not seen; the Python calls
around them are.)

Runs checkpoint at every save point (``checkpoint_every=0``). The kill points are named
(``first``, ``store-appears``, ``early``, ``middle``, ``late``, ``checkpoint-rename``,
``torn-write``, ``shrink``, ``attrs``, ``consolidation``, ``checkpoint-removal``, ``swap``,
``last``) and found in the log of the uninterrupted run, so they follow the store's layout as it
changes.

After each kill: the record (if there is one) opens with `flowsim.open_record` or raises a
FlowsimError, and the rows it holds are the uninterrupted run's; ``resume=True`` (or a plain
run, if the kill came before anything that can be resumed) gives the uninterrupted run, and
leaves nothing beside the record. A run overwriting another run's record leaves the old record
as it was or the new one complete. The sweep is killed in its worker (dask runs the point again,
in the same sweep) and as a whole (sweep process and worker; the sweep is called again).
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import xarray as xr

import flowsim as fs
from flowsim.integrators import ODE, FusedEulerMaruyama

from conftest import build_problem
from test_sweep import CONFIG

TESTS = Path(__file__).resolve().parent

#: fork, SIGKILL and /proc/self/fd (to name the file an fd writes to)
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (fork, /proc/self/fd)")

# ------------------------------------------------------------------ the write interceptor

#: os functions that change the file system: name -> (positions of path arguments, their dir_fd keywords)
_OS_CALLS = {
    "replace": ((0, "src_dir_fd"), (1, "dst_dir_fd")),
    "rename": ((0, "src_dir_fd"), (1, "dst_dir_fd")),
    "link": ((0, "src_dir_fd"), (1, "dst_dir_fd")),
    "unlink": ((0, "dir_fd"),),
    "remove": ((0, "dir_fd"),),
    "rmdir": ((0, "dir_fd"),),
    "mkdir": ((0, "dir_fd"),),
    "truncate": ((0, None),),
    "ftruncate": ((0, None),),
    "fsync": ((0, None),),
    "write": ((0, None),),
    "pwrite": ((0, None),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _resolve(path, dir_fd=None) -> str | None:
    """The absolute path a call acts on (an fd is read from /proc/self/fd)."""
    readlink = _ORIGINAL.get("readlink", os.readlink)
    try:
        if isinstance(path, int):
            return readlink(f"/proc/self/fd/{path}")
        path = os.fsdecode(path)
        if not os.path.isabs(path):
            base = readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
            path = os.path.join(base, path)
        return os.path.normpath(path)
    except (OSError, TypeError, ValueError):
        return None


_ORIGINAL: dict = {}


def install(root: str, kill_at: int | None, log: str | None, action: str = "self", marker: str | None = None) -> None:
    """Count this process's writes under `root` (appending ``n<TAB>kind<TAB>path`` lines to `log`)
    and SIGKILL it before write number `kill_at` (`action` "self"; "parent": its parent first,
    then itself). With `marker`, the kill happens only once across processes: the first to
    create `marker` dies, later ones go on."""
    if _ORIGINAL:
        raise RuntimeError("the write interceptor is installed already")
    roots = {os.path.normpath(os.path.abspath(root)), os.path.realpath(root)}
    count, guard = [0], threading.RLock()
    for name in (*_OS_CALLS, "open", "readlink", "kill", "getpid", "getppid"):
        _ORIGINAL[name] = getattr(os, name)
    _ORIGINAL["rmtree"], _ORIGINAL["builtin_open"], _ORIGINAL["io_open"] = shutil.rmtree, builtins.open, io.open
    o = _ORIGINAL
    log_fd = None if log is None else o["open"](log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def inside(path: str | None) -> bool:
        return path is not None and any(path == r or path.startswith(r + os.sep) for r in roots)

    def claim() -> bool:
        if marker is None:
            return True
        try:
            o["open"](marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            return True
        except FileExistsError:
            return False

    def event(kind: str, paths, torn=None) -> None:
        paths = [p for p in paths if inside(p)]
        if not paths:
            return
        with guard:
            count[0] += 1
            n = count[0]
            if log_fd is not None:
                o["write"](log_fd, f"{n}\t{kind}\t{' -> '.join(paths)}\n".encode())
            if n == kill_at and claim():
                if torn is not None:
                    torn()
                if action == "parent":
                    o["kill"](o["getppid"](), signal.SIGKILL)
                o["kill"](o["getpid"](), signal.SIGKILL)

    def wrap(name: str):
        original, spec = o[name], _OS_CALLS[name]

        def call(*args, **kwargs):
            paths = [_resolve(args[i], kwargs.get(fd) if fd else None) for i, fd in spec if i < len(args)]
            event(name, paths)
            return original(*args, **kwargs)

        return call

    def os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            event("open", [_resolve(path, kwargs.get("dir_fd"))])
        return o["open"](path, flags, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        event("rmtree", [_resolve(path)])
        return o["rmtree"](path, *args, **kwargs)

    class Written:
        """A file object opened for writing: each write is an event (a kill there tears it)."""

        def __init__(self, file, path):
            self._file, self._path = file, path

        def write(self, data):
            def torn():
                view = memoryview(data).cast("B") if not isinstance(data, str) else data
                self._file.write(view[: len(view) // 2])
                self._file.flush()

            event("write", [self._path], torn)
            return self._file.write(data)

        def __enter__(self):
            self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def __iter__(self):
            return iter(self._file)

        def __getattr__(self, name):
            return getattr(self._file, name)

    def opener(original):
        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, int) or not any(c in mode for c in "wax+"):
                return original(file, mode, *args, **kwargs)
            path = _resolve(file)
            if not inside(path):
                return original(file, mode, *args, **kwargs)
            event("open", [path])
            return Written(original(file, mode, *args, **kwargs), path)

        return open_

    for name in _OS_CALLS:
        setattr(os, name, wrap(name))
    os.open = os_open
    shutil.rmtree = rmtree
    builtins.open = opener(o["builtin_open"])
    io.open = opener(o["io_open"])


def uninstall() -> None:
    """Undo `install` (nothing if it was not installed)."""
    o = dict(_ORIGINAL)
    if not o:
        return
    for name in (*_OS_CALLS, "open"):
        setattr(os, name, o[name])
    shutil.rmtree, builtins.open, io.open = o["rmtree"], o["builtin_open"], o["io_open"]
    _ORIGINAL.clear()


def read_log(log: Path) -> list[tuple[int, str, str]]:
    """The events of a log written by `install`: (n, kind, paths relative to the root's name)."""
    if not log.exists():
        return []
    return [(int(n), kind, paths) for n, kind, paths in (line.split("\t") for line in log.read_text().splitlines())]


def kill_points(events: list[tuple[int, str, str]], out_name: str) -> dict[str, int]:
    """Named kill points of an uninterrupted run's events (names whose event is absent are left out)."""
    total = len(events)

    def last(predicate) -> int | None:
        hits = [n for n, kind, paths in events if predicate(kind, paths)]
        return hits[-1] if hits else None

    def middle(predicate) -> int | None:
        hits = [n for n, kind, paths in events if predicate(kind, paths)]
        return hits[len(hits) // 2] if hits else None

    def moved_to(name):
        return lambda kind, paths: kind in ("rename", "replace", "link") and paths.rsplit(" -> ", 1)[-1].endswith(os.sep + name)

    store_appears = [n for n, kind, paths in events if moved_to(out_name)(kind, paths)]
    points = {
        "first": 1,
        "store-appears": store_appears[0] if store_appears else None,
        "early": max(1, round(0.25 * total)),
        "middle": max(1, round(0.5 * total)),
        "late": max(1, round(0.75 * total)),
        "checkpoint-rename": middle(moved_to(out_name + ".ckpt")),
        "torn-write": middle(lambda kind, paths: kind == "write" and out_name + os.sep in paths),
        "shrink": last(lambda kind, paths: kind in ("replace", "rename") and paths.endswith(os.sep + ".zarray")),
        "attrs": last(lambda kind, paths: kind in ("replace", "rename") and paths.endswith(os.sep + ".zattrs")),
        "consolidation": last(lambda kind, paths: kind in ("replace", "rename") and paths.endswith(os.sep + ".zmetadata")),
        "checkpoint-removal": last(lambda kind, paths: kind in ("unlink", "remove") and paths.endswith(os.sep + out_name + ".ckpt")),
        # overwrite: the new record, built beside the old one, is put in its place
        "swap": last(lambda kind, paths: kind in ("rmtree", "replace", "rename") and (os.sep + out_name + ".") in paths
                     and not paths.endswith((".ckpt", ".lock", ".tmp")) and os.sep + out_name + os.sep not in paths
                     and (kind == "rmtree" or paths.endswith(os.sep + out_name))),
        "last": total,
    }
    return {name: n for name, n in points.items() if n is not None}


# ------------------------------------------------------------------ runs killed in a forked child


@functools.cache
def small_problem() -> fs.Problem:
    return build_problem("mlp", n=64, weight_decay=1e-3, depth=1, width=8)


def case(name: str):
    """(dynamics, integrator, grid) of a small run with five save points."""
    if name == "ode":
        return fs.GradientFlow(), ODE("dopri5", rtol=1e-4, atol=1e-6), {"t1": 0.2, "save_every": 0.05}
    if name == "sgd":  # mini-batches (4 per epoch) and momentum
        return fs.DiscreteSGD(lr=0.1, batch_size=16, momentum=0.9), None, {"t1": 0.4, "save_every": 0.1}
    if name == "sde":  # two Brownian paths, two steps per save interval
        return fs.SGDNoise(lr=0.1, batch_size=16, paths=2), FusedEulerMaruyama(dt=0.05), {"t1": 0.4, "save_every": 0.1}
    raise ValueError(name)


#: the "cli" case: a config run by `flowsim run` (SGD with momentum on digits)
CLI_CONFIG = """
[model]
name = "mlp.mlp"
depth = 1
width = 8
[data]
name = "digits"
n_train = 64
[problem]
weight_decay = 1e-3
[dynamics]
name = "DiscreteSGD"
lr = 0.1
batch_size = 16
momentum = 0.9
[run]
t1 = 0.4
save_every = 0.1
"""


def run(name: str, **kwargs) -> xr.Dataset:
    if name == "cli":
        return fs.load_config(CLI_CONFIG).simulate(progress=False, **kwargs)
    dynamics, integrator, grid = case(name)
    return fs.simulate(small_problem(), dynamics, integrator, progress=False, **grid, **kwargs)


def _child(name: str, out: str, root: str, kill_at: int | None, log: str | None, overwrite: bool) -> None:
    """The body of a forked process: the run, checkpointed at every save point, its writes counted."""
    torch.set_num_threads(1)
    install(root, kill_at, log)
    run(name, out=out, checkpoint_every=0, overwrite=overwrite)
    os._exit(0)


def run_in_child(name: str, out: Path, kill_at: int | None = None, log: Path | None = None, overwrite: bool = False) -> int:
    """Run case `name` to `out` in a forked process (no start-up: the kill lands in the run);
    its exit code (-SIGKILL if the kill came)."""
    child = multiprocessing.get_context("fork").Process(
        target=_child, args=(name, str(out), str(out.parent), kill_at, None if log is None else str(log), overwrite)
    )
    child.start()
    child.join(timeout=300)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail(f"{name}: the run at {out} did not end within 300 s")
    return child.exitcode


TIMING_ATTRS = ("wall_time", "elapsed", "started", "ended", "created", "modified", "duration", "seconds")


def untimed(ds: xr.Dataset) -> xr.Dataset:
    """`ds` without its wall_time variable and timing attrs."""
    ds = ds.drop_vars([v for v in ("wall_time",) if v in ds.variables])
    return ds.assign_attrs({}).assign_attrs({k: v for k, v in ds.attrs.items() if not any(t in k for t in TIMING_ATTRS)})


def same(a: xr.Dataset, b: xr.Dataset, what: str) -> None:
    """Identical (values bit for bit, coords, attrs), wall_time and timing attrs aside."""
    try:
        xr.testing.assert_identical(untimed(a), untimed(b))
    except AssertionError as exc:
        raise AssertionError(f"{what}:\n{exc}") from None


@functools.cache
def reference(name: str) -> xr.Dataset:
    """The uninterrupted run, in memory."""
    return run(name)


@functools.cache
def uninterrupted(name: str, suffix: str, folder: Path, overwrite: bool = False) -> dict[str, int]:
    """Count the writes of an uninterrupted run (checkpoints at every save point; with
    `overwrite`, over an old record); its named kill points."""
    folder = folder / f"{name}{suffix}{'-overwrite' if overwrite else ''}"
    folder.mkdir()
    out, log = folder / f"run{suffix}", folder.parent / f"{folder.name}.log"
    if overwrite:
        old_record(name, out)
    assert run_in_child(name, out, log=log, overwrite=overwrite) == 0
    same(fs.open_record(out), reference(name), f"{name}: the uninterrupted run written to {out.name}")
    events = read_log(log)
    assert events, f"{name}: no write under {folder} was seen"
    return kill_points(events, out.name)


def old_record(name: str, out: Path) -> xr.Dataset:
    """Write at `out` the record of another run (case `name` with seed 1), for overwrite to replace."""
    return run(name, out=out, seed=1)


@pytest.fixture(scope="module")
def counts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("counts")


#: the kill points of each path: most for SGD, a few for the others (their writes are alike)
POINTS = {
    ("sgd", ".zarr"): (
        "first", "store-appears", "checkpoint-rename", "torn-write", "middle", "shrink", "consolidation", "checkpoint-removal",
        "last",
    ),
    ("ode", ".zarr"): ("store-appears", "torn-write", "attrs", "last"),
    ("sde", ".zarr"): ("early", "late", "consolidation"),
    ("sgd", ".nc"): ("store-appears", "checkpoint-rename", "last"),
}


class Leftovers(AssertionError):
    """Files left beside a record whose run has ended."""


def _param(name: str, suffix: str, point: str):
    return pytest.param(name, suffix, point, id=f"{name}-{suffix.lstrip('.')}-{point}")


@pytest.mark.parametrize("name, suffix, point", [_param(n, s, p) for (n, s), points in POINTS.items() for p in points])
def test_sigkill_at_a_write_then_resume_is_the_uninterrupted_run(name, suffix, point, counts, tmp_path):
    points = uninterrupted(name, suffix, counts)
    if point not in points:
        pytest.fail(f"{name}{suffix}: the uninterrupted run makes no {point!r} write; its points: {points}")
    n = points[point]
    out = tmp_path / f"run{suffix}"
    code = run_in_child(name, out, kill_at=n)
    assert code == -signal.SIGKILL, f"{name}{suffix} at {point} (write {n}): the run was not killed (exit code {code})"
    where = f"{name}{suffix} killed at {point} (write {n} of {points['last']})"
    ref = reference(name)

    # what a kill leaves opens, or says cleanly that it cannot
    if out.exists():
        try:
            saved = fs.open_record(out)
        except fs.FlowsimError:
            saved = None
        if saved is not None:
            rows = saved.sizes["time"]
            assert rows <= ref.sizes["time"], where
            same(saved, ref.isel(time=slice(0, rows)).assign_attrs(saved.attrs), f"{where}: the rows of the killed record")

    # resume (or, killed before anything that can be resumed, run again)
    if out.exists() or out.with_name(out.name + ".ckpt").exists():
        resumed = run(name, out=out, resume=True)
    else:
        with pytest.raises(fs.FlowsimError, match="run.resume"):
            run(name, out=out, resume=True)
        resumed = run(name, out=out)
    same(resumed, ref, f"{where}, then resumed")
    same(fs.open_record(out), ref, f"{where}, then resumed: the record on disk")
    assert resumed.attrs["status"] == "completed", where
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != out.name)
    if left:
        raise Leftovers(f"{where}, then resumed: left beside the record: {left}")


#: kill points of a run that overwrites an old record
OVERWRITE_POINTS = {("sgd", ".zarr"): ("early", "consolidation", "swap"), ("sgd", ".nc"): ("middle", "swap")}


@pytest.mark.parametrize(
    "name, suffix, point",
    [pytest.param(n, s, p, id=f"{n}-{s.lstrip('.')}-{p}") for (n, s), points in OVERWRITE_POINTS.items() for p in points],
)
def test_sigkill_while_overwriting_leaves_the_old_record_or_the_new_one(name, suffix, point, counts, tmp_path):
    """overwrite=True over another run's record, killed at a write: the record at `out` is the old
    one, as it was, or the new one complete; overwrite=True again gives the uninterrupted run and
    leaves nothing beside it."""
    points = uninterrupted(name, suffix, counts, overwrite=True)
    if point not in points:
        pytest.fail(f"{name}{suffix} overwrite: the uninterrupted run makes no {point!r} write; its points: {points}")
    n = points[point]
    out = tmp_path / f"run{suffix}"
    old_record(name, out)
    old = fs.open_record(out)
    code = run_in_child(name, out, kill_at=n, overwrite=True)
    where = f"{name}{suffix} overwriting, killed at {point} (write {n} of {points['last']})"
    assert code == -signal.SIGKILL, f"{where}: the run was not killed (exit code {code})"
    ref = reference(name)
    try:
        there = fs.open_record(out)
    except fs.FlowsimError as exc:
        pytest.fail(f"{where}: the record at out does not open ({exc})")
    if there.attrs.get("seed") == old.attrs["seed"]:
        same(there, old, f"{where}: the old record")
    else:
        same(there, ref, f"{where}: the new record")
    again = run(name, out=out, overwrite=True)
    same(again, ref, f"{where}, then overwritten again")
    same(fs.open_record(out), ref, f"{where}, then overwritten again: the record on disk")
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != out.name)
    if left:
        raise Leftovers(f"{where}, then overwritten again: left beside the record: {left}")


@pytest.mark.parametrize("point", ["torn-write", "consolidation"])
def test_sigkill_then_flowsim_run_resume_is_the_uninterrupted_run(point, counts, tmp_path):
    """A config run killed at a write, then `flowsim run CONFIG --out OUT --resume`: exit 0 and
    the uninterrupted run's record."""
    from flowsim.cli import main

    points = uninterrupted("cli", ".zarr", counts)
    n = points[point]
    out, config = tmp_path / "run.zarr", tmp_path / "run.toml"
    config.write_text(CLI_CONFIG)
    where = f"flowsim run killed at {point} (write {n} of {points['last']})"
    assert run_in_child("cli", out, kill_at=n) == -signal.SIGKILL, f"{where}: the run was not killed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 0, where
    same(fs.open_record(out), reference("cli"), f"{where}, then flowsim run --resume")


# ------------------------------------------------------------------ sweeps, in subprocesses

#: test_sweep's config, with weight decay, mini-batches and momentum, checkpointed at every point
SWEEP_CONFIG = (
    CONFIG.replace('loss = "mse"', 'loss = "mse"\nweight_decay = 1e-3')
    .replace("lr = 0.5", "lr = 0.25\nbatch_size = 8\nmomentum = 0.5")
    .replace("t1 = 30.0", "t1 = 3.0")
    .replace("save_every = 10.0", "save_every = 1.0\ncheckpoint_every = 0.0")
)
SWEEP_OVER = {"seed": [0, 1]}

#: a subprocess that runs sweeps on one cluster (a LocalCluster of one worker process, or with
#: "threads" one in-process worker); before a sweep, its worker can be armed with this module's
#: interceptor, to count its writes or be killed at one of them (a restarted worker is unarmed)
DRIVER = """
import json, pickle, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {tests!r})
from distributed import Client, LocalCluster
from flowsim.sweeps import sweep


def arm(*args):
    sys.path.insert(0, {tests!r})
    import test_fault_injection

    test_fault_injection.install(*args)


def disarm():
    sys.path.insert(0, {tests!r})
    import test_fault_injection

    test_fault_injection.uninstall()


if __name__ == "__main__":  # (spawned workers import this file too)
    cluster, steps = sys.argv[1], json.loads(sys.argv[2])
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=cluster == "processes", dashboard_address=":0")
    client = Client(cluster)
    for step in steps:
        if isinstance(step.get("kill_at"), list):  # [name, log, folder]: the point named in an earlier step's log
            import test_fault_injection

            step["kill_at"] = test_fault_injection.sweep_kill_points(*step["kill_at"][1:])[step["kill_at"][0]]
        if step.get("root"):
            client.run(arm, step["root"], step.get("kill_at"), step.get("log"), step.get("action", "self"))
        ds = sweep({config!r}, over={over!r}, client=client, out=step["folder"], progress=False)
        with open(step["result"], "wb") as f:
            pickle.dump(ds.load(), f)
        if step.get("root"):
            client.run(disarm)
    client.close()
    cluster.close()
"""


def sweep_driver(tmp: Path, cluster: str, steps: list[dict], expect_killed: bool = False) -> None:
    """Run the sweeps `steps` (folder, result, and to arm the worker: root, kill_at, log, action)
    in one subprocess, in a session of its own (whatever outlives it is killed by its group)."""
    driver = tmp / "sweep_driver.py"
    driver.write_text(DRIVER.format(tests=str(TESTS), config=SWEEP_CONFIG, over=SWEEP_OVER))
    child = subprocess.Popen(
        [sys.executable, str(driver), cluster, json.dumps(steps, default=str)],
        cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = child.communicate(timeout=400)
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # a worker left behind, if any
        except ProcessLookupError:
            pass
    if expect_killed:
        assert child.returncode == -signal.SIGKILL, f"the sweep was not killed (exit code {child.returncode}):\n{output[-3000:]}"
    else:
        assert child.returncode == 0, f"the sweep driver failed (exit code {child.returncode}):\n{output[-3000:]}"


def load(path: Path) -> xr.Dataset:
    with open(path, "rb") as f:
        return pickle.load(f)


def sweep_kill_points(log: str | Path, folder: str | Path) -> dict[str, int]:
    """Where to kill a sweep, from the log of its uninterrupted worker writing to `folder`:
    "worker" at the final consolidation of the first point's store, "whole" in the middle of the
    second point's writes."""
    events = read_log(Path(log))
    assert events, "the sweep's worker made no write (the interceptor was not installed)"
    names = sorted({Path(paths.split(" -> ")[0]).relative_to(folder).parts[0].split(".zarr")[0] + ".zarr" for _, _, paths in events})
    assert len(names) >= 2, f"the sweep's worker wrote {names} only"
    first, second = names[:2]
    in_first = [n for n, _, paths in events if os.sep + first in paths]
    in_second = [n for n, _, paths in events if os.sep + second in paths]
    consolidation = [n for n, kind, paths in events if kind in ("replace", "rename") and paths.endswith(first + os.sep + ".zmetadata")]
    return {
        "worker": consolidation[-1] if consolidation else in_first[len(in_first) * 3 // 4],
        "whole": in_second[len(in_second) // 2],
        "total": len(events),
    }


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict:
    """One driver, on one LocalCluster of one worker process: an uninterrupted sweep (its
    worker's writes counted), the same sweep with its worker killed at a write of one point's run,
    that sweep called again, and the sweep killed as a whole (the sweep's process, then its
    worker) at a write of the other point's run. A second driver calls the killed sweep again."""
    tmp = tmp_path_factory.mktemp("sweeps")
    log = tmp / "ref.log"
    ref, worker, whole = tmp / "ref", tmp / "worker", tmp / "whole"
    steps = [
        {"folder": ref, "result": tmp / "ref.pkl", "root": ref, "log": log},
        {"folder": worker, "result": tmp / "worker.pkl", "root": worker, "kill_at": ["worker", log, ref], "log": tmp / "worker.log"},
        {"folder": worker, "result": tmp / "worker-again.pkl"},
        {"folder": whole, "result": tmp / "never.pkl", "root": whole, "kill_at": ["whole", log, ref], "action": "parent"},
    ]
    sweep_driver(tmp, "processes", steps, expect_killed=True)
    killed = {p.name: _opens(p) for p in sorted(whole.glob("*.zarr"))}
    sweep_driver(tmp, "threads", [{"folder": whole, "result": tmp / "whole-again.pkl"}])
    points = sweep_kill_points(log, ref)
    return {"tmp": tmp, "worker_kill": points["worker"], "whole_kill": points["whole"], "total": points["total"], "killed": killed}


def _opens(store: Path) -> str:
    """How a store left by a kill opens: its status, or the FlowsimError it raises."""
    try:
        return fs.open_record(store).attrs["status"]
    except fs.FlowsimError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_sweep_worker_killed_at_a_write_is_run_again_by_dask(sweeps):
    """The worker dies (SIGKILL) at the final consolidation of one point's store: dask starts
    another worker and runs the point again, the sweep returns the uninterrupted sweep, and
    calling it again runs nothing."""
    tmp = sweeps["tmp"]
    where = f"sweep with its worker killed at write {sweeps['worker_kill']} of {sweeps['total']}"
    assert read_log(tmp / "worker.log")[-1][0] == sweeps["worker_kill"], f"{where}: the worker was not killed there"
    ref = load(tmp / "ref.pkl")
    same(load(tmp / "worker.pkl").drop_attrs(), ref.drop_attrs(), where)
    again = load(tmp / "worker-again.pkl")
    same(again.drop_attrs(), ref.drop_attrs(), f"{where}, called again")
    assert again.attrs["runs_executed"] == 0, f"{where}, called again: {again.attrs['runs_executed']} points ran again"
    for store in sorted((tmp / "ref").glob("*.zarr")):
        same(fs.open_record(tmp / "worker" / store.name), fs.open_record(store), f"{where}: {store.name}")
    left = sorted(p.name for p in (tmp / "worker").iterdir() if p.suffix != ".zarr")
    assert not left, f"{where}: left in the sweep's folder: {left}"


def test_sweep_killed_as_a_whole_at_a_write_then_called_again(sweeps):
    """The sweep process and its worker die (SIGKILL) in the middle of a point's run: every store
    opens (or says cleanly why not), and the sweep called again runs the unfinished point only
    and returns the uninterrupted sweep."""
    tmp, killed = sweeps["tmp"], sweeps["killed"]
    where = f"sweep killed as a whole at write {sweeps['whole_kill']} of {sweeps['total']}"
    for name, opened in killed.items():
        assert opened in ("completed", "running") or opened.startswith("RecordError"), f"{where}: {name} opens as {opened}"
    unfinished = len(SWEEP_OVER["seed"]) - list(killed.values()).count("completed")
    assert unfinished >= 1, f"{where}: {killed}"
    ref, again = load(tmp / "ref.pkl"), load(tmp / "whole-again.pkl")
    same(again.drop_attrs(), ref.drop_attrs(), f"{where}, called again")
    assert again.attrs["runs_executed"] == unfinished, f"{where} ({killed}), called again: {again.attrs['runs_executed']} points ran"
    for store in sorted((tmp / "ref").glob("*.zarr")):
        same(fs.open_record(tmp / "whole" / store.name), fs.open_record(store), f"{where}, called again: {store.name}")
    left = sorted(p.name for p in (tmp / "whole").iterdir() if p.suffix != ".zarr")
    assert not left, f"{where}, called again: left in the sweep's folder: {left}"
    assert not (tmp / "whole.lock").exists(), f"{where}, called again: the sweep's lock is left"
