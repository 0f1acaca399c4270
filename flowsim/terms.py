"""The seam between WHAT moves (flowsim.dynamics) and HOW it moves (flowsim.integrators):
the terms that go in, and the save grid and save points that come out (to the record).

A dynamics, bound to a problem and an initial point, hands an integrator a *term* (after
diffrax's terms); an integrator declares the term type it takes (``Integrator.term``) and
integrates any term of that type. Neither side imports the other: both import this module.
The integrators named below are examples: any integrator whose ``term`` is that type runs it.

| term         | what it is                                         | integrators                                |
|--------------|----------------------------------------------------|--------------------------------------------|
| VectorField  | y' = f(t, y) on a flat state y                     | RK, ODE, SciPy, Exponential, GaussLegendre |
| Semilinear   | y' = (M ⊗ I_P) y + N(t, y) (a VectorField too)     | the same; Exponential solves M             |
| Noise        | dθ = b(θ) dt + G(θ) dW, with a fused increment     | FusedEulerMaruyama, SDE                    |
| StepMap      | state_{k+1} = step(state_k, k, seed)               | Discrete                                   |

**Members.** θ may be a batch of K independent members, (K, P): an ensemble's copies of the
run, or the SDE's paths. A term says so by ``members = (dim, K)``, the record's leading
dimension over them (None: one run); the integrators treat the members as one state and read
nothing else about them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

#: (dim, K): the record's dimension over K independent members of a run, e.g. ("path", 4)
Members = tuple[str, int]


class Memory(Protocol):
    """What a term's field carries from one evaluation to the next (e.g. an eigen-solver's warm
    start). A checkpoint keeps ``state()`` at its save point and a resume hands it to
    ``restore``, so the resumed run evaluates as the uninterrupted one did, to the bit. The
    state's tensors are replaced between evaluations, never changed in place."""

    def state(self) -> dict[str, Tensor | None]: ...

    def restore(self, state: dict[str, Tensor | None]) -> None: ...


@dataclass(kw_only=True)
class Term:
    """What a dynamics hands an integrator.

    - `members`: (dim, K) when θ is a (K, P) batch.
    - `memory`: what its field carries between evaluations (``Memory``; None: nothing).
    - `observe(θ)`: the dynamics' own quantities at a save point, each a 0-d tensor recorded as
      a variable along time (the central flow's predictions of GD's averages; None: none). It
      leaves `memory` as it found it, so recording never changes the run.
    """

    members: Members | None = None
    memory: Memory | None = None
    observe: Callable[[Tensor], dict[str, Tensor]] | None = None


@dataclass(kw_only=True)
class VectorField(Term):
    """y' = f(t, y) on a flat state y (θ, or θ and a velocity stacked), from y0.

    - `f(t, y)`: the derivative; `t` a 0-d float64 tensor.
    - `split(y)`: (θ, velocity or None) as views of a state (the record's θ and v = θ').
    - `error_norm(r)`: the norm an adaptive method applies to its scaled error r (None: the RMS
      over every entry); an ensemble gives the largest of its members' RMS norms.
    - `compiled()`: the same field with its gradients through one compiled graph (None: it has
      none; integrators' ``compile=True`` asks for it).
    - `jvp(t, y, v)`: ∂f/∂y(t, y) · v, the Jacobian of f applied to v (None: the dynamics gives
      none; an implicit integrator then takes a finite difference of f).
    - `kinks()`: a fresh recorder of the branches f's non-smooth operations take (ReLU masks,
      max-pool choices; ``flowsim.kinks.Branches``): f evaluated inside its ``record()`` notes
      them, inside its ``replay()`` takes them at any y, the smooth piece of f through the
      recorded point (None: f has no kinks to freeze).
    """

    f: Callable[[Tensor, Tensor], Tensor]
    y0: Tensor
    split: Callable[[Tensor], tuple[Tensor, Tensor | None]]
    error_norm: Callable[[Tensor], Tensor] | None = None
    compiled: Callable[[], VectorField] | None = None
    jvp: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    kinks: Callable[[], Any] | None = None

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        return self.f(t, y)


@dataclass(kw_only=True)
class Semilinear(VectorField):
    """y' = (M ⊗ I_P) y + N(t, y): the state is k stacked vectors of length P and M (`linear`,
    float64 k×k) the linear, possibly stiff part; N (`nonlinear`) is the rest. `f` is their sum,
    so every VectorField integrator runs it; an exponential integrator solves M exactly."""

    linear: Tensor
    nonlinear: Callable[[Tensor, Tensor], Tensor]


@dataclass(kw_only=True)
class Noise(Term):
    """The Itô SDE dθ = b(θ) dt + G(θ) dW on `paths` independent paths from θ0 (`y0`, (P,)), W of
    dimension `noise_size` per path. Per path θ (P,):

    - `drift(θ)` = b(θ); `diffusion(θ, w)` = G(θ) w (G is never formed);
    - `increment(θ, dt, dW)` = θ + b(θ) dt + G(θ) dW, one Euler–Maruyama step, fused where the
      dynamics can (the SGD noise: one backward pass).

    Its `members` are ("path", paths)."""

    y0: Tensor
    paths: int
    noise_size: int
    drift: Callable[[Tensor], Tensor]
    diffusion: Callable[[Tensor, Tensor], Tensor]
    increment: Callable[[Tensor, float, Tensor], Tensor]

    def __post_init__(self) -> None:
        self.members = ("path", self.paths)


@dataclass
class StepResult:
    """What step k of a step map used and made: the new `state`, ĝ_k (the data-loss gradient on
    its batch), the velocity v_{k+1} that moves θ_k to θ_{k+1} (None without one), the batch loss,
    and whether the batch was the full data (then that loss is L(θ_k))."""

    state: Any
    grad: Tensor
    velocity: Tensor | None
    batch_loss: Tensor
    full_batch: bool


@dataclass(kw_only=True)
class StepMap(Term):
    """A discrete optimiser: state_{k+1} = step(state_k, k, seed).result.state, from `init`.
    The state is a dataclass with a ``theta`` field whose fields are tensors or None (a checkpoint
    stores them); its randomness is a pure function of (seed, k)."""

    init: Any
    step: Callable[[Any, int, int], StepResult]


@dataclass(frozen=True)
class SaveGrid:
    """Where to save: `times` (t = k·lr units), and for discrete dynamics the step index of each."""

    times: tuple[float, ...]
    steps: tuple[int, ...] | None = None


@dataclass
class SavePoint:
    """The state at one save time, with what the integrator already knows there.

    `grad` is ĝ (the data-loss gradient without weight decay) that moves θ from here, `velocity`
    the velocity that moves it, `loss` the full-data loss at θ; each is None when the
    integrator does not have it for free (the recorder then computes what it needs).
    `step` counts the integrator's steps so far, `nfe` its evaluations of the dynamics.
    For a term with ``members = (dim, K)`` (an ensemble, SGDNoise's paths) θ, grad, velocity and
    loss carry a leading batch dimension of K independent members: θ is (K, P).
    `checkpoint` is the integrator's state after this point (the contract: flowsim.integrators.base).
    `stats` are the integrator's own counts so far (e.g. ``rejected_steps``), each recorded as a
    variable along time; an integrator gives the same names at every point."""

    time: float
    step: int
    nfe: int
    theta: Tensor
    grad: Tensor | None = None
    velocity: Tensor | None = None
    loss: Tensor | None = None
    checkpoint: dict[str, Any] | None = None
    stats: dict[str, float] = field(default_factory=dict)


__all__ = ["SaveGrid", "SavePoint", "Members", "Memory", "Term", "VectorField", "Semilinear", "Noise", "StepMap", "StepResult"]
