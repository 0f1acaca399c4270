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
import time as _time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from .errors import ConfigError
from .laws import LawSet
from .problem import Problem
from .store import NetCDFStore, ZarrStore, open_record
from .terms import SavePoint

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
    "rejected_steps": {"long_name": "cumulative step attempts the error control rejected"},
    "iterations": {"long_name": "cumulative fixed-point iterations of the implicit stage equations"},
    "newton_iterations": {"long_name": "cumulative Newton iterations of the implicit stage equations"},
    "residual": {"long_name": "largest final residual of the stage equations since the last save point"},
    "jacobian_products": {"long_name": "cumulative Jacobian-vector products of the Newton iterations"},
    "kinked_steps": {"long_name": "cumulative steps solved on a frozen smooth piece of a non-smooth flow (ReLU, max-pool)"},
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


#: the integrators' statistics the schema describes (``SavePoint.stats``)
STATS = {"rejected_steps", "iterations", "newton_iterations", "residual", "jacobian_products", "kinked_steps"}


def check_observe(observe: Sequence[str]) -> tuple[str, ...]:
    if isinstance(observe, (str, dict)) or not isinstance(observe, Sequence) or not all(isinstance(o, str) for o in observe):
        raise ConfigError(f"run.observe: got {observe!r}; expected a list of names from {', '.join(OBSERVABLES)}")
    unknown = [o for o in observe if o not in OBSERVABLES]
    if unknown:
        raise ConfigError(f"run.observe: got {unknown[0]!r}; expected names from {', '.join(OBSERVABLES)}")
    return tuple(dict.fromkeys(observe))


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
        self._sharp_vector: Tensor | None = None
        self.store = store
        #: the names of the integrator's statistics (``SavePoint.stats``), each a variable along time
        self.stats: tuple[str, ...] = ()

    def state(self) -> dict[str, Any]:
        """What the observers carry from one save point to the next (for checkpoints)."""
        return {"sharp_vector": self._sharp_vector}

    def restore(self, n_saved: int, state: dict[str, Any]) -> None:
        """Continue a run whose first `n_saved` rows are in the store, with the observers' `state`."""
        self._sharp_vector = state.get("sharp_vector")
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
        each = _each if problem.members is None else lambda fn, *args: fn(*args)  # an Ensemble evaluates (K, P) at once
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
        forms = self.laws.rows(torch.stack(vectors).view(-1, theta.shape[-1])).view(len(vectors), *theta.shape[:-1], -1)
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
        if "sharpness" in self.observe:
            if self._sharp_vector is None:  # seeded, so a run is the same every time
                generator = torch.Generator().manual_seed(self.seed)
                self._sharp_vector = torch.randn(theta.shape, generator=generator, dtype=theta.dtype).to(theta.device)
            row["sharpness"], self._sharp_vector = _each(lambda t, v: sharpness(problem, t, start=v), theta, self._sharp_vector)
        if "params" in self.observe:
            row["params"] = theta.clone()
        if not _finite(row):
            return False
        self.pending.append(row)
        if len(self.pending) >= self.flush_every or _time.perf_counter() - self.last_flush > self.flush_seconds:
            self.flush()
        return True

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
        for name in ("loss", "grad_norm", "sharpness"):
            if name in self.observe:
                data[name] = (("time", *lead), cols.get(name, np.zeros((n, *shape))))
        data["nfe"] = ("time", cols.get("nfe", np.zeros(n)).astype(np.int64))
        data["wall_time"] = ("time", cols.get("wall_time", np.zeros(n)).astype(np.float64))
        for name in self.stats:
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


def json_attr(value: Any) -> str:
    """A structured attribute as a JSON string (attrs hold strings and numbers only)."""
    return json.dumps(value, sort_keys=True, default=str)


def _finite(row: dict[str, Any]) -> bool:
    """Whether every number of a row is finite (one host synchronisation)."""
    tensors = [v for v in row.values() if isinstance(v, Tensor) and v.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
