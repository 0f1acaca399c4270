"""simulate(): a problem, a dynamics and an integrator → an xarray.Dataset of the run."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time as _time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import xarray as xr

from . import __version__
from . import checkpoint as ckpt
from .defaults import check_pairing, default_integrator
from .dynamics import Dynamics
from .ensemble import check_ensemble, check_member_seeds, ensemble_start
from .errors import ConfigError, FlowsimError, IntegrationError, ModelError, RecordError, bad_value, check_fits_memory, check_flag, check_number, check_seed
from .integrators import Integrator, SaveGrid
from .integrators.base import MAX_STEPS
from .laws import Law, LawSet, detect
from .problem import Problem
from .lock import output_lock
from .record import Recorder, check_observe, json_attr
from .store import NetCDFStore, ZarrStore, check_output_path, check_output_state, checkpoint_path, open_record, remove_checkpoint, replace, staging_path
from .store import remove as remove_store
from .status import Status
from .terms import Memory, StepMap
from .toml import run_toml

DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: the most save points a run may ask for (the record's time dimension)
MAX_SAVE_POINTS = 10**7

#: the longest run, in units of t = k·lr (a t1 beyond it is a slip: no flow is solved that far)
MAX_TIME = 1e9


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise ConfigError(f"run.dtype: got {dtype!r}; expected float32 or float64")


def check_device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"run.device: got {device!r}; expected 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: got {str(device)!r} but no CUDA device is available; use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"run.device: got {str(device)!r}; expected cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device: got {str(device)!r} but MPS is not available; use 'cpu'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"run.device: got {str(device)!r}; expected 'cpu', 'cuda' or 'mps'")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ConfigError(f"run.device: got {str(device)!r}; expected 'cpu' (torch has one CPU device, cpu:0)")
    return device


def save_grid(dynamics: Dynamics, t1: float, save_every: float) -> SaveGrid:
    """Save times 0, save_every, 2·save_every, … up to t1 (t1 included). For discrete dynamics
    every time is a whole number of steps Δt (``Dynamics.time_step``; DiscreteSGD: η(1−d)):
    t1 → ⌊t1/Δt⌋ steps, and save_every must be a whole number of steps (to a relative 1e-9;
    ConfigError otherwise)."""
    t1 = check_number("run.t1", t1, minimum=0.0, exclusive_minimum=True)
    save_every = check_number("run.save_every", save_every, minimum=0.0, exclusive_minimum=True)
    if t1 > MAX_TIME:
        raise ConfigError(f"run.t1: got {t1:g}; expected at most {MAX_TIME:g} (in units of t = step · lr)")
    if save_every > t1:
        raise ConfigError(f"run.save_every: got {save_every:g}; expected at most t1 = {t1:g}")
    if t1 / save_every > MAX_SAVE_POINTS:
        raise ConfigError(
            f"run.save_every: got {save_every:g}, which gives {t1 / save_every:.3g} save points up to t1 = {t1:g}; "
            f"expected at most {MAX_SAVE_POINTS:g}"
        )
    if not issubclass(dynamics.term_type, StepMap):
        n = math.floor(t1 / save_every + 1e-9)
        times = [k * save_every for k in range(n + 1)]
        if t1 - times[-1] > 1e-9 * t1:
            times.append(t1)
        return SaveGrid(tuple(times))
    dt = dynamics.time_step
    if t1 / dt > MAX_STEPS:
        raise ConfigError(
            f"run.t1: got {t1:g}, which takes {t1 / dt:.3g} {dynamics.name} steps of Δt = {dt:g}; "
            f"expected at most {MAX_STEPS:.0e} steps"
        )
    n_steps = math.floor(t1 / dt + 1e-9)
    if n_steps < 1:
        raise ConfigError(f"run.t1: got {t1:g}; expected at least one {dynamics.name} step of Δt = {dt:g}")
    ratio = save_every / dt
    stride = round(ratio)
    if stride < 1 or abs(stride - ratio) > 1e-9 * ratio:
        nearest = ", ".join(f"{k * dt:.12g}" for k in dict.fromkeys((math.floor(ratio), math.ceil(ratio))) if k >= 1)
        raise ConfigError(
            f"run.save_every: got {save_every:.12g}; expected a whole number of {dynamics.name} steps of "
            f"Δt = {dt:.12g}, the nearest being {nearest}"
        )
    steps = list(range(0, n_steps + 1, stride))
    if steps[-1] != n_steps:
        steps.append(n_steps)
    return SaveGrid(tuple(k * dt for k in steps), tuple(steps))


def _law_set(laws: str | Sequence[Law], problem: Problem) -> LawSet:
    """The laws to record, compiled on the problem's parameter layout."""
    if isinstance(laws, str):
        if laws != "auto":
            raise ConfigError(f"run.laws: got {laws!r}; expected 'auto' or a list of flowsim Law objects")
        laws = detect(problem.model, loss=problem.loss_kind, inputs=problem.X[:2])
    if not isinstance(laws, Sequence):
        raise bad_value("run.laws", laws, "'auto' or a list of flowsim Law objects")
    laws = list(laws)
    for law in laws:
        if not isinstance(law, Law):
            raise ConfigError(f"run.laws: got an item of type {type(law).__name__}; expected flowsim.Law")
    try:
        return LawSet(laws, problem.names, problem.shapes)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ModelError(f"run.laws: cannot be evaluated on this model's parameters ({exc})") from exc


def simulate(
    problem: Problem,
    dynamics: Dynamics,
    integrator: Integrator | None = None,
    *,
    t1: float,
    save_every: float,
    laws: str | Sequence[Law] = "auto",
    observe: Sequence[str] = ("loss", "grad_norm"),
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float64,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_every: float = 60.0,
    progress: bool = True,
    config: str | None = None,
    ensemble: int | torch.Tensor | None = None,
    member_seeds: Sequence[int] | None = None,
    throw: bool | None = None,
) -> xr.Dataset:
    """Integrate `dynamics` on `problem` from the model's current parameters and record the laws.

    **Main arguments**

    - `problem`: the model, data, loss and weight decay (`flowsim.Problem`).
    - `dynamics`: `GradientFlow()`, `DiscreteSGD(lr, batch_size, momentum, ...)`, ...
    - `integrator`: how to move it; None takes the default for the dynamics' term
      (flowsim.defaults: RK's dopri5 for flows, Exponential for MomentumFlow, the step loop for
      SGD, FusedEulerMaruyama for the SDE).
    - `t1`, `save_every`: end time and save interval, in units of t = step · lr.
    - `laws`: ``"auto"`` (detected from the model's graph) or a list of `flowsim.Law`.
    - `observe`: extras beside the laws: ``"loss"``, ``"grad_norm"``, ``"sharpness"``, ``"params"``.

    **Other arguments**

    - `seed`: seeds batch order and noise. Same seed, device and dtype: the same Dataset.
    - `device`, `dtype`: where and in what precision to run (float64 for accuracy work).
    - `out`: a ``.zarr`` (written as the run goes) or ``.nc`` path; `overwrite` replaces it.
    - `resume`: continue the run stored at `out` from its checkpoint (``<out>.ckpt``), with the
      same arguments; the result equals the uninterrupted run (``wall_time`` aside). A run that
      has ended ("completed", "diverged") is returned as it is.
    - `checkpoint_every`: seconds between checkpoints (0: at every save point); one is also
      written when the run is interrupted.
    - `progress`: a tqdm bar on a terminal. `config`: the run's TOML text, stored as an attr.
    - `ensemble`: K (or (K, P) initial parameters): K independent copies of the run moved at once
      by torch.func.vmap (flowsim.ensemble); member 0 starts from the model's parameters, member
      k ≥ 1 from a fresh initialisation seeded by (seed, k). The record gains a ``member`` dim.
    - `member_seeds`: with `ensemble`, one seed per member: member k draws its mini-batches
      from seed s_k, as the run with ``seed=s_k`` does (the ``seed`` coord runs along ``member``).
    - `throw`: what a run that ends "diverged" does once everything is saved: None (default)
      warns (RuntimeWarning) and returns its record; False returns it quietly (its ``status``
      says it); True raises IntegrationError with the status message.

    **Returns** the run's `xarray.Dataset` (schema: flowsim.record.schema), with
    ``attrs["status"]`` (a `flowsim.Status` value) "completed", or "diverged" (NaN/Inf, step-size
    underflow, max_steps) with ``status_message`` saying when and why; everything saved before a
    divergence is kept.

    **Raises** a `FlowsimError` subclass naming the bad argument, before any work starts;
    KeyboardInterrupt after saving and checkpointing (status "interrupted"); any other error
    of the run after the same (status "failed").
    """
    # --- 1. check every argument before touching anything
    if not isinstance(problem, Problem):
        raise ConfigError(f"problem: got {type(problem).__name__}; expected flowsim.Problem")
    if not isinstance(dynamics, Dynamics):
        raise ConfigError(f"dynamics: got {type(dynamics).__name__}; expected a flowsim dynamics")
    integrator = default_integrator(dynamics) if integrator is None else integrator
    if not isinstance(integrator, Integrator):
        raise ConfigError(f"integrator: got {type(integrator).__name__}; expected a flowsim integrator")
    device, dtype = check_device(device), check_dtype(dtype)
    seed = check_seed("run.seed", seed)
    observe = check_observe(observe)
    overwrite, resume, progress = (check_flag(f"run.{k}", v) for k, v in (("overwrite", overwrite), ("resume", resume), ("progress", progress)))
    if throw is not None:
        check_flag("run.throw", throw)
    checkpoint_every = check_number("run.checkpoint_every", checkpoint_every, minimum=0.0)
    if config is not None and not isinstance(config, str):
        raise bad_value("config", type(config).__name__, "the run's TOML text (str) or None")
    out_path = check_output_path(out, resume=resume, overwrite=overwrite)
    t1 = check_number("run.t1", t1, minimum=0.0, exclusive_minimum=True)
    save_every = check_number("run.save_every", save_every, minimum=0.0, exclusive_minimum=True)
    grid = save_grid(dynamics, t1, save_every)
    check_pairing(dynamics, integrator)
    integrator.check_dtype(dtype)
    dynamics.check(problem)
    integrator.check_size(dynamics.state_size(problem))
    integrator.check_device(device)
    integrator.check_grid(grid)
    problem.check_parameters()
    ensemble = check_ensemble(ensemble, dynamics, problem)
    member_seeds = check_member_seeds(member_seeds, ensemble)

    # --- 2. one writer per output: what is there is checked under its lock, then the run
    with contextlib.ExitStack() as held:
        if out_path is not None:
            held.enter_context(output_lock(out_path))
            check_output_state(out_path, resume=resume, overwrite=overwrite)
        # --- 3. bind the problem to device and dtype; the initial point and its laws; what to resume
        problem = problem.to(device=device, dtype=dtype)
        law_set = _law_set(laws, problem)
        theta0 = problem.initial_theta()
        if ensemble is not None:
            problem, theta0 = ensemble_start(problem, ensemble, seed, member_seeds)
        identity = ckpt.fingerprint(problem, dynamics, integrator, t1, save_every, seed, device, dtype, observe, law_set, theta0)
        if member_seeds is not None:
            identity["member_seeds"] = list(member_seeds)
        start = ckpt.resume_point(out_path, identity, device) if resume else None
        if isinstance(start, xr.Dataset):  # the run has ended already
            return start
        attrs = {
            "flowsim_version": __version__,
            "torch_version": torch.__version__,
            "problem": json_attr(problem.describe()),
            "dynamics": json_attr(dynamics.describe()),
            "integrator": json_attr(integrator.describe()),
            "seed": seed,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "status": Status.RUNNING.value,
            "status_message": "",
            "config": config if config is not None else run_toml(problem, dynamics, integrator, t1, save_every, seed, device, dtype),
            "fingerprint": json_attr(identity),
        }
        coords = {**dynamics.coords(), "weight_decay": problem.weight_decay, "seed": seed}
        term = dynamics.term(problem, theta0)
        members = term.members  # (dim, K): θ is a (K, P) batch of independent runs
        if ensemble is not None:
            attrs["ensemble"] = members[1]
            if member_seeds is not None:
                coords["seed"] = (members[0], list(member_seeds))
        _check_memory(out_path, len(grid.times), law_set.size, observe, problem.n_params, members)
        # overwrite builds the new record beside the old one, swapped in when the run ends
        target = staging_path(out_path) if overwrite and out_path is not None and out_path.exists() else out_path
        if target is not None and target != out_path:
            remove_store(target)  # left by an overwrite that was killed
        store = None if target is None else ZarrStore(target, len(grid.times)) if out_path.suffix == ".zarr" else NetCDFStore(target)
        recorder = Recorder(problem, law_set, observe, theta0, coords, attrs, store, members=members, seed=seed, dynamics_observe=term.observe)
        run = _Checkpointer(None if store is None else store.path, identity, recorder, checkpoint_every, start, term.memory)
        if start is not None:
            _check_saved_rows(out_path, start.n_saved)
            recorder.restore(start.n_saved, start.recorder)
            if term.memory is not None and start.term is not None:
                term.memory.restore(start.term)

        # --- 4. integrate, recording at every save point and checkpointing now and then
        from tqdm.auto import tqdm

        first = recorder.n_saved
        last_time = grid.times[first - 1] if first else grid.times[0]
        bar = tqdm(total=grid.times[-1], initial=last_time, unit="t", disable=not progress or not sys.stderr.isatty(), leave=False)
        resume_from = None if start is None else start.integrator
        status, message = Status.COMPLETED, ""
        try:
            try:
                # what the integrator leaves open (RK's compile="auto") decided once, before the first
                # step, or as the run resumed decided it; recorded in the integrator attr
                running = integrator.settle(term, grid, resume_from)
                recorder.attrs["integrator"] = json_attr(running.describe())
                for point in running.solve(term, grid, seed, resume_from):
                    if not recorder.add(point, run.wall_time()):
                        status = Status.DIVERGED
                        message = (
                            f"non-finite loss, parameters or gradient at t={point.time:g} (step {point.step}); "
                            f"the {recorder.n_saved + len(recorder.pending)} save points before it, up to t={last_time:g}, are kept"
                        )
                        break
                    run.saved(point)
                    bar.update(point.time - last_time)
                    last_time = point.time
            except IntegrationError as exc:
                status, message = Status.DIVERGED, f"{exc} (last saved t={last_time:g})"
            # --- 5. the record
            ds = recorder.finish(status.value, message)
        except KeyboardInterrupt:
            run.write()
            recorder.finish(Status.INTERRUPTED.value, f"stopped by the user after t={last_time:g}; resume=True continues it")
            _put_in_place(store, out_path, keep_checkpoint=True)
            raise
        except Exception as exc:
            with contextlib.suppress(Exception):  # keep what was saved, and say why it stopped
                run.write()
                recorder.finish(Status.FAILED.value, f"{type(exc).__name__} after t={last_time:g}: {exc}")
            staged = store is not None and store.path != out_path
            if staged:  # the old record stays as it was
                with contextlib.suppress(OSError):
                    remove_store(store.path)
            if isinstance(exc, OSError) and out_path is not None:
                kept = "the record before this run is kept" if staged else "what was saved is kept"
                raise RecordError(f"run.out: writing {str(out_path)!r} failed after t={last_time:g} ({exc}); {kept}") from exc
            raise
        finally:
            bar.close()
        run.remove()
        _put_in_place(store, out_path, keep_checkpoint=False)
        if status != Status.COMPLETED and throw:
            raise IntegrationError(f"run {status}: {message}" + (f"; the record is at {str(out_path)!r}" if out_path else ""))
        if status != Status.COMPLETED and throw is None:
            warnings.warn(f"run {status}: {message}", RuntimeWarning, stacklevel=2)
        return ds if ds is not None else open_record(out_path, load=None)


def _put_in_place(store: ZarrStore | NetCDFStore | None, out: Path | None, keep_checkpoint: bool) -> None:
    """Swap a record built beside `out` (overwrite) into place, with its checkpoint if the run can
    go on, else removing the old record's."""
    if store is None or store.path == out:
        return
    replace(store.path, out)
    if keep_checkpoint:
        os.replace(checkpoint_path(store.path), checkpoint_path(out))
    else:
        remove_checkpoint(out)


def _check_memory(out: Path | None, n_rows: int, n_laws: int, observe: tuple[str, ...], n_params: int, members) -> None:
    """Refuse, before any work, a record held in host memory (no output, or netCDF) that would
    take more than half of it; a zarr store holds a window of rows only."""
    if out is not None and out.suffix == ".zarr":
        return
    per_member = 3 * n_laws + 3 + (n_params if "params" in observe else 0)
    row_bytes = 8 * (per_member * (members[1] if members else 1) + 4)
    check_fits_memory(
        "run.out", n_rows * row_bytes, f"the record held in memory ({n_rows} save points of {row_bytes} bytes)",
        "a .zarr output, which streams rows to disk, or fewer save points",
    )


class _Checkpointer:
    """Writes the checkpoint of `out` (flowsim.checkpoint) every `every` seconds of a run, at
    its last recorded save point, after the rows up to it are in the store."""

    def __init__(
        self, out: Path | None, identity: dict, recorder: Recorder, every: float, start: ckpt.Checkpoint | None, memory: Memory | None
    ) -> None:
        self.out, self.path = out, None if out is None else ckpt.checkpoint_path(out)
        self.identity, self.recorder, self.every, self.memory = identity, recorder, every, memory
        self.last = None if start is None else start.integrator  # integrator checkpoint of the last recorded point
        self.last_memory = None if start is None else start.term  # the term's memory there
        self.n_saved = 0 if start is None else start.n_saved
        self.started = _time.perf_counter() - (0.0 if start is None else start.wall_time)
        self.written = _time.perf_counter()
        if start is None:
            self.write()  # from t = 0: a run killed before its first checkpoint resumes from the start

    def wall_time(self) -> float:
        """Seconds the run has taken, counting those before it was resumed."""
        return _time.perf_counter() - self.started

    def saved(self, point) -> None:
        """`point` is recorded: checkpoint there if it is time to."""
        if point.checkpoint is not None:
            self.last, self.n_saved = point.checkpoint, point.checkpoint["index"] + 1
            self.last_memory = None if self.memory is None else self.memory.state()
        if self.path is not None and _time.perf_counter() - self.written >= self.every:
            self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.recorder.flush()
        state = ckpt.Checkpoint(self.identity, self.n_saved, self.last, self.recorder.state(), self.wall_time(), self.last_memory)
        ckpt.save(self.path, state)
        self.written = _time.perf_counter()

    def remove(self) -> None:
        """The run has ended: nothing to resume."""
        if self.out is not None:
            remove_checkpoint(self.out)


def _check_saved_rows(out: Path, n_saved: int) -> None:
    """The record at `out` holds the `n_saved` rows its checkpoint continues after."""
    if n_saved == 0:
        return
    held = open_record(out, load=False).sizes["time"]
    if held < n_saved:
        raise RecordError(
            f"run.resume: {str(out)!r} holds {held} rows, fewer than the {n_saved} its checkpoint "
            "continues after; pass overwrite=True to start again"
        )


__all__ = ["simulate", "save_grid", "FlowsimError"]
