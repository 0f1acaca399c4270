"""Where records live on disk: the output policy, the zarr and netCDF stores, reading them back.

Beside a record ``out`` (``run.zarr`` or ``run.nc``) flowsim may keep:

- ``<out>.ckpt``: the checkpoint of a run that can be resumed (flowsim.checkpoint);
- ``<out>.lock``: held while a process writes the record (flowsim.lock);
- ``<out>.new``: the new record of ``overwrite=True``, built beside the old one and swapped in
  only when the run ends (its own checkpoint ``<out>.new.ckpt``); a run that fails, or is
  killed, leaves the old record as it was;
- ``<out>.creating``: a zarr store being laid out before its first rename into place.

flowsim replaces only what it wrote: a path that exists and is not a flowsim record (no
``flowsim_version`` attribute) is refused, ``overwrite`` or not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import ConfigError, RecordError, bad_value

SUFFIXES = (".zarr", ".nc")

#: a record larger than this is returned backed by its store (dask arrays), not loaded
LOAD_LIMIT_BYTES = 2 * 2**30


def checkpoint_path(out: str | os.PathLike) -> Path:
    """Where the checkpoint of the record `out` lives: ``<out>.ckpt`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def remove_checkpoint(out: str | os.PathLike) -> None:
    """Delete the checkpoint of the record `out` and the temporary file of a checkpoint write
    that a kill cut short (``<out>.ckpt.tmp``), if they are there."""
    path = checkpoint_path(out)
    for stale in (path, path.with_name(path.name + ".tmp")):
        stale.unlink(missing_ok=True)


def staging_path(out: Path) -> Path:
    """Where ``overwrite=True`` builds the new record of `out` before swapping it in."""
    return out.with_name(out.name + ".new")


def check_output_path(out: str | os.PathLike | None, resume: bool, overwrite: bool) -> Path | None:
    """The output path, checked for its form (``.zarr`` or ``.nc``, in an existing folder)."""
    if resume and overwrite:
        raise ConfigError("run.resume: got resume=True and overwrite=True; expected one of them (continue the run, or replace it)")
    if out is None:
        if resume:
            raise ConfigError("run.resume: got resume=True without run.out; expected the path of the run to continue")
        return None
    if not isinstance(out, (str, os.PathLike)):
        raise bad_value("run.out", out, "a path (str) ending in .zarr or .nc")
    if "\x00" in os.fspath(out):
        raise bad_value("run.out", out, "a path without NUL characters, ending in .zarr or .nc")
    path = Path(out)
    if path.suffix not in SUFFIXES or path.name in SUFFIXES:
        raise ConfigError(f"run.out: got {str(out)!r}; expected a path ending in .zarr or .nc")
    if not path.parent.is_dir():
        raise ConfigError(f"run.out: the folder {str(path.parent)!r} does not exist")
    return path


def check_output_state(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, what would damage what is at `path` (called under its lock): an
    existing record (or its checkpoint) needs `overwrite` or `resume`, `resume` needs one, and
    nothing that flowsim did not write is ever replaced."""
    there = [p for p in (path, checkpoint_path(path)) if p.exists()]
    if there and not (resume or overwrite):
        raise ConfigError(f"run.out: {str(there[0])!r} exists; pass overwrite=True to replace it or resume=True to continue it")
    if resume and not there:
        raise ConfigError(f"run.resume: {str(path)!r} does not exist; expected a run to continue (run without resume to start it)")
    if path.exists() and not is_flowsim_record(path):
        raise RecordError(
            f"{'run.resume' if resume else 'run.out'}: {str(path)!r} exists and is not a flowsim record; flowsim replaces or continues only "
            "records it wrote (choose another path)"
        )
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"run.out: cannot write in the folder {str(path.parent)!r} (permission denied)")


def is_flowsim_record(path: Path) -> bool:
    """Whether `path` holds a record flowsim wrote (a live, killed or ended one): a zarr group or a
    netCDF file whose attributes carry ``flowsim_version``."""
    try:
        if path.suffix == ".zarr":
            return path.is_dir() and "flowsim_version" in json.loads((path / ".zattrs").read_text())
        if path.suffix == ".nc" and path.is_file():
            import netCDF4

            with netCDF4.Dataset(path) as nc:
                return "flowsim_version" in nc.ncattrs()
    except (OSError, ValueError):
        return False
    return False


def remove(path: Path) -> None:
    """Delete a store (a folder or a file) and its checkpoint, if they are there."""
    remove_checkpoint(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE); False
    where the system or the file system cannot."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def replace(new: Path, path: Path) -> None:
    """Put the store `new` (a folder or a file) at `path`, removing what was there. Files move by
    one rename; folders by an atomic exchange where the system has one, so that a kill at any
    moment leaves the old store or the new one at `path`, never neither."""
    if not path.exists() or new.is_file():
        os.replace(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new)  # now the old store
        return
    old = path.with_name(path.name + ".removing")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old)


def write_record(ds: xr.Dataset, path: Path) -> None:
    """Write a whole record to the .zarr `path`, replacing any store there: built in
    ``<path>.creating``, then put in place by `replace`, so a kill leaves one whole record."""
    creating = path.with_name(path.name + ".creating")
    if creating.is_dir():
        shutil.rmtree(creating)
    ds.to_zarr(creating, mode="w", zarr_format=2, consolidated=True)
    replace(creating, path)


class ZarrStore:
    """A .zarr record that a kill at any moment leaves readable, its saved rows intact.

    The first write lays the store out in ``<path>.creating`` and renames it to `path`. Its
    time-dimension arrays grow with the rows (doubling, up to the run's save grid), unwritten
    rows reading NaN (-1 for step and nfe), so plain ``xr.open_zarr`` of a live store reads at
    most twice the rows written. Each write puts its rows in place, the ``time`` coordinate last;
    zarr writes every chunk to a temporary file and renames it. So the rows whose ``time`` is not
    NaN are complete, whatever moment a kill comes (`open_record` keeps them). `close` shrinks
    the arrays to the rows saved; `reopen` (resume) goes on after them.
    """

    def __init__(self, path: Path, n_rows: int | None = None) -> None:
        self.path, self.n_rows = path, n_rows
        self.started = False

    def write(self, rows: xr.Dataset, start: int = 0) -> None:
        """Write `rows` (a Dataset of the schema) as rows start, start + 1, … of the record."""
        if self.started:
            self._write_rows(self.path, rows, start)
            return
        creating = self.path.with_name(self.path.name + ".creating")
        shutil.rmtree(creating, ignore_errors=True)
        self._allocate(rows, creating, start + rows.sizes["time"])
        self._write_rows(creating, rows, start)
        os.rename(creating, self.path)  # never over a store that is there
        self.started = True

    def reopen(self, n_saved: int, attrs: dict[str, Any]) -> None:
        """Go on writing a store whose first `n_saved` rows are kept (a resumed run): the rows a
        killed run wrote after them are marked unwritten."""
        import zarr

        self.set_attrs(attrs)
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

    def _allocate(self, rows: xr.Dataset, path: Path, n_rows: int) -> None:
        """The store's metadata and attrs with `n_rows` rows allocated and unwritten (xarray
        writes no dask chunk with compute=False; only the small time and step coordinates are
        written). Chunks along time are sized for the whole save grid."""
        import dask.array

        variables, encoding = {}, {}
        grid_rows = max(n_rows, self.n_rows or 0)
        for name, var in rows.variables.items():
            if "time" not in var.dims:
                variables[name] = var
                continue
            fill = -1 if np.issubdtype(var.dtype, np.integer) else np.nan
            shape = (n_rows, *var.shape[1:])
            chunks = (max(1, min(grid_rows, 2**18 // max(1, int(np.prod(var.shape[1:], dtype=np.int64))))), *var.shape[1:])
            encoding[name] = {"chunks": chunks}
            if name in rows.coords:  # time and step: small, written whole
                data: Any = np.full(shape, fill, dtype=var.dtype)
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
        allocated = min(a.shape[0] for _, a in _time_arrays(group))  # a kill may have cut a resize short
        if stop > allocated:  # grow: double, within the save grid when there is one
            grown = max(stop, 2 * allocated)
            self._resize(grown if self.n_rows is None else max(stop, min(grown, self.n_rows)), path)
        names = [k for k, v in rows.variables.items() if "time" in v.dims and k != "time"] + ["time"]
        for name in names:
            group[name][start:stop] = rows[name].values

    def _resize(self, n_rows: int, path: Path | None = None) -> None:
        """Every time-dimension array to `n_rows` rows (zarr drops the chunks beyond; new rows
        read the fill value), then the consolidated metadata."""
        import zarr

        path = self.path if path is None else path
        group = zarr.open_group(path, mode="r+", zarr_format=2, use_consolidated=False)
        for _, array in _time_arrays(group):
            if array.shape[0] != n_rows:
                array.resize((n_rows, *array.shape[1:]))
        zarr.consolidate_metadata(path, zarr_format=2)


def _time_arrays(group) -> list:
    """The (name, array) pairs of a zarr group's arrays along ``time``."""
    return [(name, a) for name, a in group.arrays() if list(a.attrs.get("_ARRAY_DIMENSIONS", []))[:1] == ["time"]]


class NetCDFStore:
    """netCDF cannot be appended by xarray: the whole record so far is rewritten atomically (so
    a netCDF run holds its rows in memory; a zarr store holds only a window)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write_all(self, ds: xr.Dataset) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        ds.to_netcdf(tmp)
        os.replace(tmp, self.path)


#: variables every record holds (flowsim.record.schema)
REQUIRED = ("value", "grad_sq", "nfe", "wall_time")


def open_record(path: str | os.PathLike, *, load: bool | None = True) -> xr.Dataset:
    """Open a record written by flowsim (zarr or netCDF), loaded into memory (`load=None`: loaded
    if it is at most 2 GiB, else backed by its store). A zarr store of a live or killed run
    (status "running") gives the rows written in full, those whose ``time`` is not NaN."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"run: {str(path)!r} does not exist")
    def opened(chunks):  # chunks=None: no dask (nor its threads, which a forked child must not use)
        if path.suffix == ".zarr" and path.is_dir():
            return xr.open_zarr(path, chunks=chunks)
        return xr.open_dataset(path, chunks=chunks)

    try:
        ds = opened(None)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RecordError(f"run: {str(path)!r} is not a readable flowsim record ({type(exc).__name__}: {first})") from exc
    missing = [name for name in REQUIRED if name not in ds.variables]
    if "flowsim_version" not in ds.attrs or "time" not in ds.dims or missing:
        ds.close()
        what = f"its {missing[0]!r} variable is missing" if "flowsim_version" in ds.attrs and missing else "no flowsim schema"
        raise RecordError(f"run: {str(path)!r} is not a readable flowsim record ({what})")
    written = np.isfinite(ds["time"].values)
    n = len(written) if written.all() else int(np.argmin(written))
    if load or (load is None and ds.isel(time=slice(0, n)).nbytes <= LOAD_LIMIT_BYTES):
        with ds:
            return ds.isel(time=slice(0, n)).load()
    ds.close()
    return opened({}).isel(time=slice(0, n))


def record_attrs(out: Path) -> dict[str, Any] | None:
    """The attrs of the record at `out`, or None if there is none or it cannot be read."""
    if not out.exists():
        return None
    try:
        with (xr.open_zarr(out) if out.suffix == ".zarr" else xr.open_dataset(out)) as ds:
            return dict(ds.attrs)
    except Exception:
        return None

