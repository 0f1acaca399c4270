"""Hyper-parameter sweeps on dask.distributed: every point of a grid is one run.

    fs.sweep("run.toml", over={"lr": [0.05, 0.1], "seed": range(8)}, out="sweep/")

A point is the config with the point's values written into it (``lr`` → ``[dynamics] lr``,
``seed`` → ``[run] seed``, ``weight_decay`` → ``[problem]``, ``section.key`` for any other key).
Each point runs as one task on a dask cluster (a LocalCluster of processes by default, or the
scheduler at an address) and writes its own zarr store ``<out>/<name>=<value>,….zarr``. A run
that diverges or fails is recorded by its status (``completed``, ``diverged``, ``failed``) and
the sweep goes on. A point whose store holds a finished run (completed or diverged) of the same
config is not run again, so calling a sweep again resumes it. One sweep at a time writes to a
folder: it holds the lock ``<out>.lock`` (`flowsim.lock`) from its first write to its return.
The LocalCluster's worker processes die with the sweep's process, even when it is killed
(SIGKILL): on Linux the kernel kills them (``PR_SET_PDEATHSIG``, set by a worker preload); a
worker still starting goes when its start ends (distributed's watch of its parent).

With ``ensemble_seeds=True`` the points that differ only by ``[run] seed`` run as one task,
one ``simulate(ensemble=K, member_seeds=…)`` whose member k starts from the θ0 of seed s_k and
draws the batches of seed s_k, so it equals the point's own run (to round-off with the step
loop or a fixed-step ODE method). Each member is written to its point's store as a run of its
own. A group whose ensemble does not complete (a member diverged, or it raised) runs again one
point per task, so every point ends with the status and record of the plain sweep.

The result is one Dataset: every variable of the runs with the sweep's dimensions first
(``value`` (lr, seed, time, quantity), ``loss`` (lr, seed, time), …), and ``status`` /
``status_message`` per point. Times of different points are matched to 12 decimals (SGD's
times k·lr can differ in the last bit between learning rates); a point that stopped early has
NaN after its last save. ``step`` and ``scale``, which differ between points, become data
variables.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .config import PROBLEM_KEYS, RUN_KEYS, load_config
from .ensemble import check_batched
from .errors import ConfigError, FlowsimError, check_number
from .lock import output_lock
from .simulation import save_grid
from .status import Status
from .store import remove_checkpoint, write_record
from .toml import dumps, read_toml

#: statuses of a finished run: its point is not run again
FINISHED = tuple(s.value for s in Status if s.ended)
#: where a bare name in `over` goes when the config does not already set it
_SEARCH = ("run", "problem", "dynamics", "integrator", "model", "data")


def _locate(name: str, tables: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """(section, key) of a sweep name: ``section.key``, or the section that sets `key`, or the
    section a key of that name belongs to ([run], [problem], else [dynamics])."""
    if "." in name:
        section, key = name.split(".", 1)
        return section, key
    for section in _SEARCH:
        if name in tables.get(section, {}):
            return section, name
    if name in RUN_KEYS:
        return "run", name
    return ("problem", name) if name in PROBLEM_KEYS else ("dynamics", name)


def _check_over(over: Mapping[str, Iterable[Any]]) -> dict[str, list[Any]]:
    if not isinstance(over, Mapping) or not over:
        raise ConfigError(f"sweep.over: got {over!r}; expected a mapping of names to lists of values")
    grid = {}
    for name, values in over.items():
        values = list(values) if not isinstance(values, (str, bytes)) and isinstance(values, Iterable) else None
        if not values or not all(isinstance(v, (bool, int, float, str)) for v in values):
            raise ConfigError(f"sweep.over.{name}: got {over[name]!r}; expected a non-empty list of numbers, booleans or strings")
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep.over.{name}: got {values!r}; expected distinct values")
        if name.split(".")[-1] in ("out", "overwrite", "progress"):
            raise ConfigError(f"sweep.over.{name}: cannot be swept; the sweep sets it for every point")
        grid[name.split(".")[-1]] = values
    if len(grid) != len(over):
        raise ConfigError(f"sweep.over: {list(over)} name the same key twice")
    return grid


def _point_name(point: Mapping[str, Any]) -> str:
    """The store name of a point: ``lr=0.05,seed=3`` (characters other than [\\w.+-=,] as _)."""
    return re.sub(r"[^\w.+\-=,]", "_", ",".join(f"{k}={v}" for k, v in point.items()))


def run_point(text: str, out: str | None) -> tuple[str, str, xr.Dataset | None]:
    """One point of a sweep (runs on a dask worker): (status, message, the record if `out` is None).
    Any exception becomes status "failed" with its message, so the sweep goes on."""
    try:
        ds = load_config(text, out=out, overwrite=out is not None, progress=False).simulate(throw=False)
    except Exception as exc:  # a point's failure is data of the sweep, not the end of it
        return Status.FAILED.value, f"{type(exc).__name__}: {exc}", None
    return ds.attrs["status"], ds.attrs["status_message"], (ds if out is None else None)


def run_members(texts: Sequence[str], outs: Sequence[str | None]) -> list[tuple[str, str, xr.Dataset | None]] | None:
    """Points that differ only by ``[run] seed`` as one ensemble (runs on a dask worker): member
    k starts from the θ0 the config builds under seed s_k and draws the batches of seed s_k.
    Returns each point's (status, message, record if its out is None) as `run_point` does, every
    member's record written to its own store; or None if the ensemble did not complete (a member
    diverged, or it raised), for the caller to run the points one by one."""
    import torch

    try:
        configs = [load_config(text) for text in texts]
        seeds = [config.run.get("seed", 0) for config in configs]
        theta0 = torch.stack([config.problem.initial_theta() for config in configs])
        # a divergence is retried point by point
        ds = configs[0].simulate(seed=seeds[0], ensemble=theta0, member_seeds=seeds, out=None, progress=False, throw=False)
    except Exception:  # e.g. a model torch.func.vmap cannot batch: the plain runs say what is wrong
        return None
    if ds.attrs["status"] != Status.COMPLETED:
        return None
    outcomes = []
    for k, (text, out) in enumerate(zip(texts, outs)):
        record = _member_record(ds, k, text)
        if out is not None:  # as simulate(overwrite=True) would: built beside, swapped in, its checkpoint gone
            store = Path(out)
            with output_lock(store):
                write_record(record, store)
                remove_checkpoint(store)
        outcomes.append((record.attrs["status"], record.attrs["status_message"], None if out is not None else record))
    return outcomes


def _member_record(ds: xr.Dataset, k: int, text: str) -> xr.Dataset:
    """Member k of an ensemble record as the record of its own run (config `text`)."""
    record = ds.isel(member=k).drop_vars("member")
    attrs = {name: value for name, value in ds.attrs.items() if name != "ensemble"}
    record.attrs = {**attrs, "seed": int(record.seed), "config": text}
    return record


def _finished(store: Path, text: str) -> bool:
    """Whether `store` holds a finished run of the config `text`."""
    if not store.exists():
        return False
    try:
        import zarr

        attrs = zarr.open_group(store, mode="r").attrs
        return attrs.get("status") in FINISHED and attrs.get("config") == text
    except Exception:  # an unreadable store (a run killed before its first write) is run again
        return False


def _worker_preload() -> str:
    """A dask preload (Python text) for the LocalCluster's workers: each asks the kernel to
    SIGKILL it when its parent, this process (the nannies live here), dies (Linux prctl
    PR_SET_PDEATHSIG). distributed's own watch, a thread of the worker reading a pipe from the
    parent, acts only when the worker's interpreter lets it run; the kernel needs nothing."""
    return f"""
import ctypes, os, signal, sys
if sys.platform.startswith("linux") and os.getppid() == {os.getpid()}:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != {os.getpid()}:  # the sweep died before the prctl
        os._exit(1)
"""


def _local_cluster(workers: int):
    """A LocalCluster of `workers` processes, one thread each, that die with this process."""
    import dask
    from distributed import LocalCluster

    preload = [*dask.config.get("distributed.worker.preload"), _worker_preload()]
    argv = dask.config.get("distributed.worker.preload-argv")
    if argv and not isinstance(argv[0], str):  # one list of arguments per preload
        argv = [*argv, []]
    return LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", preload=preload, preload_argv=argv
    )


def _reach(address: str, timeout: float) -> None:
    """Raise ConfigError unless a dask scheduler at `address` completes the handshake within
    `timeout` seconds (distributed's Client waits for that handshake without a limit)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
        await comm.close()

    with ThreadPoolExecutor(1) as pool:  # a loop of its own, also when the caller runs one
        try:
            pool.submit(asyncio.run, handshake()).result()
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            detail = "" if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) else f" ({exc})"
            raise ConfigError(
                f"sweep.scheduler: got {address!r}; expected a dask scheduler that answers within {timeout:g} s{detail}"
            ) from exc


def _client(client: Any, workers: int, timeout: float):
    """(client, [what to close after the sweep]): an existing Client (closed by its owner), a
    scheduler address (reached within `timeout` seconds), or a new LocalCluster of `workers`
    processes with one thread each."""
    from distributed import Client

    if client is None:
        cluster = _local_cluster(workers)
        own = Client(cluster)
        return own, [own, cluster]
    if isinstance(client, str):
        _reach(client, timeout)
        try:
            own = Client(client, timeout=timeout)
        except OSError as exc:
            raise ConfigError(f"sweep.scheduler: got {client!r}; expected a dask scheduler that answers ({exc})") from exc
        return own, [own]
    if not isinstance(client, Client):
        raise ConfigError(f"sweep.client: got {type(client).__name__}; expected a distributed.Client, an address or None")
    return client, []


def _point_record(ds: xr.Dataset, point: Mapping[str, Any], status: str, message: str) -> xr.Dataset:
    """One run's record with the sweep's dimensions (length 1) in front."""
    ds = ds.reset_coords([c for c in ("step", "scale") if c in ds.coords])
    ds = ds.drop_vars([name for name in point if name in ds.variables])
    if "time" in ds.indexes:
        ds = ds.assign_coords(time=np.round(ds.time.values, 12))
    ds = ds.assign(status=((), status), status_message=((), message))
    return ds.expand_dims({name: [value] for name, value in point.items()})


def sweep(
    config: str | os.PathLike,
    over: Mapping[str, Iterable[Any]],
    client: Any = None,
    out: str | os.PathLike | None = None,
    workers: int = 2,
    progress: bool = True,
    ensemble_seeds: bool = False,
    scheduler_timeout: float = 10.0,
) -> xr.Dataset:
    """Run `config` at every point of the grid `over` on dask.distributed and gather the records.

    **Main arguments**

    - `config`: a TOML run config (path or text); its ``[run] out`` is ignored.
    - `over`: ``{name: values}``; the grid is their product, in this order. A name is a config
      key (``lr``, ``seed``, ``weight_decay``, ``batch_size``…) or ``section.key``.
    - `out`: a folder for the runs' zarr stores (created if missing); points already finished
      there with the same config are not run again. None keeps the records in memory only.

    **Other arguments**

    - `client`: a ``distributed.Client``, a scheduler address (``"tcp://host:8786"``), or None
      for a LocalCluster of `workers` processes, one thread each (closed at the end; they die
      with this process).
    - `scheduler_timeout`: seconds a scheduler at an address has to answer.
    - `progress`: a tqdm bar counting finished runs.
    - `ensemble_seeds`: run the points that differ only by ``seed`` (``[run] seed``) as one
      ensemble task (module docstring); the result is the same Dataset.

    **Returns** one Dataset with dims (*over, time, quantity, …) and per-point ``status``.
    The attrs hold the sweep (``sweep``: JSON of the grid) and ``runs_executed`` (points run);
    with `ensemble_seeds` also ``ensembles_executed`` (groups that completed as one ensemble)
    and ``ensembles_rerun`` (groups run again point by point).

    **Raises** ConfigError before any work if the grid or any point's config is invalid, or if
    the scheduler at `client` does not answer; RecordError if another process holds `out`.
    """
    tables = read_toml(config)[1]
    grid = _check_over(over)
    workers = int(workers)
    if workers < 1:
        raise ConfigError(f"sweep.workers: got {workers}; expected at least 1")
    scheduler_timeout = check_number("sweep.scheduler_timeout", scheduler_timeout, minimum=0, exclusive_minimum=True)
    folder = None
    if out is not None:
        folder = Path(out)
        if folder.suffix in (".zarr", ".nc") or (folder.exists() and not folder.is_dir()):
            raise ConfigError(f"sweep.out: got {str(out)!r}; expected a folder for the runs' stores")
        if not folder.parent.exists():
            raise ConfigError(f"sweep.out: the folder {str(folder.parent)!r} does not exist")
    located = {name: _locate(key, tables) for name, key in zip(grid, over)}
    seed_name = next((name for name in grid if located[name] == ("run", "seed")), None)
    if ensemble_seeds and seed_name is None:
        raise ConfigError("sweep.ensemble_seeds: the sweep has no seed ([run] seed) in over; expected seed=… among its names")
    if ensemble_seeds and "ensemble" in tables.get("run", {}):
        raise ConfigError("sweep.ensemble_seeds: the config sets run.ensemble; expected one or the other")

    # --- 1. every point's config, validated before any work
    points, texts = [], []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        point_tables = {s: dict(t) for s, t in tables.items()}
        point_tables.setdefault("run", {})
        for key in ("out", "overwrite", "progress"):
            point_tables["run"].pop(key, None)
        for name, value in point.items():
            section, key = located[name]
            point_tables.setdefault(section, {})[key] = value
        text = dumps(point_tables)
        try:
            checked = load_config(text)
            save_grid(checked.dynamics, checked.run["t1"], checked.run["save_every"])
        except FlowsimError as exc:
            raise ConfigError(f"sweep point {_point_name(point)}: {exc}") from exc
        if ensemble_seeds:
            check_batched(checked.dynamics, "sweep.ensemble_seeds")
        points.append(point)
        texts.append(text)
    # the folder is this sweep's alone from its first write to its return
    with output_lock(folder, "sweep.out") if folder is not None else contextlib.nullcontext():
        if folder is not None:
            folder.mkdir(exist_ok=True)
        stores = [None if folder is None else folder / f"{_point_name(p)}.zarr" for p in points]
        todo = [i for i, store in enumerate(stores) if store is None or not _finished(store, texts[i])]
        tasks: dict[tuple, list[int]] = {}  # the points of each task: one, or a group of seeds
        for i in todo:
            key = (i,) if not ensemble_seeds else tuple(v for name, v in points[i].items() if name != seed_name)
            tasks.setdefault(key, []).append(i)

        # --- 2. run what is left on the cluster
        outcomes: dict[int, tuple[str, str, xr.Dataset | None]] = {}
        ensembles = {"ensembles_executed": 0, "ensembles_rerun": 0}
        if todo:
            from distributed import as_completed
            from tqdm.auto import tqdm

            dask_client, to_close = _client(client, workers, scheduler_timeout)
            outs = [None if store is None else str(store) for store in stores]

            def submit(indices: list[int]):
                if len(indices) == 1:
                    return dask_client.submit(run_point, texts[indices[0]], outs[indices[0]], pure=False)
                return dask_client.submit(run_members, [texts[i] for i in indices], [outs[i] for i in indices], pure=False)

            try:
                futures = {submit(indices): indices for indices in tasks.values()}
                running = as_completed(futures)
                with tqdm(total=len(todo), unit="run", desc="sweep", disable=not progress) as bar:
                    for future in running:
                        indices, result = futures[future], future.result()
                        if len(indices) > 1 and result is None:  # the ensemble did not complete: its points one by one
                            ensembles["ensembles_rerun"] += 1
                            for i in indices:
                                retry = submit([i])
                                futures[retry] = [i]
                                running.add(retry)
                            continue
                        ensembles["ensembles_executed"] += len(indices) > 1
                        outcomes.update(zip(indices, [result] if len(indices) == 1 else result))
                        bar.update(len(indices))
            finally:
                for owned in to_close:
                    owned.close()

        # --- 3. one Dataset
        parts = []
        for i, (point, store) in enumerate(zip(points, stores)):
            status, message, record = outcomes.get(i, (None, "", None))
            if record is None and store is not None and store.exists() and status != Status.FAILED:
                record = xr.open_zarr(store).load()
                status, message = record.attrs["status"], record.attrs["status_message"]
            parts.append(_point_record(record if record is not None else xr.Dataset(), point, status, message))
        ds = xr.merge(parts, join="outer", compat="no_conflicts", combine_attrs="drop_conflicts")
        ds = ds.transpose(*grid, ...)
        for name in ("status", "status_message"):
            ds[name] = ds[name].astype(str)
        ds.attrs.update(sweep=json.dumps({name: list(v) for name, v in grid.items()}), runs_executed=len(todo))
        if ensemble_seeds:
            ds.attrs.update(ensembles)
        return ds


def parse_over(items: Sequence[str]) -> dict[str, list[Any]]:
    """``--over`` arguments: ``name=v1,v2,…`` (TOML scalars, bare words as strings) or an integer
    range ``name=start:stop[:step]`` (stop excluded, as in Python)."""
    over: dict[str, list[Any]] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ConfigError(f"sweep.over: got {item!r}; expected name=v1,v2,… or name=start:stop[:step]")
        if re.fullmatch(r"-?\d+:-?\d+(:-?\d+)?", spec):
            values: list[Any] = list(range(*(int(p) for p in spec.split(":"))))
        else:
            values = [_scalar(v) for v in spec.split(",")]
        if name in over:
            raise ConfigError(f"sweep.over.{name}: given twice")
        over[name] = values
    return over


def _scalar(text: str) -> Any:
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"sweep.over: got {text!r}; expected a finite number")
    return value
