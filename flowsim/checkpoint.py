"""Checkpoints: a run's full state at a save point, written atomically beside its record.

A run with ``out="run.zarr"`` (or ``.nc``) keeps ``run.zarr.ckpt`` while it can be resumed:

- what identifies the run (`fingerprint`): problem, dynamics, integrator, seed, device, dtype,
  t1, save_every, observe, the recorded law components, and digests of θ0 and the data.
  Resuming with anything else is refused, naming the first field that differs;
- ``n_saved``: the rows of the record the checkpoint continues after (rows 0 … n_saved − 1,
  always already in the store when the checkpoint is written);
- ``integrator``: the ``SavePoint.checkpoint`` of row n_saved − 1 (integrators.base: θ, the
  momentum buffer, the Runge–Kutta state, step and evaluation counters, …); None: from t = 0;
- ``recorder``: the observers' own state (the eigen-solver's subspace of ``sharpness``);
- ``term``: what the term's field carries between evaluations at that save point
  (``terms.Memory``: the central flow's warm starts); None where it carries nothing;
- ``wall_time``: the seconds the run had taken (a resumed run's ``wall_time`` goes on from it).

It is written with ``torch.save`` to a temporary file, fsync'ed, then renamed over the old one
(``os.replace``), so a kill at any moment leaves the old checkpoint or the new one. It is read
back with ``torch.load(weights_only=True)``. It is removed once the run has ended ("completed"
or "diverged"); an "interrupted", "failed" or killed run keeps it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from torch import Tensor

from .errors import ConfigError, RecordError
from .status import Status
from .store import checkpoint_path, open_record, record_attrs, remove_checkpoint

FORMAT = 1

#: statuses of a run that has ended: resuming it returns its record unchanged
ENDED = tuple(s.value for s in Status if s.ended)

#: the fields of a fingerprint a record's attrs also hold (JSON where structured)
ATTR_FIELDS = ("problem", "dynamics", "integrator", "seed", "device", "dtype")

#: the config field each fingerprint entry names in an error message
FIELDS = {
    "seed": "run.seed",
    "device": "run.device",
    "dtype": "run.dtype",
    "t1": "run.t1",
    "save_every": "run.save_every",
    "observe": "run.observe",
    "laws": "run.laws",
    "theta0": "model (its initial parameters)",
    "data": "data",
}


def digest(*tensors: Tensor) -> str:
    """sha256 of the tensors' bytes (on the host), to recognise θ0 and the data."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Checkpoint:
    """The state of a run after its row ``n_saved − 1`` (see the module docstring)."""

    fingerprint: dict[str, Any]
    n_saved: int
    integrator: dict[str, Any] | None
    recorder: dict[str, Any]
    wall_time: float
    term: dict[str, Any] | None = None


def save(path: Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` atomically: a temporary file, fsync, then rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    payload = {**asdict(checkpoint), "format": FORMAT, "fingerprint": json.dumps(checkpoint.fingerprint, sort_keys=True)}
    # serialised in memory first: a Ctrl-C inside torch.save must not leave its zip writer
    # bound to a file that gets closed (it writes to it when collected, and aborts the process)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, device: torch.device) -> Checkpoint:
    """Read a checkpoint written by `save`, its tensors on `device`."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        if payload.get("format") != FORMAT:
            raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT}")
        return Checkpoint(
            json.loads(payload["fingerprint"]),
            int(payload["n_saved"]),
            payload["integrator"],
            payload["recorder"],
            float(payload["wall_time"]),
            payload.get("term"),
        )
    except Exception as exc:
        raise RecordError(f"run.resume: {str(path)!r} is not a readable flowsim checkpoint ({type(exc).__name__}: {exc})") from exc


def fingerprint(problem, dynamics, integrator, t1: float, save_every: float, seed: int, device, dtype, observe, laws, theta0) -> dict:
    """What identifies a run: resuming it with anything else is refused."""
    return {
        "problem": json.loads(json.dumps(problem.describe(), default=str)),
        "dynamics": json.loads(json.dumps(dynamics.describe(), default=str)),
        "integrator": json.loads(json.dumps(integrator.describe(), default=str)),
        "seed": seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "t1": t1,
        "save_every": save_every,
        "observe": list(observe),
        "laws": hashlib.sha256("\n".join(laws.coords()["quantity"]).encode()).hexdigest(),
        "theta0": digest(theta0),
        "data": digest(problem.X, problem.y),
    }


def check_same(stored: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """Raise ConfigError naming the first field (of those both hold, in `current`'s order) where
    the run stored at `out` and this call differ."""
    for key in [k for k in current if k in stored]:
        a, b = stored[key], current[key]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # another name first: the rest follows from it
            sub = next(k for k in sorted(a.keys() | b.keys(), key=lambda k: (k != "name", k)) if a.get(k) != b.get(k))
            field, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
        else:
            field = FIELDS.get(key, key)
        shown = "" if key in ("theta0", "data", "laws") else f"; it was started with {a!r}, this call gives {b!r}"
        raise ConfigError(
            f"{field}: differs from the run in {str(out)!r}{shown}; resume it with the same arguments, "
            "or pass overwrite=True to start again"
        )


def resume_point(out: Path, current: dict[str, Any], device: torch.device) -> Checkpoint | xr.Dataset:
    """What resuming the run at `out` starts from: its record if the run has ended, else its
    checkpoint, once either is checked to be this very run (every field of the fingerprint, which
    the record's ``fingerprint`` attr holds)."""
    attrs = record_attrs(out)
    if attrs is not None and attrs.get("status") in ENDED:
        if "fingerprint" in attrs:
            stored = json.loads(attrs["fingerprint"])
        else:  # a record written before the fingerprint was stored
            stored = {k: json.loads(attrs[k]) if k in ("problem", "dynamics", "integrator") else attrs[k] for k in ATTR_FIELDS if k in attrs}
        check_same(stored, current, out)
        remove_checkpoint(out)  # left by a kill just after the run ended
        return open_record(out)
    path = checkpoint_path(out)
    if not path.exists():
        status = "no record" if attrs is None else f"status {attrs.get('status')!r}"
        raise RecordError(
            f"run.resume: {str(out)!r} ({status}) has no checkpoint {path.name!r} to resume from; "
            "pass overwrite=True to start it again"
        )
    checkpoint = load(path, device)
    check_same(checkpoint.fingerprint, current, out)
    return checkpoint
