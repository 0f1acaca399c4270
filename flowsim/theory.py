"""Predictions for the laws that weight decay, momentum, finite η and batch noise break (DESIGN §5).

A record holds, for every law component Q, its value Q(θ_k) (``value``), the same form of the
data-loss gradient of the step, Q(ĝ_k) (``grad_sq``), and under momentum the form of the velocity
that moves θ_k, Q(v_{k+1}) with θ_{k+1} = θ_k − η v_{k+1} (``velocity_sq``). A symmetry makes
the gradient orthogonal to its generator: A ĝ = 0 for a linear (translation) law s = A θ, and
Q(θ, ĝ) = 0 for a quadratic law h = Q(θ) = θᵀDθ (scale, rescale, and every other quadratic kind),
with Q(x, y) = xᵀDy its bilinear form. η is the learning rate, λ the weight decay, β the
momentum, d the dampening, Δ = η(1−d) the time one step advances (t = kΔ).

**Exact discrete recursions** (``kind="discrete"``; need a save at every step).

- SGD, θ_{k+1} = (1−ηλ)θ_k − ηĝ_k:  s_{k+1} = (1−ηλ) s_k;  h_{k+1} = (1−ηλ)² h_k + η² grad_sq_k.
- Heavy ball (PyTorch: v_1 = ĝ_0 + λθ_0, v_{k+1} = βv_k + (1−d)(ĝ_k + λθ_k), θ_{k+1} = θ_k − ηv_{k+1}),
  with u_k = velocity_sq_k = Q(v_{k+1}):

      s_1 = (1−ηλ) s_0,            s_{k+1} = (1 + β − Δλ) s_k − β s_{k−1}
      h_1 = (1−2ηλ) h_0 + η² u_0,  h_{k+1} = (1 + β − 2Δλ) h_k − β h_{k−1} + η² (u_k + β u_{k−1})

  Derivation. Translation: A v_{k+1} = β A v_k + (1−d)λ s_k and A v_k = (s_{k−1} − s_k)/η.
  Quadratic: h_{k+1} = h_k − 2η c_k + η² u_k with the cross term c_k = Q(θ_k, v_{k+1}); since
  Q(θ_k, ĝ_k) = 0 and θ_k = θ_{k−1} − ηv_k, c_k = β(c_{k−1} − η u_{k−1}) + (1−d)λ h_k, c_0 = λh_0.
  Eliminating c with 2ηc_k = h_k − h_{k+1} + η² u_k gives the recursion above. Translation needs
  only s_0; both hold for any batch noise, to round-off. Nesterov's update also needs
  Q(v_k, buffer_k), which no record holds: it has no theory here.

**Continuous solutions** (``kind="continuous"``; any save grid).

- SGD without momentum: s(t) = e^{−r₁t} s_0 and h(t) = e^{−r₂t} h_0 + (η²/Δ) ∫_0^t e^{−r₂(t−τ)} grad_sq dτ,
  with ``rate="modified"`` r₁ = (η/Δ)(λ + ηλ²/2), r₂ = (η/Δ)(2λ + ηλ²) (the rates of the
  discrete map, −ln(1−ηλ)/Δ to O(η²λ³); also those of the first-order modified flow) or
  ``rate="leading"`` r₁ = (η/Δ)λ, r₂ = (η/Δ)2λ. With d = 0 (Δ = η) these are DESIGN's
  e^{−λt}s_0 and e^{−2λt}h_0 + η ∫ e^{−2λ(t−τ)} grad_sq dτ.
- Heavy ball, from its inertial flow (Δ/2)(1+β)θ'' + (1−β)θ' = −∇L_λ projected on the law:
  h'' + 2γh' + ω²h = 2 velocity_sq/(1−d)², h(0) = h_0, h'(0) = 0, with γ = (1−β)/(Δ(1+β)),
  ω² = 4λ/(Δ(1+β)); translation: s'' + 2γs' + ω²s = 0 with ω² = 2λ/(Δ(1+β)). The translation
  law has no forcing: DESIGN's "= 2·velocity_sq" holds for the quadratic laws only (A ĝ = 0
  removes it). `rate` does not apply here.
- GradientFlow (η = 0): s = e^{−λt}s_0 and h = e^{−2λt}h_0, exactly.

Each continuous solution is the linear system x' = Mx + b f(t) with f the recorded companion,
propagated over every save interval by the exact exponential of an augmented matrix
(``solve_linear``): under-, critically and over-damped alike, with no growing exponential
anywhere, so it stays finite over any run. The companion recorded at save point k is the form
of what SGD applies over the whole step [t_k, t_{k+1}) (its batch gradient or velocity), so it
is held constant there (a linear interpolation between save points errs by η²(f_k − f_0)/2,
half a step's forcing; measured: docs, "Theory for broken laws"). A
record saved every m > 1 steps holds one batch's companion over m steps: the batch noise is
then sampled, not integrated, and the prediction of a rescale law (whose forcing
|g_A1|² − |g_A2|² cancels on average) is poor;
save every step for the continuous prediction too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import xarray as xr
from scipy.linalg import expm

from .errors import RecordError, bad_value
from .laws import KINDS as LAW_KINDS
from .record import VARIABLES

#: prediction kinds ``predict`` offers
KINDS = ("discrete", "continuous")
#: decay rates of the continuous solution without momentum
RATES = ("modified", "leading")
#: law kinds whose form is linear in θ; every other kind of flowsim.laws is quadratic
LINEAR_LAWS = ("translation",)
#: dynamics with a theory here
DYNAMICS = ("DiscreteSGD", "GradientFlow")


@dataclass(frozen=True)
class _Run:
    """What a prediction reads off a record: its dynamics' hyper-parameters and grid."""

    dynamics: str
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    times: np.ndarray
    linear: np.ndarray  # bool per quantity

    @property
    def time_step(self) -> float:
        return self.lr * (1.0 - self.dampening)


def predict(ds: xr.Dataset, kind: str = "discrete", *, rate: str = "modified") -> xr.Dataset:
    """`ds` with a ``theory`` variable (time, quantity): the prediction of every law component
    from what the run recorded (the value at t = 0, ``grad_sq``, ``velocity_sq`` under momentum,
    and the hyper-parameters in its coords). See the module docstring for the equations.

    **Main arguments**

    - `ds`: one run's record (``flowsim.simulate`` or ``open_record``), DiscreteSGD or GradientFlow.
    - `kind`: ``"discrete"``, the exact recursions of SGD and heavy ball (the record must hold
      every step: ``save_every = lr·(1−dampening)``), or ``"continuous"``, the solutions of the
      continuous models (first order without momentum, the damped oscillator with it).

    **Other arguments**

    - `rate`: ``"modified"`` (λ + ηλ²/2 and 2λ + ηλ², the default) or ``"leading"`` (λ and 2λ):
      the decay rates of the continuous solution without momentum.

    **Returns** a new Dataset; ``theory.attrs`` say which prediction it holds.

    **Raises** `ConfigError` for a bad `kind` or `rate`; `RecordError` naming what the record
    lacks (``grad_sq``, ``velocity_sq`` under momentum, a save at every step for the discrete
    kind) or a dynamics with no theory here.
    """
    if kind not in KINDS:
        raise bad_value("theory.kind", kind, "'discrete' or 'continuous'")
    if rate not in RATES:
        raise bad_value("theory.rate", rate, "'modified' or 'leading'")
    run = _read_run(ds, kind)
    value0 = np.asarray(ds["value"].values[0], dtype=np.float64)
    momentum = run.momentum > 0
    quadratic = ~run.linear
    companion = "velocity_sq" if momentum else "grad_sq"
    forcing = None
    if quadratic.any() and run.dynamics == "DiscreteSGD":
        if companion not in ds:
            what = "the form of the velocity of each step" if momentum else "the form of the batch gradient of each step"
            raise RecordError(
                f"theory: the record has no `{companion}` variable ({what}); the {kind} prediction of its "
                f"{', '.join(sorted(set(ds['law'].values[quadratic].tolist())))} laws needs it "
                f"(flowsim.simulate records it{' under momentum' if momentum else ''})"
            )
        forcing = np.asarray(ds[companion].values, dtype=np.float64)
    if kind == "discrete":
        theory, equation = (_heavy_ball if momentum else _sgd)(run, value0, forcing)
    elif run.dynamics == "GradientFlow":
        lam = run.weight_decay
        theory, equation = _decay(run, value0, lam, 2 * lam), "GradientFlow: s = e^{−λt} s_0, h = e^{−2λt} h_0"
    elif momentum:
        theory, equation = _oscillator(run, value0, forcing)
    else:
        theory, equation = _first_order(run, value0, forcing, rate)
    attrs = {
        **VARIABLES["theory"],
        "prediction": kind,
        "equation": equation,
    }
    if kind == "continuous" and not momentum and run.dynamics == "DiscreteSGD":
        attrs["rate"] = rate
    return ds.assign(theory=(("time", "quantity"), theory, attrs))


def error(ds: xr.Dataset, relative_to: str = "range") -> xr.DataArray:
    """max over time of |theory − value| per law component, relative to:

    - ``"range"``: the measured component's range over the run, max − min (at least
      √ε·scale, ε the record's float epsilon, so a component that stays constant to round-off
      is not divided by its round-off);
    - ``"value"``: max(|value|, scale) at each time, for round-off checks of exact recursions.
    """
    if "theory" not in ds:
        raise RecordError("theory: the record has no `theory` variable; call flowsim.theory.predict(ds) first")
    if relative_to not in ("range", "value"):
        raise bad_value("theory.relative_to", relative_to, "'range' or 'value'")
    if "scale" not in ds.coords:
        raise RecordError("theory: the record has no `scale` coord (the magnitude of each law at t = 0)")
    value, scale = ds["value"], ds["scale"]
    gap = abs(ds["theory"] - value)
    if relative_to == "value":
        out = (gap / np.maximum(abs(value), scale)).max("time")
    else:
        floor = np.sqrt(np.finfo(value.dtype if value.dtype.kind == "f" else np.float64).eps) * scale
        out = gap.max("time") / np.maximum(value.max("time") - value.min("time"), floor)
    return out.assign_attrs(long_name=f"max |theory − value| relative to the {relative_to}")


def solve_linear(
    matrix: np.ndarray,
    forcing_vector: np.ndarray,
    times: np.ndarray,
    x0: np.ndarray,
    forcing: np.ndarray | None = None,
    interpolation: str = "linear",
) -> np.ndarray:
    """x(t) of x' = M x + b f(t) on `times`, from x(times[0]) = x0, exactly for f linear
    between grid points (``interpolation="linear"``) or held at f_i over [t_i, t_{i+1})
    (``"hold"``); f = 0 if `forcing` is None. Any eigenvalues of M: under-, critically and
    over-damped oscillators alike.

    Over an interval of length Δ, z = (x, f, f') obeys z' = [[M, b, 0], [0, 0, 1], [0, 0, 0]] z;
    its exponential (computed once per distinct Δ) gives x_{i+1} = E x_i + w_0 f_i + w_1 f_{i+1}.
    No growing exponential is formed, so stable M give finite x over any number of intervals.

    Shapes: M (n, n), b (n,), times (T,), x0 (n, Q), forcing (T, Q); returns (T, n, Q).
    """
    if interpolation not in ("linear", "hold"):
        raise bad_value("theory.interpolation", interpolation, "'linear' or 'hold'")
    matrix, forcing_vector = np.asarray(matrix, np.float64), np.asarray(forcing_vector, np.float64)
    times, x = np.asarray(times, np.float64), np.array(x0, np.float64)
    n = matrix.shape[0]
    augmented = np.zeros((n + 2, n + 2))
    augmented[:n, :n], augmented[:n, n], augmented[n, n + 1] = matrix, forcing_vector, 1.0
    steps: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    out = np.empty((len(times), *x.shape))
    out[0] = x
    for i, delta in enumerate(np.diff(times)):
        key = float(f"{delta:.12g}")
        if key not in steps:
            full = expm(augmented * delta)
            slope = full[:n, n + 1] / delta if interpolation == "linear" else np.zeros(n)
            steps[key] = (full[:n, :n], full[:n, n] - slope, slope)
        propagator, w0, w1 = steps[key]
        x = propagator @ x
        if forcing is not None:
            x += w0[:, None] * forcing[i] + w1[:, None] * forcing[i + 1]
        out[i + 1] = x
    return out


# ---------------------------------------------------------------------------- the predictions
def _sgd(run: _Run, value0: np.ndarray, grad_sq: np.ndarray | None) -> tuple[np.ndarray, str]:
    """s_{k+1} = (1−ηλ) s_k; h_{k+1} = (1−ηλ)² h_k + η² grad_sq_k."""
    eta, lam = run.lr, run.weight_decay
    a = np.where(run.linear, 1 - eta * lam, (1 - eta * lam) ** 2)
    forcing = np.zeros((len(run.times), len(value0))) if grad_sq is None else np.where(run.linear, 0.0, eta**2 * grad_sq)
    out = np.empty_like(forcing)
    out[0] = value0
    for k in range(len(out) - 1):
        out[k + 1] = a * out[k] + forcing[k]
    return out, "SGD: s_{k+1} = (1−ηλ) s_k; h_{k+1} = (1−ηλ)² h_k + η² grad_sq_k"


def _heavy_ball(run: _Run, value0: np.ndarray, velocity_sq: np.ndarray | None) -> tuple[np.ndarray, str]:
    """s_1 = (1−ηλ)s_0, s_{k+1} = (1+β−Δλ)s_k − βs_{k−1}; h_1 = (1−2ηλ)h_0 + η²u_0,
    h_{k+1} = (1+β−2Δλ)h_k − βh_{k−1} + η²(u_k + βu_{k−1}) (derivation in the module docstring)."""
    eta, lam, beta, delta = run.lr, run.weight_decay, run.momentum, run.time_step
    u = np.zeros((len(run.times), len(value0))) if velocity_sq is None else np.where(run.linear, 0.0, velocity_sq)
    first = np.where(run.linear, 1 - eta * lam, 1 - 2 * eta * lam)
    a = np.where(run.linear, 1 + beta - delta * lam, 1 + beta - 2 * delta * lam)
    out = np.empty_like(u)
    out[0] = value0
    if len(out) > 1:
        out[1] = first * value0 + eta**2 * u[0]
    for k in range(1, len(out) - 1):
        out[k + 1] = a * out[k] - beta * out[k - 1] + eta**2 * (u[k] + beta * u[k - 1])
    return out, "heavy ball: s_{k+1} = (1+β−Δλ)s_k − βs_{k−1}; h_{k+1} = (1+β−2Δλ)h_k − βh_{k−1} + η²(u_k + βu_{k−1})"


def _decay(run: _Run, value0: np.ndarray, linear_rate: float, quadratic_rate: float) -> np.ndarray:
    """value0 · e^{−r t}, r = linear_rate for linear laws and quadratic_rate for quadratic ones."""
    rates = np.where(run.linear, linear_rate, quadratic_rate)
    return value0 * np.exp(-np.outer(run.times - run.times[0], rates))


def _first_order(run: _Run, value0: np.ndarray, grad_sq: np.ndarray | None, rate: str) -> tuple[np.ndarray, str]:
    """s = e^{−r₁t} s_0; h = e^{−r₂t} h_0 + (η²/Δ) ∫ e^{−r₂(t−τ)} grad_sq dτ."""
    eta, lam, per_time = run.lr, run.weight_decay, run.lr / run.time_step
    extra = eta * lam**2 if rate == "modified" else 0.0
    r1, r2 = per_time * (lam + extra / 2), per_time * (2 * lam + extra)
    out = _decay(run, value0, r1, r2)
    quadratic = ~run.linear
    if quadratic.any() and grad_sq is not None:
        x = solve_linear([[-r2]], [eta**2 / run.time_step], run.times, value0[None, quadratic], grad_sq[:, quadratic], "hold")
        out[:, quadratic] = x[:, 0]
    rates = "λ + ηλ²/2, 2λ + ηλ²" if rate == "modified" else "λ, 2λ"
    return out, f"continuous SGD ({rates}): s = e^{{−r₁t}} s_0; h = e^{{−r₂t}} h_0 + η ∫ e^{{−r₂(t−τ)}} grad_sq dτ"


def _oscillator(run: _Run, value0: np.ndarray, velocity_sq: np.ndarray | None) -> tuple[np.ndarray, str]:
    """h'' + 2γh' + ω²h = 2 velocity_sq/(1−d)², h(0) = h_0, h'(0) = 0 (translation: ω² halved, no forcing)."""
    beta, lam, delta = run.momentum, run.weight_decay, run.time_step
    gamma = (1 - beta) / (delta * (1 + beta))
    out = np.empty((len(run.times), len(value0)))
    for linear in (True, False):
        mask = run.linear == linear
        if not mask.any():
            continue
        omega_sq = (2 if linear else 4) * lam / (delta * (1 + beta))
        b = [0.0, 0.0 if linear else 2 / (1 - run.dampening) ** 2]
        f = None if linear or velocity_sq is None else velocity_sq[:, mask]
        x0 = np.stack([value0[mask], np.zeros(mask.sum())])
        out[:, mask] = solve_linear([[0.0, 1.0], [-omega_sq, -2 * gamma]], b, run.times, x0, f, "hold")[:, 0]
    regime = "under" if 4 * lam / (delta * (1 + beta)) > gamma**2 else "over or critically"
    return out, f"momentum oscillator ({regime}damped): h'' + 2γh' + ω²h = 2 velocity_sq, h'(0) = 0"


# ---------------------------------------------------------------------------- reading a record
def _scalar(ds: xr.Dataset, name: str, default: float | None = None) -> float:
    if name not in ds.coords:
        if default is not None:
            return default
        raise RecordError(f"theory: the record has no `{name}` coord; the prediction needs it")
    coord = ds.coords[name]
    if coord.ndim:
        raise RecordError(
            f"theory: `{name}` varies along {coord.dims}; predict one run at a time (select it with ds.isel or ds.sel)"
        )
    return float(coord.values)


def _read_run(ds: xr.Dataset, kind: str) -> _Run:
    """The dynamics, hyper-parameters and grid of one run's record, checked for `kind`."""
    if not isinstance(ds, xr.Dataset):
        raise bad_value("theory.ds", type(ds).__name__, "an xarray.Dataset recorded by flowsim", RecordError)
    if "value" not in ds or "law" not in ds.coords:
        raise RecordError("theory: the record needs a `value` variable on (time, quantity) and a `law` coord")
    members = [d for d in ds["value"].dims if d not in ("time", "quantity")]
    if members:
        raise RecordError(
            f"theory: the record has members along {members[0]!r}; predict one member at a time (ds.isel({members[0]}=i))"
        )
    if ds.sizes["time"] == 0:
        raise RecordError("theory: the record has no save points")
    try:
        dynamics = json.loads(ds.attrs["dynamics"])
        name = dynamics["name"]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise RecordError("theory: the record has no readable `dynamics` attribute (a JSON object with its name)") from exc
    if name not in DYNAMICS:
        raise RecordError(f"theory: no prediction for the dynamics {name!r}; there is theory for {', '.join(DYNAMICS)}")
    if dynamics.get("nesterov"):
        raise RecordError(
            "theory: no prediction for Nesterov momentum (its recursion needs the cross form of the velocity "
            "and the momentum buffer, which no record holds); use heavy ball (nesterov=false)"
        )
    laws = ds["law"].values.tolist()
    unknown = sorted(set(laws) - set(LAW_KINDS))
    if unknown:
        raise RecordError(f"theory: unknown law kind {unknown[0]!r}; expected kinds from {', '.join(LAW_KINDS)}")
    linear = np.isin(np.asarray(laws), LINEAR_LAWS)
    weight_decay = _scalar(ds, "weight_decay")
    if name == "GradientFlow":
        if kind == "discrete":
            raise RecordError("theory: GradientFlow has no discrete steps; use kind='continuous'")
        return _Run(name, 0.0, 0.0, 0.0, weight_decay, np.asarray(ds["time"].values, np.float64), linear)
    run = _Run(
        name,
        _scalar(ds, "lr"),
        _scalar(ds, "momentum", 0.0),
        _scalar(ds, "dampening", 0.0),
        weight_decay,
        np.asarray(ds["time"].values, np.float64),
        linear,
    )
    if kind == "discrete":
        steps = np.asarray(ds["step"].values) if "step" in ds.coords else None
        if steps is None or steps[0] != 0 or np.any(np.diff(steps) != 1):
            raise RecordError(
                "theory: the discrete prediction needs a save at every step from step 0 "
                f"(run.save_every = lr·(1−dampening) = {run.time_step:g}); this record saves at steps "
                f"{_show(steps)}; use kind='continuous' or record every step"
            )
    return run


def _show(steps: np.ndarray | None) -> str:
    if steps is None:
        return "(no step coord)"
    return ", ".join(str(s) for s in steps[:4]) + (", …" if len(steps) > 4 else "")
