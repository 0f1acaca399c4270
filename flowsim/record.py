"""Observers → xarray.Dataset, streamed to zarr (appended as the run goes) or netCDF.

The schema (DESIGN §6): dims ``time`` and ``quantity`` (one entry per law component);
``value``/``grad_sq``/``velocity_sq`` (time, quantity); ``loss``, ``grad_norm``, ``nfe``,
``wall_time``, optional ``sharpness`` (time, or (time, eigen) for the top k > 1 eigenvalues) and
``sharpness_matvecs`` (time); optional ``params`` (time, parameter). Coords
``time``, ``step`` (time) and ``law``, ``site``, ``component``, ``exact``, ``scale``
(quantity); hyper-parameters that vary between runs as scalar coords. Attrs hold strings and
numbers only; structured ones are JSON.

A run of many independent members (the paths of an SDE, later an ensemble) carries θ as a
(K, P) batch: every per-θ variable gains that dimension after ``time`` (``value`` (time, path,
quantity), ``loss`` (time, path), …); ``time``, ``step``, ``nfe`` and ``wall_time`` stay shared.
"""

from __future__ import annotations

import json
import re
import time as _time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from .errors import ConfigError
from .laws import LawSet
from .problem import Problem
from .spectrum import HessianOperator, top_eigenpairs
from .store import NetCDFStore, ZarrStore, open_record
from .terms import SavePoint

OBSERVABLES = ("loss", "grad_norm", "sharpness", "params")

#: ``"sharpness:k"``: the top k Hessian eigenvalues ("sharpness" alone: k = 1)
_SHARPNESS_K = re.compile(r"sharpness:([1-9][0-9]*)")

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
    "sharpness": {"long_name": "largest Hessian eigenvalues of the data loss, λ_1 ≥ … ≥ λ_k along eigen (Lanczos)"},
    "sharpness_matvecs": {"long_name": "Hessian-vector products the sharpness observer took at this save point"},
    "eigen": {"long_name": "index of a Hessian eigenvalue, 0 the largest"},
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
    """The observers' names, each once; ``"sharpness:k"`` (k ≥ 1) asks for the top k Hessian
    eigenvalues (``"sharpness:1"`` is written ``"sharpness"``)."""
    expected = f"names from {', '.join(OBSERVABLES)} (or sharpness:k for the top k eigenvalues)"
    if isinstance(observe, (str, dict)) or not isinstance(observe, Sequence) or not all(isinstance(o, str) for o in observe):
        raise ConfigError(f"run.observe: got {observe!r}; expected a list of {expected}")
    names = ["sharpness" if o == "sharpness:1" else o for o in observe]
    unknown = [o for o in names if o not in OBSERVABLES and not _SHARPNESS_K.fullmatch(o)]
    if unknown:
        raise ConfigError(f"run.observe: got {unknown[0]!r}; expected {expected}")
    names = list(dict.fromkeys(names))
    sharp = [o for o in names if o.startswith("sharpness")]
    if len(sharp) > 1:
        raise ConfigError(f"run.observe: got {sharp[0]!r} and {sharp[1]!r}; expected one sharpness observer")
    return tuple(names)


def sharpness_k(observe: Sequence[str]) -> int:
    """How many top eigenvalues `observe` (checked) asks for: 0 (none), 1 ("sharpness"), k ("sharpness:k")."""
    for name in observe:
        if name == "sharpness":
            return 1
        match = _SHARPNESS_K.fullmatch(name)
        if match:
            return int(match.group(1))
    return 0


def sharpness_tolerance(dtype: torch.dtype) -> float:
    """The sharpness observer's residual tolerance relative to |λ| (``flowsim.spectrum``): 1e-8,
    or 1000 ε of a dtype too coarse for it (float32: 1.2e-4), where the Hessian-vector product's
    own round-off would keep the residual above 1e-8."""
    return max(1e-8, 1000 * torch.finfo(dtype).eps)


def sharpness(problem: Problem, theta: Tensor, start: Tensor, k: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The top k eigenvalues of ∇²L at θ (P,), descending, by ``spectrum.top_eigenpairs`` started
    from `start` (P, b): (values (k,), the subspace to start from next (P, b), the Hessian-vector
    products taken, whether it converged), the last two as 0-d tensors (so members stack)."""
    found = top_eigenpairs(HessianOperator(problem, theta), start, k, tol=sharpness_tolerance(theta.dtype))
    return found.values, found.subspace, torch.tensor(found.matvecs), torch.tensor(found.converged)


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
        if self.sharpness_k:
            self._observe_sharpness(row, theta)
        if "params" in self.observe:
            row["params"] = theta.clone()
        if not _finite(row):
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
        values, self._sharp_subspace, matvecs, converged = _each(lambda t, s: sharpness(self.problem, t, s, k), theta, self._sharp_subspace)
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
