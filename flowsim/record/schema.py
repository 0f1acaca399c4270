"""The record's schema (DESIGN §6): the observers a run may ask for and every variable's
long_name and units.

Dims ``time`` and ``quantity`` (one entry per law component); ``value``/``grad_sq``/
``velocity_sq`` (time, quantity); ``loss``, ``grad_norm``, ``nfe``, ``wall_time``, optional
``sharpness`` (time, or (time, eigen) for the top k > 1 eigenvalues) and ``sharpness_matvecs``
(time); optional ``params`` (time, parameter); an integrator's statistics (``STATS``) and the
dynamics' own quantities (``DYNAMICS_VARIABLES``: the central flow's predictions) along time.
Coords ``time``, ``step`` (time) and ``law``, ``site``, ``component``, ``exact``, ``scale``
(quantity); hyper-parameters that vary between runs as scalar coords. Attrs hold strings and
numbers only; structured ones are JSON (``json_attr``).

A run of many independent members (the paths of an SDE, an ensemble) carries θ as a (K, P)
batch: every per-θ variable gains that dimension after ``time`` (``value`` (time, path,
quantity), ``loss`` (time, path), …); ``time``, ``step``, ``nfe`` and ``wall_time`` stay shared.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

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
    "predicted_loss": {"long_name": "GD's time-averaged loss as the central flow predicts it, L(θ) + ½⟨∇²L, Σ⟩"},
    "predicted_grad_sq": {"long_name": "GD's time-averaged |∇L_λ|² as the central flow predicts it, |θ'|² + Σ_i (λ_i + λ)² S_ii"},
    "sigma_trace": {"long_name": "tr Σ, the variance of GD's oscillation around θ (central flow)"},
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

#: the dynamics' own quantities the schema describes (``Term.observe``: the central flow's)
DYNAMICS_VARIABLES = {"predicted_loss", "predicted_grad_sq", "sigma_trace"}


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


def json_attr(value: Any) -> str:
    """A structured attribute as a JSON string (attrs hold strings and numbers only)."""
    return json.dumps(value, sort_keys=True, default=str)
