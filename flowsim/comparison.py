"""``fs.compare(a, b)``: how far run `a` is from run `b` (the reference) at the times both saved.

    value_diff[t, q]   = Q_a(t) − Q_b(t)                         every law component
    value_error[t, q]  = |Q_a(t) − Q_b(t)| / scale_b[q]           relative to the law's magnitude
    loss_diff[t]       = L_a(t) − L_b(t),  loss_error = |L_a − L_b| / |L_b|
    param_distance[t]  = |θ_a(t) − θ_b(t)|,  param_error = |θ_a − θ_b| / |θ_b|   (both recorded params)

A flow against SGD at matched times is the usual use: ``compare(flow_run, sgd_run)``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import xarray as xr

from .errors import ConfigError, RecordError

JOINS = ("exact", "inner")
TIME_TOLERANCE = 1e-9  # relative: k·Δt and k·save_every differ by round-off only

#: long_name of every variable compare() writes
VARIABLES = {
    "value_diff": "law component difference Q_a − Q_b",
    "value_error": "|Q_a − Q_b| relative to the law's magnitude in b",
    "max_value_error": "largest value_error over the law components",
    "loss_diff": "loss difference L_a − L_b",
    "loss_error": "|L_a − L_b| / |L_b|",
    "param_distance": "parameter distance |θ_a − θ_b|",
    "param_error": "|θ_a − θ_b| / |θ_b|",
}


def _record(run: xr.Dataset | str | os.PathLike, name: str) -> xr.Dataset:
    if isinstance(run, (str, os.PathLike)):
        from .record import open_record

        run = open_record(run)
    if not isinstance(run, xr.Dataset):
        raise RecordError(f"compare: run {name} is a {type(run).__name__}; expected an xarray.Dataset or a record path")
    missing = [v for v in ("value", "time", "quantity") if v not in run.variables]
    if missing:
        raise RecordError(f"compare: run {name} has no {missing[0]!r}; expected a flowsim record")
    return run


def _match_times(ta: np.ndarray, tb: np.ndarray, join: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of the times the runs share, to TIME_TOLERANCE."""
    close = lambda x, y: np.abs(x - y) <= TIME_TOLERANCE * np.maximum(1.0, np.abs(y))
    if join == "exact":
        if len(ta) != len(tb) or not close(ta, tb).all():
            first = next((i for i in range(min(len(ta), len(tb))) if not close(ta[i], tb[i])), min(len(ta), len(tb)))
            seen = f"{ta[first]:g} vs {tb[first]:g}" if first < min(len(ta), len(tb)) else "one run stops there"
            raise RecordError(
                f"compare: the runs saved at different times (a: {len(ta)} times, b: {len(tb)} times; first "
                f"difference at index {first}: {seen}); expected the same times, or join='inner' for the times both have"
            )
        return np.arange(len(ta)), np.arange(len(tb))
    if not len(ta) or not len(tb):
        raise RecordError("compare: a run has no save point; expected at least one common time")
    after = np.clip(np.searchsorted(tb, ta), 0, len(tb) - 1)  # times are increasing
    before = np.clip(after - 1, 0, None)
    best = np.where(np.abs(tb[before] - ta) < np.abs(tb[after] - ta), before, after)
    keep = close(ta, tb[best])
    if not keep.any():
        raise RecordError("compare: the runs share no save time; expected at least one common time")
    return np.flatnonzero(keep), best[keep]


def compare(a: xr.Dataset | str | os.PathLike, b: xr.Dataset | str | os.PathLike, *, join: str = "exact") -> xr.Dataset:
    """Errors of run `a` against run `b` at matched times, as a Dataset (module docstring).

    **Arguments**

    - `a`, `b`: flowsim records (Datasets, or paths to ``.zarr`` / ``.nc``) of the same model
      (the same law components); `b` is the reference.
    - `join`: ``"exact"`` (the save times must be the same, to 1e-9 relative) or ``"inner"``
      (compare at the times both runs saved).

    **Returns** a Dataset over ``time`` (and ``quantity``): ``value_diff``, ``value_error``,
    ``max_value_error``; ``loss_diff`` and ``loss_error`` when both recorded the loss;
    ``param_distance`` and ``param_error`` when both recorded params. Attrs ``a_dynamics``,
    ``b_dynamics`` (JSON) and ``join``.

    **Raises** `ConfigError` for an unknown `join`; `RecordError` when a run is not a flowsim
    record, the runs record different laws or parameters, or their times do not match.
    """
    if join not in JOINS:
        raise ConfigError(f"compare.join: got {join!r}; expected one of {', '.join(JOINS)}")
    a, b = _record(a, "a"), _record(b, "b")
    qa, qb = a["quantity"].values, b["quantity"].values
    if len(qa) != len(qb) or (qa != qb).any():
        first = next((i for i in range(min(len(qa), len(qb))) if qa[i] != qb[i]), min(len(qa), len(qb)))
        raise RecordError(
            f"compare: the runs record different laws (a: {len(qa)} components, b: {len(qb)}; first difference at "
            f"component {first}); expected two runs of the same model"
        )
    ia, ib = _match_times(a["time"].values, b["time"].values, join)
    a, b = a.isel(time=ia), b.isel(time=ib)
    time = b["time"].values
    coords = {"time": ("time", time, b["time"].attrs)}
    coords.update({k: ("quantity", b[k].values) for k in ("quantity", "law", "site", "component") if k in b.variables})
    scale = b["scale"].values if "scale" in b.variables else np.ones(len(qb))
    scale = np.where(scale > 0, scale, 1.0)
    diff = a["value"].values - b["value"].values
    data = {
        "value_diff": (("time", "quantity"), diff),
        "value_error": (("time", "quantity"), np.abs(diff) / scale),
        "max_value_error": ("time", (np.abs(diff) / scale).max(axis=1, initial=0.0)),
    }
    if "loss" in a and "loss" in b:
        loss_diff = a["loss"].values - b["loss"].values
        data["loss_diff"] = ("time", loss_diff)
        data["loss_error"] = ("time", np.abs(loss_diff) / np.maximum(np.abs(b["loss"].values), np.finfo(float).tiny))
    if "params" in a and "params" in b:
        if a.sizes["parameter"] != b.sizes["parameter"]:
            raise RecordError(
                f"compare: the runs recorded {a.sizes['parameter']} and {b.sizes['parameter']} parameters; expected the same model"
            )
        distance = np.linalg.norm(a["params"].values - b["params"].values, axis=1)
        data["param_distance"] = ("time", distance)
        data["param_error"] = ("time", distance / np.maximum(np.linalg.norm(b["params"].values, axis=1), np.finfo(float).tiny))
    attrs = {"a_dynamics": a.attrs.get("dynamics", "{}"), "b_dynamics": b.attrs.get("dynamics", "{}"), "join": join}
    out = xr.Dataset(data, coords=coords, attrs=attrs)
    for name, long_name in VARIABLES.items():
        if name in out:
            out[name].attrs["long_name"] = long_name
    return out


def describe(errors: xr.Dataset) -> list[str]:
    """Lines summarising a `compare` Dataset: per law kind the largest error, the final loss and
    parameter errors (what ``flowsim compare`` prints)."""
    dyn = lambda key: json.loads(errors.attrs.get(key, "{}")).get("name", "?")
    t = errors["time"].values
    lines = [
        f"a           {dyn('a_dynamics')}",
        f"b           {dyn('b_dynamics')} (reference)",
        f"times       {len(t)} matched" + (f", {t[0]:g} … {t[-1]:g}" if len(t) else ""),
    ]
    if "loss_diff" in errors and len(t):
        lines.append(f"loss        final L_a − L_b = {float(errors.loss_diff[-1]):.3e} (relative {float(errors.loss_error[-1]):.3e})")
    if "param_distance" in errors and len(t):
        lines.append(
            f"params      final |θ_a − θ_b| = {float(errors.param_distance[-1]):.3e} (relative {float(errors.param_error[-1]):.3e})"
        )
    if "law" in errors.coords and errors.sizes.get("quantity", 0) and len(t):
        lines.append("law kind      components   max relative error")
        for kind in dict.fromkeys(errors["law"].values.tolist()):
            mask = (errors["law"] == kind).values
            lines.append(f"{kind:<13} {int(mask.sum()):>10}   {float(errors.value_error.values[:, mask].max()):.3e}")
    return lines


__all__ = ["compare", "describe", "JOINS"]
