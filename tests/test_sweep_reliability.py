"""`flowsim sweep` when things go wrong: a scheduler that never answers, a sweep killed with
SIGKILL (its workers must die with it), two sweeps on one folder."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import flowsim as fs
from flowsim import cli
from flowsim.lock import lock_path, output_lock
from flowsim.sweeps import sweep

distributed = pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")

from test_sweep import CONFIG  # noqa: E402  (after the importorskips)
#: runs of 10⁶ steps: still running when the test kills the sweep
LONG = (
    CONFIG.replace("lr = 0.5", "lr = 0.001")
    .replace("t1 = 30.0", "t1 = 1000.0")
    .replace("save_every = 10.0", "save_every = 100.0")
)
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` until it returns something true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    pytest.fail(f"no {what} after {timeout} s")


def alive(process: psutil.Process) -> bool:
    """Running, not a zombie waiting for its new parent (init) to reap it."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture()
def silent_address():
    """A listening socket that accepts connections and never says a word."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"tcp://127.0.0.1:{server.getsockname()[1]}"


def test_unreachable_scheduler_times_out(tmp_path, silent_address, capsys):
    """A refused connection and a socket that never speaks dask: a ConfigError naming
    sweep.scheduler and the address after `scheduler_timeout` seconds; the CLI exits 2."""
    for address in ("tcp://127.0.0.1:1", silent_address):
        start = time.monotonic()
        with pytest.raises(
            fs.ConfigError,
            match=re.escape(f"sweep.scheduler: got '{address}'; expected a dask scheduler that answers within 1 s"),
        ):
            sweep(CONFIG, over={"lr": [0.5]}, client=address, out=tmp_path / "sweep", progress=False, scheduler_timeout=1)
        assert time.monotonic() - start < 10
    assert not lock_path(tmp_path / "sweep").exists()  # the lock went with the sweep
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    argv = ["sweep", str(config), "--over", "lr=0.5", "--scheduler", silent_address, "--scheduler-timeout", "1", "--no-progress"]
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    assert f"sweep.scheduler: got '{silent_address}'" in capsys.readouterr().err
    with pytest.raises(fs.ConfigError, match="sweep.scheduler_timeout: got 0"):
        sweep(CONFIG, over={"lr": [0.5]}, client=silent_address, scheduler_timeout=0)


def test_local_cluster_workers_die_with_their_parent():
    """Every worker process of the sweep's LocalCluster asked the kernel for SIGKILL at its
    parent's death (prctl PR_GET_PDEATHSIG), and its parent is this process."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    from flowsim.sweeps import _local_cluster

    def death_signal():
        import ctypes

        signal_number = ctypes.c_int()
        ctypes.CDLL(None).prctl(2, ctypes.byref(signal_number))  # 2: PR_GET_PDEATHSIG
        return os.getppid(), signal_number.value

    with _local_cluster(2) as cluster, distributed.Client(cluster) as client:
        assert sorted(client.run(death_signal).values()) == [(os.getpid(), signal.SIGKILL)] * 2


def test_killed_sweep_leaves_no_process_and_holds_its_folder(tmp_path, capsys):
    """`flowsim sweep` in its own process: while it runs, a second sweep on its folder is refused
    with a RecordError naming it (the CLI exits 2); after SIGKILL every process it started is
    gone within a few seconds, and its lock can be taken."""
    config, out = tmp_path / "run.toml", tmp_path / "sweep"
    config.write_text(LONG)
    args = ["sweep", str(config), "--over", "seed=0:4", "--out", str(out), "--no-progress"]
    process = subprocess.Popen(
        [sys.executable, "-m", "flowsim.cli", *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # both workers run a point: its lock (simulate's), checkpoint or store is in the folder
        wait_for(lambda: len({p.name.split(".zarr")[0] for p in out.glob("*.zarr*")}) >= 2, 90, "two points running")
        descendants = psutil.Process(process.pid).children(recursive=True)
        assert len(descendants) >= 2
        with pytest.raises(fs.RecordError, match=re.escape(f"sweep.out: '{out}' is being written by pid {process.pid} ")):
            sweep(LONG, over={"seed": [0, 1]}, out=out, progress=False)
        assert cli.main(args) == cli.EXIT_BAD_INPUT
        assert f"is being written by pid {process.pid}" in capsys.readouterr().err
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        wait_for(lambda: not any(alive(p) for p in descendants), 10, "end of its processes")
    finally:
        process.kill()
        process.wait(10)
    with output_lock(out, "sweep.out"):  # the kernel released the dead sweep's lock
        pass


def test_second_sweep_refused_while_another_process_holds_the_folder(tmp_path):
    """A RecordError naming the holder before any work: the folder is not even created."""
    out = tmp_path / "sweep"
    code = "import sys; from flowsim.lock import output_lock\nwith output_lock(sys.argv[1], 'sweep.out'):\n print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(fs.RecordError, match=re.escape(f"sweep.out: '{out}' is being written by pid {holder.pid} ")):
            sweep(CONFIG, over={"lr": [0.5, 1.0]}, out=out, progress=False)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait(10)
