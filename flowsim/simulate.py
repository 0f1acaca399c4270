"""simulate(): a problem, a dynamics and an integrator → an xarray.Dataset of the run."""

from __future__ import annotations

import math
import os
import sys
import time as _time
import warnings
from collections.abc import Sequence

import torch
import xarray as xr

from . import __version__
from .config import to_toml
from .dynamics import Dynamics
from .ensemble import check_ensemble, ensemble_start
from .errors import ConfigError, FlowsimError, IntegrationError, ModelError, check_number
from .integrators import Integrator, SaveGrid
from .laws import Law, LawSet, detect
from .problem import Problem
from .record import Recorder, check_observe, check_output, json_attr

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise ConfigError(f"run.dtype: got {dtype!r}; expected float32 or float64")


def check_device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"run.device: got {device!r}; expected 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: got {str(device)!r} but no CUDA device is available; use 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device: got {str(device)!r} but MPS is not available; use 'cpu'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"run.device: got {str(device)!r}; expected 'cpu', 'cuda' or 'mps'")
    return device


def save_grid(dynamics: Dynamics, t1: float, save_every: float) -> SaveGrid:
    """Save times 0, save_every, 2·save_every, … up to t1 (t1 included). For discrete dynamics
    every time is a whole number of steps Δt = η(1−d): t1 → ⌊t1/Δt⌋ steps, save_every → the
    nearest whole number of steps."""
    t1 = check_number("run.t1", t1, minimum=0.0, exclusive_minimum=True)
    save_every = check_number("run.save_every", save_every, minimum=0.0, exclusive_minimum=True)
    if save_every > t1:
        raise ConfigError(f"run.save_every: got {save_every:g}; expected at most t1 = {t1:g}")
    if dynamics.continuous:
        n = math.floor(t1 / save_every + 1e-9)
        times = [k * save_every for k in range(n + 1)]
        if t1 - times[-1] > 1e-9 * t1:
            times.append(t1)
        return SaveGrid(tuple(times))
    dt = dynamics.time_step
    n_steps = math.floor(t1 / dt + 1e-9)
    if n_steps < 1:
        raise ConfigError(f"run.t1: got {t1:g}; expected at least one SGD step of Δt = lr·(1−dampening) = {dt:g}")
    stride = round(save_every / dt)
    if stride < 1 or abs(stride * dt - save_every) > 0.5 * dt:
        raise ConfigError(f"run.save_every: got {save_every:g}; expected at least one SGD step, Δt = {dt:g}")
    steps = list(range(0, n_steps + 1, stride))
    if steps[-1] != n_steps:
        steps.append(n_steps)
    return SaveGrid(tuple(k * dt for k in steps), tuple(steps))


def _law_set(laws: str | Sequence[Law], problem: Problem) -> LawSet:
    """The laws to record, compiled on the problem's parameter layout."""
    if isinstance(laws, str):
        if laws != "auto":
            raise ConfigError(f"run.laws: got {laws!r}; expected 'auto' or a list of flowsim Law objects")
        laws = detect(problem.model, loss=problem.loss_kind)
    laws = list(laws)
    for law in laws:
        if not isinstance(law, Law):
            raise ConfigError(f"run.laws: got an item of type {type(law).__name__}; expected flowsim.Law")
    try:
        return LawSet(laws, problem.names, problem.shapes)
    except (KeyError, RuntimeError) as exc:
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
    progress: bool = True,
    config: str | None = None,
    ensemble: int | torch.Tensor | None = None,
) -> xr.Dataset:
    """Integrate `dynamics` on `problem` from the model's current parameters and record the laws.

    **Main arguments**

    - `problem`: the model, data, loss and weight decay (`flowsim.Problem`).
    - `dynamics`: `GradientFlow()`, `DiscreteSGD(lr, batch_size, momentum, ...)`, ...
    - `integrator`: how to move it; None takes the dynamics' default (dopri5 for flows, the
      step loop for SGD).
    - `t1`, `save_every`: end time and save interval, in units of t = step · lr.
    - `laws`: ``"auto"`` (detected from the model's graph) or a list of `flowsim.Law`.
    - `observe`: extras beside the laws: ``"loss"``, ``"grad_norm"``, ``"sharpness"``, ``"params"``.

    **Other arguments**

    - `seed`: seeds batch order and noise. Same seed, device and dtype: the same Dataset.
    - `device`, `dtype`: where and in what precision to run (float64 for accuracy work).
    - `out`: a ``.zarr`` (appended as the run goes) or ``.nc`` path; `overwrite` replaces it.
    - `progress`: a tqdm bar on a terminal. `config`: the run's TOML text, stored as an attr.
    - `ensemble`: K (or (K, P) initial parameters): K independent copies of the run moved at once
      by torch.func.vmap (flowsim.ensemble); member 0 starts from the model's parameters, member
      k ≥ 1 from a fresh initialisation seeded by (seed, k). The record gains a ``member`` dim.

    **Returns** the run's `xarray.Dataset` (schema in flowsim.record), with
    ``attrs["status"]`` "completed", or "diverged" (NaN/Inf, step-size underflow) with
    ``status_message`` saying when and why; everything saved before a divergence is kept.

    **Raises** a `FlowsimError` subclass naming the bad argument, before any work starts;
    KeyboardInterrupt after saving (status "interrupted").
    """
    # --- 1. check every argument before touching anything
    if not isinstance(problem, Problem):
        raise ConfigError(f"problem: got {type(problem).__name__}; expected flowsim.Problem")
    if not isinstance(dynamics, Dynamics):
        raise ConfigError(f"dynamics: got {type(dynamics).__name__}; expected a flowsim dynamics")
    integrator = dynamics.default_integrator() if integrator is None else integrator
    if not isinstance(integrator, Integrator):
        raise ConfigError(f"integrator: got {type(integrator).__name__}; expected a flowsim integrator")
    device, dtype = check_device(device), check_dtype(dtype)
    seed = check_number("run.seed", seed, integer=True, minimum=0)
    observe = check_observe(observe)
    out_path = check_output(out, resume=False, overwrite=overwrite)
    grid = save_grid(dynamics, t1, save_every)
    integrator.check(dynamics, dtype)
    dynamics.check(problem)
    ensemble = check_ensemble(ensemble, dynamics, problem)

    # --- 2. bind the problem to device and dtype; the initial point and its laws
    problem = problem.to(device=device, dtype=dtype)
    law_set = _law_set(laws, problem)
    theta0 = problem.initial_theta()
    if ensemble is not None:
        problem, theta0 = ensemble_start(problem, ensemble, seed)
    attrs = {
        "flowsim_version": __version__,
        "torch_version": torch.__version__,
        "problem": json_attr(problem.describe()),
        "dynamics": json_attr(dynamics.describe()),
        "integrator": json_attr(integrator.describe()),
        "seed": seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "status": "running",
        "status_message": "",
        "config": config if config is not None else to_toml(problem, dynamics, integrator, t1, save_every, seed, device, dtype),
    }
    coords = {**dynamics.coords(), "weight_decay": problem.weight_decay, "seed": seed}
    members = getattr(dynamics, "members", None)  # (dim, K): θ is a (K, P) batch of independent runs
    if ensemble is not None:
        members = problem.members
        attrs["ensemble"] = members[1]
    recorder = Recorder(problem, law_set, observe, theta0, coords, attrs, out_path, members=members)

    # --- 3. integrate, recording at every save point
    from tqdm.auto import tqdm

    bar = tqdm(total=grid.times[-1], unit="t", disable=not progress or not sys.stderr.isatty(), leave=False)
    start = _time.perf_counter()
    status, message, last_time = "completed", "", grid.times[0]
    try:
        for point in integrator.solve(dynamics, problem, theta0, grid, seed):
            if not recorder.add(point, _time.perf_counter() - start):
                status = "diverged"
                message = (
                    f"non-finite loss or parameters at t={point.time:g} (step {point.step}); "
                    f"the {recorder.n_saved + len(recorder.pending)} save points before it are kept"
                )
                break
            bar.update(point.time - last_time)
            last_time = point.time
    except IntegrationError as exc:
        status, message = "diverged", f"{exc} (last saved t={last_time:g})"
    except KeyboardInterrupt:
        recorder.finish("interrupted", f"stopped by the user after t={last_time:g}")
        raise
    finally:
        bar.close()

    # --- 4. the record
    if status != "completed":
        warnings.warn(f"run {status}: {message}", RuntimeWarning, stacklevel=2)
    return recorder.finish(status, message)


__all__ = ["simulate", "save_grid", "FlowsimError"]
