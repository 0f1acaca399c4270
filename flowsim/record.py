"""Observers → xarray.Dataset, streamed to zarr (appended as the run goes) or netCDF.

The schema (DESIGN §6): dims ``time`` and ``quantity`` (one entry per law component);
``value``/``grad_sq``/``velocity_sq`` (time, quantity); ``loss``, ``grad_norm``, ``nfe``,
``wall_time``, optional ``sharpness`` (time); optional ``params`` (time, parameter). Coords
``time``, ``step`` (time) and ``law``, ``site``, ``component``, ``exact``, ``scale``
(quantity); hyper-parameters that vary between runs as scalar coords. Attrs hold strings and
numbers only; structured ones are JSON.

A run of many independent members (the paths of an SDE, later an ensemble) carries θ as a
(K, P) batch: every per-θ variable gains that dimension after ``time`` (``value`` (time, path,
quantity), ``loss`` (time, path), …); ``time``, ``step``, ``nfe`` and ``wall_time`` stay shared.
"""

from __future__ import annotations

import json
import os
import shutil
import time as _time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from .errors import ConfigError, RecordError, bad_value
from .integrators import SavePoint
from .laws import LawSet
from .problem import Problem

OBSERVABLES = ("loss", "grad_norm", "sharpness", "params")

#: long_name and units of every variable a record may hold
VARIABLES: dict[str, dict[str, str]] = {
    "value": {"long_name": "law component value Q(θ)"},
    "grad_sq": {
        "long_name": "law form of the gradient that moves θ, Q(ĝ) (|g_A|², |g_A1|² − |g_A2|², Σ g_A)",
    },
    "velocity_sq": {"long_name": "law form of the velocity that moves θ, Q(v)"},
    "theory": {"long_name": "prediction of the law component from the recorded companions (flowsim.theory)"},
    "loss": {"long_name": "data loss L(θ) on the full data, without the weight-decay penalty"},
    "grad_norm": {"long_name": "norm of the gradient that moves θ, |ĝ + λθ|"},
    "sharpness": {"long_name": "largest Hessian eigenvalue of the data loss (power iteration)"},
    "nfe": {"long_name": "cumulative evaluations of the dynamics (vector field calls or SGD steps)"},
    "wall_time": {"long_name": "wall-clock time since the run started", "units": "s"},
    "params": {"long_name": "flat parameter vector θ"},
    "time": {"long_name": "training time", "units": "t = step * lr"},
    "step": {"long_name": "integrator steps taken (SGD steps for discrete dynamics)"},
    "law": {"long_name": "law kind"},
    "site": {"long_name": "module names of the law's layers"},
    "component": {"long_name": "component of the law (unit, channel, column)"},
    "exact": {"long_name": "True where no known term (normalisation eps) breaks the law"},
    "scale": {"long_name": "magnitude of the law's terms at the start (drift is relative to it)"},
    "tensor": {"long_name": "parameter tensor each entry of params belongs to"},
    "quantity": {"long_name": "law component, labelled law:site:component"},
    "lr": {"long_name": "learning rate η"},
    "batch_size": {"long_name": "mini-batch size S (-1: the full data)"},
    "momentum": {"long_name": "momentum β"},
    "dampening": {"long_name": "momentum dampening d"},
    "weight_decay": {"long_name": "weight decay λ"},
    "seed": {"long_name": "seed of batch order and noise"},
    "path": {"long_name": "independent path of the SDE (its noise is seeded by seed, path and step)"},
    "paths": {"long_name": "number of independent SDE paths"},
    "drift": {"long_name": "drift of the SGD-noise SDE (gradient or modified)"},
    "noise": {"long_name": "noise of the SGD-noise SDE (exact or diagonal)"},
    "member": {"long_name": "ensemble member: an independent copy of the run from its own initial parameters"},
}


def check_observe(observe: Sequence[str]) -> tuple[str, ...]:
    if isinstance(observe, str) or not all(isinstance(o, str) for o in observe):
        raise ConfigError(f"run.observe: got {observe!r}; expected a list of names from {', '.join(OBSERVABLES)}")
    unknown = [o for o in observe if o not in OBSERVABLES]
    if unknown:
        raise ConfigError(f"run.observe: got {unknown[0]!r}; expected names from {', '.join(OBSERVABLES)}")
    return tuple(dict.fromkeys(observe))


def check_output(out: str | os.PathLike | None, resume: bool, overwrite: bool) -> Path | None:
    """The output path, refused before any work if it would damage what is there: an existing
    record (or its checkpoint) needs `overwrite` or `resume`, and `resume` needs one."""
    from .checkpoint import checkpoint_path

    if resume and overwrite:
        raise ConfigError("run.resume: got resume=True and overwrite=True; expected one of them (continue the run, or replace it)")
    if out is None:
        if resume:
            raise ConfigError("run.resume: got resume=True without run.out; expected the path of the run to continue")
        return None
    if not isinstance(out, (str, os.PathLike)):
        raise bad_value("run.out", out, "a path (str) ending in .zarr or .nc")
    path = Path(out)
    if path.suffix not in (".zarr", ".nc") or path.name in (".zarr", ".nc"):
        raise ConfigError(f"run.out: got {str(out)!r}; expected a path ending in .zarr or .nc")
    there = [p for p in (path, checkpoint_path(path)) if p.exists()]
    if there and not (resume or overwrite):
        raise ConfigError(f"run.out: {str(there[0])!r} exists; pass overwrite=True to replace it or resume=True to continue it")
    if resume and not there:
        raise ConfigError(f"run.resume: {str(out)!r} does not exist; expected a run to continue (run without resume to start it)")
    if not path.parent.is_dir():
        raise ConfigError(f"run.out: the folder {str(path.parent)!r} does not exist")
    return path


def remove_output(out: Path) -> None:
    """Delete the record at `out` and its checkpoint (``overwrite=True``), the checkpoint first."""
    from .checkpoint import checkpoint_path

    checkpoint_path(out).unlink(missing_ok=True)
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()


def sharpness(problem: Problem, theta: Tensor, iterations: int = 20, start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Largest Hessian eigenvalue of L at θ by power iteration on Hessian-vector products."""
    v = torch.randn_like(theta) if start is None else start
    v = v / v.norm()
    eig = torch.zeros((), dtype=theta.dtype, device=theta.device)
    for _ in range(iterations):
        hv = problem.hvp(theta, v)
        eig = hv @ v
        v = hv / hv.norm().clamp_min(torch.finfo(theta.dtype).tiny)
    return eig, v


def _each(fn, theta: Tensor, *others: Tensor | None):
    """fn(θ, *others) for one θ (P,), or stacked over the members of a (K, P) batch (others are
    matched row by row; None stays None)."""
    if theta.ndim == 1:
        return fn(theta, *others)
    rows = [fn(t, *(None if o is None else o[i] for o in others)) for i, t in enumerate(theta)]
    if isinstance(rows[0], tuple):
        return tuple(torch.stack(column) for column in zip(*rows))
    return torch.stack(rows)


class _ZarrStore:
    """A .zarr record that a kill at any moment leaves readable, its saved rows intact.

    The first flush builds the store in ``<out>.creating`` with every time-dimension array
    allocated to the whole save grid, unwritten rows reading NaN (-1 for step and nfe), then
    renames it to `out`. Each flush writes its rows in place, the ``time`` coordinate last; zarr
    writes every chunk to a temporary file and renames it. So the rows whose ``time`` is not NaN
    are complete, whatever moment a kill comes (`open_record` keeps them). `close` shrinks the
    arrays to the rows saved, so an ended store holds exactly its rows; `reopen` (resume) grows
    them back.
    """

    def __init__(self, path: Path, n_rows: int | None = None) -> None:
        self.path, self.n_rows = path, n_rows
        self.started = False

    def write(self, rows: xr.Dataset, attrs: dict[str, Any], start: int = 0) -> None:
        """Write `rows` (a Dataset of the schema) as rows start, start + 1, … of the record."""
        if self.started:
            self._write_rows(self.path, rows, start)
            return
        creating = self.path.with_name(self.path.name + ".creating")
        shutil.rmtree(creating, ignore_errors=True)
        self._allocate(rows, creating, max(start + rows.sizes["time"], self.n_rows or 0))
        self._write_rows(creating, rows, start)
        _replace_dir(creating, self.path)
        self.started = True

    def reopen(self, n_saved: int, attrs: dict[str, Any]) -> None:
        """Go on writing a store whose first `n_saved` rows are kept (a resumed run)."""
        import zarr

        self.set_attrs(attrs)
        self._resize(max(n_saved, self.n_rows or n_saved))
        zarr.open_array(self.path / "time", mode="r+", zarr_format=2)[n_saved:] = np.nan
        self.started = True

    def close(self, n_saved: int, attrs: dict[str, Any]) -> None:
        """Shrink the store to its `n_saved` rows and stamp the final attrs."""
        self._resize(n_saved)
        self.set_attrs(attrs)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Replace the store's attrs, then its consolidated metadata."""
        import zarr

        zarr.open_group(self.path, mode="r+", zarr_format=2, use_consolidated=False).attrs.put(attrs)
        zarr.consolidate_metadata(self.path, zarr_format=2)

    @staticmethod
    def _allocate(rows: xr.Dataset, path: Path, n_rows: int) -> None:
        """The store's metadata and attrs, its rows allocated and unwritten (xarray writes no
        dask chunk with compute=False; only the small time and step coordinates are written)."""
        import dask.array

        variables, encoding = {}, {}
        for name, var in rows.variables.items():
            if "time" not in var.dims:
                variables[name] = var
                continue
            fill = -1 if np.issubdtype(var.dtype, np.integer) else np.nan
            shape = (n_rows, *var.shape[1:])
            chunks = (max(1, min(n_rows, 2**18 // max(1, int(np.prod(var.shape[1:], dtype=np.int64))))), *var.shape[1:])
            if name in rows.coords:  # time and step: small, written whole
                data: Any = np.full(shape, fill, dtype=var.dtype)
                encoding[name] = {"chunks": chunks}
            else:
                data = dask.array.full(shape, fill, dtype=var.dtype, chunks=chunks)
            variables[name] = xr.Variable(var.dims, data, var.attrs)
        template = xr.Dataset({k: v for k, v in variables.items() if k not in rows.coords}, attrs=rows.attrs)
        template = template.assign_coords({k: variables[k] for k in rows.coords})
        template.to_zarr(path, mode="w", compute=False, zarr_format=2, consolidated=True, encoding=encoding)

    def _write_rows(self, path: Path, rows: xr.Dataset, start: int) -> None:
        """Rows start … start + n − 1 of every time-dimension array, ``time`` last."""
        import zarr

        group = zarr.open_group(path, mode="r+", zarr_format=2, use_consolidated=False)
        stop = start + rows.sizes["time"]
        if stop > group["time"].shape[0]:  # no save grid given: grow as needed
            self._resize(max(stop, 2 * group["time"].shape[0]), path)
        names = [k for k, v in rows.variables.items() if "time" in v.dims and k != "time"] + ["time"]
        for name in names:
            group[name][start:stop] = rows[name].values

    def _resize(self, n_rows: int, path: Path | None = None) -> None:
        """Every time-dimension array to `n_rows` rows (zarr drops the chunks beyond)."""
        import zarr

        path = self.path if path is None else path
        group = zarr.open_group(path, mode="r+", zarr_format=2, use_consolidated=False)
        for _, array in group.arrays():
            if list(array.attrs.get("_ARRAY_DIMENSIONS", []))[:1] == ["time"] and array.shape[0] != n_rows:
                array.resize((n_rows, *array.shape[1:]))
        zarr.consolidate_metadata(path, zarr_format=2)


def _replace_dir(new: Path, path: Path) -> None:
    """Put the folder `new` at `path` by renames (each atomic), removing what was there."""
    if path.exists():
        old = path.with_name(path.name + ".removing")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old)
    else:
        os.replace(new, path)


class _NetCDFStore:
    """netCDF cannot be appended by xarray: the whole record so far is rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write_all(self, ds: xr.Dataset) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        ds.to_netcdf(tmp)
        os.replace(tmp, self.path)


class Recorder:
    """Evaluates the observers at each save point and streams the rows to the output."""

    def __init__(
        self,
        problem: Problem,
        laws: LawSet,
        observe: tuple[str, ...],
        theta0: Tensor,
        coords: dict[str, Any],
        attrs: dict[str, Any],
        out: Path | None = None,
        flush_every: int = 256,
        flush_seconds: float = 10.0,
        members: tuple[str, int] | None = None,
        *,
        n_rows: int | None = None,
        seed: int = 0,
    ) -> None:
        self.problem, self.laws, self.observe = problem, laws, observe
        #: (dim, K) when θ is a (K, P) batch of independent members (e.g. ("path", K)), else None
        self.members = members
        self.coords, self.attrs = coords, dict(attrs)
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.scale = laws.magnitude(theta0.reshape(-1, theta0.shape[-1]).T).T.reshape(*theta0.shape[:-1], -1).cpu().numpy()
        self.pending: list[dict[str, Any]] = []
        self.columns: dict[str, list[np.ndarray]] = {}
        self.n_saved = 0  # rows moved to host memory
        self.n_written = 0  # rows of those already in the store
        self.last_flush = _time.perf_counter()
        self.seed = seed
        self._sharp_vector: Tensor | None = None
        self.zarr = self.netcdf = None
        if out is not None:
            self.zarr, self.netcdf = (_ZarrStore(out, n_rows), None) if out.suffix == ".zarr" else (None, _NetCDFStore(out))

    def state(self) -> dict[str, Any]:
        """What the observers carry from one save point to the next (for checkpoints)."""
        return {"sharp_vector": self._sharp_vector}

    def restore(self, rows: xr.Dataset | None, state: dict[str, Any]) -> None:
        """Continue a run: `rows` (the record's first rows, already in the store) and `state`."""
        self._sharp_vector = state.get("sharp_vector")
        if rows is None or rows.sizes["time"] == 0:
            return
        for name, var in rows.variables.items():
            if "time" in var.dims:
                self.columns[name] = [var.values]
        self.n_saved = self.n_written = rows.sizes["time"]
        if self.zarr is not None:
            self.zarr.reopen(self.n_saved, self.attrs)

    # ------------------------------------------------------------------ rows
    def add(self, point: SavePoint, wall_time: float) -> bool:
        """Observe `point` (θ of shape (P,), or (K, P) for K members); return False (and record
        nothing) if θ or the loss is not finite."""
        problem, theta = self.problem, point.theta
        grad, loss = point.grad, point.loss
        each = _each if not hasattr(problem, "members") else lambda fn, *args: fn(*args)  # an Ensemble evaluates (K, P) at once
        if grad is None:
            loss, grad = each(problem.loss_and_grad, theta)
        elif loss is None and "loss" in self.observe:
            loss = each(problem.loss, theta)
        check = theta.sum() if loss is None else loss.sum() + theta.sum()
        if not torch.isfinite(check):
            return False
        vectors = [theta, grad] if point.velocity is None else [theta, grad, point.velocity]
        # every law on every vector (and member) at once, as the rows of one (V·K, P) matrix:
        # (V, …, Q)
        forms = self.laws.rows(torch.stack(vectors).view(-1, theta.shape[-1])).view(len(vectors), *theta.shape[:-1], -1)
        row: dict[str, Any] = {
            "time": point.time,
            "step": point.step,
            "nfe": point.nfe,
            "wall_time": wall_time,
            "value": forms[0],
            "grad_sq": forms[1],
        }
        if point.velocity is not None:
            row["velocity_sq"] = forms[2]
        if "loss" in self.observe:
            row["loss"] = loss
        if "grad_norm" in self.observe:
            full = grad.add(theta, alpha=problem.weight_decay) if problem.weight_decay else grad
            row["grad_norm"] = full.norm(dim=-1)
        if "sharpness" in self.observe:
            if self._sharp_vector is None:  # seeded, so a run is the same every time
                generator = torch.Generator().manual_seed(self.seed)
                self._sharp_vector = torch.randn(theta.shape, generator=generator, dtype=theta.dtype).to(theta.device)
            row["sharpness"], self._sharp_vector = _each(lambda t, v: sharpness(problem, t, start=v), theta, self._sharp_vector)
        if "params" in self.observe:
            row["params"] = theta.clone()
        self.pending.append(row)
        if len(self.pending) >= self.flush_every or _time.perf_counter() - self.last_flush > self.flush_seconds:
            self.flush()
        return True

    def flush(self) -> None:
        """Move pending rows to host memory (one device sync) and write them to the store."""
        if self.pending:
            for key in self.pending[0]:
                values = [row[key] for row in self.pending]
                array = torch.stack(values).cpu().numpy() if isinstance(values[0], Tensor) else np.asarray(values)
                self.columns.setdefault(key, []).append(array)
            self.n_saved += len(self.pending)
            self.pending = []
        self.last_flush = _time.perf_counter()
        if self.n_written == self.n_saved:
            return
        if self.zarr is not None:
            self.zarr.write(self.dataset(self.n_written, self.n_saved), self.attrs, self.n_written)
        elif self.netcdf is not None:
            self.netcdf.write_all(self.dataset())
        self.n_written = self.n_saved

    def finish(self, status: str, message: str = "") -> xr.Dataset:
        """Flush, stamp the final status on the store (a zarr store shrunk to its rows) and
        return the whole record."""
        self.attrs.update(status=status, status_message=message)
        self.flush()
        ds = self.dataset()
        if self.zarr is not None:
            if self.zarr.started:
                self.zarr.close(self.n_saved, self.attrs)
            else:
                creating = self.zarr.path.with_name(self.zarr.path.name + ".creating")
                shutil.rmtree(creating, ignore_errors=True)
                ds.to_zarr(creating, mode="w", zarr_format=2, consolidated=True)
                _replace_dir(creating, self.zarr.path)
        elif self.netcdf is not None:
            self.netcdf.write_all(ds)
        return ds

    # ------------------------------------------------------------------ schema
    def dataset(self, start: int = 0, stop: int | None = None) -> xr.Dataset:
        """Rows [start, stop) as a Dataset of the flowsim schema."""
        stop = self.n_saved if stop is None else stop
        cols = {k: np.concatenate(v)[start:stop] for k, v in self.columns.items()}
        n = stop - start
        lead, shape = ((self.members[0],), (self.members[1],)) if self.members else ((), ())
        q = self.laws.coords()
        coords: dict[str, Any] = {
            "time": ("time", cols.get("time", np.zeros(0)).astype(np.float64)),
            "step": ("time", cols.get("step", np.zeros(0)).astype(np.int64)),
            "quantity": ("quantity", np.asarray(q["quantity"], dtype=str)),
            "law": ("quantity", np.asarray(q["law"], dtype=str)),
            "site": ("quantity", np.asarray(q["site"], dtype=str)),
            "component": ("quantity", np.asarray(q["component"], dtype=str)),
            "exact": ("quantity", np.asarray(q["exact"], dtype=bool)),
            "scale": ((*lead[: self.scale.ndim - 1], "quantity"), self.scale),
            **self.coords,
        }
        if self.members:
            coords[lead[0]] = (lead[0], np.arange(shape[0]))
        empty_q = np.zeros((n, *shape, self.laws.size))
        data: dict[str, Any] = {
            "value": (("time", *lead, "quantity"), cols.get("value", empty_q)),
            "grad_sq": (("time", *lead, "quantity"), cols.get("grad_sq", empty_q)),
        }
        if "velocity_sq" in cols:
            data["velocity_sq"] = (("time", *lead, "quantity"), cols["velocity_sq"])
        for name in ("loss", "grad_norm", "sharpness"):
            if name in self.observe:
                data[name] = (("time", *lead), cols.get(name, np.zeros((n, *shape))))
        data["nfe"] = ("time", cols.get("nfe", np.zeros(n)).astype(np.int64))
        data["wall_time"] = ("time", cols.get("wall_time", np.zeros(n)).astype(np.float64))
        if "params" in self.observe:
            data["params"] = (("time", *lead, "parameter"), cols.get("params", np.zeros((n, *shape, self.problem.n_params))))
            coords["tensor"] = (
                "parameter",
                np.repeat(np.asarray(self.problem.names, dtype=str), self.problem.sizes),
            )
        ds = xr.Dataset(data, coords=coords, attrs=self.attrs)
        for name, var in ds.variables.items():
            var.attrs.update(VARIABLES.get(name, {}))
        return ds


def json_attr(value: Any) -> str:
    """A structured attribute as a JSON string (attrs hold strings and numbers only)."""
    return json.dumps(value, sort_keys=True, default=str)


def open_record(path: str | os.PathLike) -> xr.Dataset:
    """Open a record written by flowsim (zarr or netCDF), loaded into memory. A zarr store of a
    live or killed run (status "running") gives the rows written in full, those whose ``time``
    is not NaN; plain ``xr.open_zarr`` shows the unwritten rest as NaN (-1 for step, nfe)."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"run: {str(path)!r} does not exist")
    try:
        if path.suffix == ".zarr":
            with xr.open_zarr(path) as ds:
                written = np.isfinite(ds["time"].values)
                n = len(written) if written.all() else int(np.argmin(written))
                return ds.isel(time=slice(0, n)).load()
        with xr.open_dataset(path) as ds:
            return ds.load()
    except Exception as exc:
        raise RecordError(f"run: {str(path)!r} is not a readable flowsim record ({type(exc).__name__}: {exc})") from exc
