"""Which integrator runs a dynamics: one table from term type to default, and one check that
an integrator takes the term a dynamics hands it.

| term        | default integrator                                      |
|-------------|---------------------------------------------------------|
| StepMap     | Discrete()                                              |
| Noise       | FusedEulerMaruyama(dt = the dynamics' time step η)      |
| Semilinear  | Exponential(rtol = atol = 1e-6): exact on the stiff linear part |
| VectorField | RK("dopri5", rtol = atol = 1e-6, compile = "auto"): torchdiffeq's dopri5, fused |

The tolerance 1e-6 is for exploration: ReLU-type networks make the flow non-smooth, and an
adaptive solver pays for every kink it resolves; tighten it for accuracy work. RK takes
torchdiffeq's steps and evaluations (``ODE("dopri5")``, one ``integrator=`` away) at about a
third less cost (benchmarks/peer_diffrax.py). compile="auto" compiles the gradient before the
first step of a CPU solve long enough for compiling (~15 s) to pay, estimated from the inputs
(``RK.work_estimate`` ≥ ``AUTO_COMPILE_FLOPS`` = 1e12 flops, ~30 s eager on 2 cores),
and evaluates short ones eagerly; the record's integrator attr says which and why. The most
specific row wins (a Semilinear term is a VectorField too).
"""

from __future__ import annotations

from collections.abc import Callable

from .dynamics import Dynamics
from .errors import ConfigError
from .integrators import RK, Discrete, Exponential, FusedEulerMaruyama, Integrator
from .terms import Noise, Semilinear, StepMap, Term, VectorField

#: term type → the integrator that runs it by default, made from the dynamics (most specific first)
DEFAULTS: dict[type[Term], Callable[[Dynamics], Integrator]] = {
    StepMap: lambda dynamics: Discrete(),
    Noise: lambda dynamics: FusedEulerMaruyama(dt=dynamics.time_step),
    Semilinear: lambda dynamics: Exponential(rtol=1e-6, atol=1e-6),
    VectorField: lambda dynamics: RK("dopri5", rtol=1e-6, atol=1e-6, compile="auto"),
}


def default_integrator(dynamics: Dynamics) -> Integrator:
    """The integrator ``simulate(integrator=None)`` runs `dynamics` with."""
    for term, make in DEFAULTS.items():
        if issubclass(dynamics.term_type, term):
            return make(dynamics)
    raise ConfigError(f"dynamics: {dynamics.name} hands a {dynamics.term_type.__name__} term, which no integrator runs by default")


def check_pairing(dynamics: Dynamics, integrator: Integrator) -> None:
    """ConfigError unless `integrator` takes the term `dynamics` hands it."""
    if not issubclass(dynamics.term_type, integrator.term):
        raise ConfigError(
            f"integrator: {type(integrator).__name__} integrates {integrator.term.__name__} terms, but "
            f"{dynamics.name} hands a {dynamics.term_type.__name__} term; leave integrator=None for its default "
            f"({type(default_integrator(dynamics)).__name__})"
        )


__all__ = ["DEFAULTS", "default_integrator", "check_pairing"]
