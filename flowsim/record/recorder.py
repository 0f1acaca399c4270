"""The recorder: observes every save point and streams the rows to the store (zarr, appended as
the run goes, or netCDF), in the schema of flowsim.record.schema."""

from __future__ import annotations

import time as _time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from ..errors import ConfigError
from ..laws import LawSet
from ..problem import Problem
from ..store import NetCDFStore, ZarrStore, open_record
from ..terms import SavePoint
from .observers import all_finite, per_member, sharpness
from .schema import DYNAMICS_VARIABLES, STATS, VARIABLES, sharpness_k


#: the row's entries that are views of the law forms (``LawSet.rows`` of θ, ĝ and the velocity)
FORMS = ("value", "grad_sq", "velocity_sq")


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
        store: ZarrStore | NetCDFStore | None = None,
        flush_every: int = 256,
        flush_seconds: float = 10.0,
        members: tuple[str, int] | None = None,
        *,
        seed: int = 0,
        dynamics_observe: Callable[[Tensor], dict[str, Tensor]] | None = None,
    ) -> None:
        self.problem, self.laws, self.observe = problem, laws, observe
        #: (dim, K) when θ is a (K, P) batch of independent members (e.g. ("path", K)), else None
        self.members = members
        self.coords, self.attrs = coords, dict(attrs)
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.scale = laws.magnitude(theta0.reshape(-1, theta0.shape[-1]).T).T.reshape(*theta0.shape[:-1], -1).cpu().numpy()
        self.pending: list[dict[str, Any]] = []
        #: rows held in host memory: all of them, or, with a zarr store, those not yet written
        self.columns: dict[str, list[np.ndarray]] = {}
        self.n_saved = 0  # rows moved to host memory
        self.n_written = 0  # rows of those already in the store
        self.last_flush = _time.perf_counter()
        self.seed = seed
        #: the top k Hessian eigenvalues observed (0: no sharpness), and the subspace (…, P, b)
        #: the eigen-solver starts from at the next save point (None: a seeded random one)
        self.sharpness_k = sharpness_k(observe)
        if self.sharpness_k > problem.n_params:
            raise ConfigError(
                f"run.observe: got sharpness:{self.sharpness_k}; expected at most the model's {problem.n_params} parameters"
            )
        self._sharp_subspace: Tensor | None = None
        self.store = store
        #: the names of the integrator's statistics (``SavePoint.stats``), each a variable along time
        self.stats: tuple[str, ...] = ()
        #: the dynamics' own quantities at a save point (``Term.observe``), each a variable along time
        self.dynamics_observe = dynamics_observe
        self.observed: tuple[str, ...] = ()
        self._stacked: Tensor | None = None  # θ, ĝ (and v) stacked, the laws' input, reused

    def state(self) -> dict[str, Any]:
        """What the observers carry from one save point to the next (for checkpoints)."""
        return {"sharpness_subspace": self._sharp_subspace}

    def restore(self, n_saved: int, state: dict[str, Any]) -> None:
        """Continue a run whose first `n_saved` rows are in the store, with the observers' `state`."""
        self._sharp_subspace = state.get("sharpness_subspace")
        if isinstance(self.store, NetCDFStore) and n_saved:  # rewritten whole at each flush: held in memory
            rows = open_record(self.store.path).isel(time=slice(0, n_saved))
            for name, var in rows.variables.items():
                if "time" in var.dims:
                    self.columns[name] = [var.values]
        self.n_saved = self.n_written = n_saved
        # the zarr store a killed run left (even with n_saved = 0: killed after its first rows and
        # before the checkpoint that counts them); its rows after the first n_saved are written again
        if isinstance(self.store, ZarrStore) and self.store.path.exists():
            self.store.reopen(n_saved, self.attrs)

    # ------------------------------------------------------------------ rows
    def add(self, point: SavePoint, wall_time: float) -> bool:
        """Observe `point` (θ of shape (P,), or (K, P) for K members); return False (and record
        nothing) if any value of its row is not finite (θ, loss, gradient, law forms, norms)."""
        problem, theta = self.problem, point.theta
        grad, loss = point.grad, point.loss
        each = per_member if problem.members is None else lambda fn, *args: fn(*args)  # an Ensemble evaluates (K, P) at once
        if grad is None:
            loss, grad = each(problem.loss_and_grad, theta)
        elif loss is None and "loss" in self.observe:
            loss = each(problem.loss, theta)
        if point.stats.keys() & VARIABLES.keys() - STATS:
            raise ValueError(f"SavePoint.stats: {sorted(point.stats)} reuse a name of the record's schema")
        self.stats = tuple(point.stats)
        vectors = [theta, grad] if point.velocity is None else [theta, grad, point.velocity]
        # every law on every vector (and member) at once, as the rows of one (V·K, P) matrix:
        # (V, …, Q)
        stacked = self._stacked
        if stacked is None or stacked.shape != (len(vectors), *theta.shape) or stacked.dtype != theta.dtype or stacked.device != theta.device:
            stacked = self._stacked = theta.new_empty((len(vectors), *theta.shape))
        torch.stack(vectors, out=stacked)  # into one block kept from row to row (a fresh one costs its page faults)
        forms = self.laws.rows(stacked.view(-1, theta.shape[-1])).view(len(vectors), *theta.shape[:-1], -1)
        row: dict[str, Any] = {
            "time": point.time,
            "step": point.step,
            "nfe": point.nfe,
            **point.stats,
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
        if self.sharpness_k:
            self._observe_sharpness(row, theta)
        if self.dynamics_observe is not None:
            observed = self.dynamics_observe(theta)
            if observed.keys() & row.keys() or observed.keys() - DYNAMICS_VARIABLES:
                raise ValueError(f"Term.observe: {sorted(observed)} are not the schema's dynamics variables {sorted(DYNAMICS_VARIABLES)}")
            self.observed = tuple(observed)
            row.update(observed)
        if "params" in self.observe:
            row["params"] = theta.clone()
        # the law forms once, as the one tensor they are views of
        if not all_finite([forms, *(v for k, v in row.items() if k not in FORMS)]):
            return False
        self.pending.append(row)
        if len(self.pending) >= self.flush_every or _time.perf_counter() - self.last_flush > self.flush_seconds:
            self.flush()
        return True

    def _observe_sharpness(self, row: dict[str, Any], theta: Tensor) -> None:
        """The top k eigenvalues of ∇²L at θ (each member's), warm-started from the subspace of the
        last save point (the first: k + 2 seeded random vectors, so a run is the same every time)."""
        k, n = self.sharpness_k, theta.shape[-1]
        if self._sharp_subspace is None:
            generator = torch.Generator().manual_seed(self.seed)
            shape = (*theta.shape, min(k + 2, n))
            self._sharp_subspace = torch.randn(shape, generator=generator, dtype=theta.dtype).to(theta.device)
        values, self._sharp_subspace, matvecs, converged = per_member(lambda t, s: sharpness(self.problem, t, s, k), theta, self._sharp_subspace)
        if not bool(converged.all()):
            warnings.warn(
                f"sharpness: the eigen-solver stopped before its tolerance at t={float(row['time']):g}; the values recorded are its best estimates",
                RuntimeWarning,
                stacklevel=3,
            )
        row["sharpness"] = values[..., 0] if k == 1 else values
        row["sharpness_matvecs"] = matvecs

    def flush(self) -> None:
        """Move pending rows to host memory (one device sync) and write them to the store; a zarr
        store's rows then leave host memory."""
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
        if isinstance(self.store, ZarrStore):
            self.store.write(self.dataset(), self.n_written)
            self.columns = {}
        elif isinstance(self.store, NetCDFStore):
            self.store.write_all(self.dataset())
        self.n_written = self.n_saved

    def finish(self, status: str, message: str = "") -> xr.Dataset | None:
        """Flush, stamp the final status on the store (a zarr store shrunk to its rows) and
        return the whole record, or None for a zarr store (read it from there: host memory
        holds only a window of its rows)."""
        self.attrs.update(status=status, status_message=message)
        self.flush()
        if isinstance(self.store, ZarrStore):
            if not self.store.started:  # no row: the schema alone
                self.store.write(self.dataset(), 0)
            self.store.close(self.n_saved, self.attrs)
            return None
        ds = self.dataset()
        if isinstance(self.store, NetCDFStore):
            self.store.write_all(ds)
        return ds

    # ------------------------------------------------------------------ schema
    def dataset(self) -> xr.Dataset:
        """The rows held in host memory as a Dataset of the flowsim schema."""
        cols = {k: np.concatenate(v) for k, v in self.columns.items()}
        n = len(cols["time"]) if "time" in cols else 0
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
        for name in ("loss", "grad_norm"):
            if name in self.observe:
                data[name] = (("time", *lead), cols.get(name, np.zeros((n, *shape))))
        if self.sharpness_k:
            eigen = () if self.sharpness_k == 1 else ("eigen",)
            empty = np.zeros((n, *shape, *([self.sharpness_k] if eigen else [])))
            data["sharpness"] = (("time", *lead, *eigen), cols.get("sharpness", empty))
            data["sharpness_matvecs"] = (("time", *lead), cols.get("sharpness_matvecs", np.zeros((n, *shape))).astype(np.int64))
            if eigen:
                coords["eigen"] = ("eigen", np.arange(self.sharpness_k))
        data["nfe"] = ("time", cols.get("nfe", np.zeros(n)).astype(np.int64))
        data["wall_time"] = ("time", cols.get("wall_time", np.zeros(n)).astype(np.float64))
        for name in (*self.stats, *self.observed):
            data[name] = ("time", cols.get(name, np.zeros(n)))
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
