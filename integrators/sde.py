"""The SGD-noise SDE on torchsde's solvers, streamed save point by save point.

torchsde integrates Itô SDEs with general (P × m) noise through the product G(θ)·v alone
(``g_prod``), which is how the SGD noise is given: the matrix G is never formed. Among
torchsde's methods only Euler–Maruyama ("euler") takes Itô SDEs with general noise: srk and
Milstein need diagonal, additive or scalar noise, and midpoint, heun, euler_heun, log_ode and
reversible_heun solve Stratonovich SDEs, whose drift correction would need derivatives of G.

**torchsde's internals, behind one adapter.** torchsde's public API is ``sdeint`` (a whole
solve), the Brownian motions (``BrownianInterval``, the ``BaseBrownian`` base) and the SDE
protocol (``noise_type``, ``sde_type``, ``f_and_g_prod``). ``sdeint`` evaluates the SDE once
more per call to check its shapes (``check_contract``), so solving step by step through it
would double the cost, and save interval by save interval it would add a step of round-off
length where the steps' sum falls short of the save time. The fixed steps here are torchsde's
solver stepped directly (``solver.step``, landing on each save time), its adaptive mode its
solver's ``integrate`` per save interval: the solver object, which only the private
``torchsde._core.methods.select`` and ``torchsde._core.base_sde.ForwardSDE`` build, and the list
of methods in ``torchsde.settings``. Those names are read in ``Torchsde`` below and nowhere
else: a release that renames one fails at import (``upstream_names``), or in
``TORCHSDE.check()`` (tests/test_upstream.py), which drives each of them once, naming what
changed. The adapter is written against torchsde ``TORCHSDE_VERSIONS`` (pyproject.toml's range:
0.2.5's solvers step and integrate without the extra solver state 0.2.6 added).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchsde import BaseBrownian, BrownianInterval

from flowsim.errors import ConfigError, check_field
from flowsim.terms import Noise

from .base import Integrator, SaveGrid, SavePoint, check_fixed_step, upstream_changed, upstream_names
from .brownian import brownian_increments, fixed_steps

#: the torchsde releases ``Torchsde`` is written against (pyproject.toml's range)
TORCHSDE_VERSIONS = ">=0.2.6,<0.3"


class Torchsde:
    """torchsde's internals, the only ones flowsim touches (module docstring): its method list
    and the solver object of a method for Itô SDEs, stepped or integrated. Built once, at
    import (``TORCHSDE``)."""

    #: the private names it reads, by module
    NAMES = {
        "torchsde._core.methods": ("select",),
        "torchsde._core.base_sde": ("ForwardSDE",),
        "torchsde.settings": ("METHODS",),
    }

    def __init__(self) -> None:
        self.names = upstream_names("torchsde", self.NAMES, TORCHSDE_VERSIONS)
        #: torchsde's methods (the adjoint one is for backpropagation through a solve, not a solve)
        self.methods = tuple(m for m in self.names["METHODS"].all() if m != "adjoint_reversible_heun")

    def method_class(self, method: str) -> type:
        """The solver class of `method` for Itô SDEs (its ``sde_type`` and ``noise_types`` say
        what it solves)."""
        return self.names["select"](method, "ito")

    def solver(
        self, sde: torch.nn.Module, bm: BaseBrownian, method: str, dt: float, adaptive: bool, rtol: float, atol: float, dt_min: float
    ):
        """The solver object ``sdeint`` would integrate `sde` with (without its contract check)."""
        return self.method_class(method)(
            sde=self.names["ForwardSDE"](sde), bm=bm, dt=dt, adaptive=adaptive, rtol=rtol, atol=atol, dt_min=dt_min, options={}
        )

    @staticmethod
    def step(solver, t0: float, t1: float, y: Tensor) -> Tensor:
        """y at t1 from y at t0: one step (of the increment its Brownian motion gives over [t0, t1])."""
        y1, _ = solver.step(t0, t1, y, ())
        return y1

    @staticmethod
    def integrate(solver, bm: BaseBrownian, y: Tensor, ts: Tensor) -> Tensor:
        """y at ts[-1] from y at ts[0], on the Brownian motion `bm` (the adaptive steps' own)."""
        solver.bm = bm
        return solver.integrate(y, ts, ())[0][-1]

    def check(self) -> list[str]:
        """Every name driven once: each method's class says what it solves; Euler–Maruyama's
        fixed step on dθ = −θ dt + 0.5 dW (two paths of two numbers) equals θ − θ h + 0.5 ΔW to
        round-off; its adaptive integrate over [0, 0.1] moves θ by about e^(−0.1) and the noise.
        What failed, one line each ([] when all is well)."""
        problems = []
        try:
            for method in self.methods:
                cls = self.method_class(method)
                if cls.sde_type not in ("ito", "stratonovich") or not cls.noise_types:
                    problems.append(f"{method}: its class says it solves {cls.sde_type!r} SDEs with {cls.noise_types!r} noise")
            if "euler" not in self.methods or "general" not in self.method_class("euler").noise_types:
                problems.append("no Euler–Maruyama for Itô SDEs with general noise")
        except Exception as exc:  # noqa: BLE001 — each failure is reported, whatever it is
            problems.append(f"the methods' classes: {type(exc).__name__}: {exc}")
        try:
            term = Noise(
                y0=torch.ones(2, dtype=torch.float64), paths=2, noise_size=2, drift=lambda theta: -theta,
                diffusion=lambda theta, w: 0.5 * w, increment=lambda theta, dt, dw: theta - theta * dt + 0.5 * dw,
            )  # fmt: skip
            y = torch.ones(2, 2, dtype=torch.float64)
            increments = _StepIncrements(seed=1, paths=2, size=2, dtype=torch.float64, device=y.device)
            solver = self.solver(_NoiseSDE(term), increments, "euler", 0.1, False, 1e-5, 1e-4, 1e-5)
            dw = brownian_increments(1, 2, 0, 2, 0.1, torch.float64, y.device)
            if not torch.allclose(self.step(solver, 0.0, 0.1, y), y - 0.1 * y + 0.5 * dw, rtol=1e-12, atol=1e-12):
                problems.append("Euler–Maruyama's step is not θ + b(θ) h + G ΔW")
            bm = BrownianInterval(0.0, 0.1, size=(2, 2), dtype=torch.float64, entropy=1)
            solver = self.solver(_NoiseSDE(term), bm, "euler", 0.05, True, 1e-5, 1e-4, 1e-5)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                end = self.integrate(solver, bm, y, torch.tensor([0.0, 0.1], dtype=torch.float64))
            if not (end.shape == y.shape and float((end - math.exp(-0.1)).abs().max()) < 1.0):
                problems.append(f"the adaptive integrate gave {end.tolist()} from 1 over [0, 0.1]")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"Euler–Maruyama's solver: {type(exc).__name__}: {exc}")
        return problems

    def changed(self, problems: list[str]) -> str:
        """The message for what ``check`` found."""
        return upstream_changed("torchsde", TORCHSDE_VERSIONS, "; ".join(problems))


#: the adapter (built at import: a torchsde without its names fails there, saying so)
TORCHSDE = Torchsde()
#: torchsde's methods
_METHODS = TORCHSDE.methods
#: those that solve Itô SDEs with general noise, the SGD-noise SDE's kind
GENERAL_NOISE_ITO = tuple(
    m for m in _METHODS if TORCHSDE.method_class(m).sde_type == "ito" and "general" in TORCHSDE.method_class(m).noise_types
)


class _NoiseSDE(torch.nn.Module):
    """torchsde's view of a noise term on a (paths, P) state: drift and G·v, path by path (its
    public SDE protocol: Itô, general noise, ``f_and_g_prod``)."""

    noise_type = "general"
    sde_type = "ito"

    def __init__(self, term: Noise) -> None:
        super().__init__()
        self.term = term
        self.nfe = 0

    def f_and_g_prod(self, t: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.nfe += 1
        drift = torch.stack([self.term.drift(theta) for theta in y])
        noise = torch.stack([self.term.diffusion(theta, w) for theta, w in zip(y, v)])
        return drift, noise


class _StepIncrements(BaseBrownian):
    """A Brownian motion queried one fixed step at a time: over the current step k it returns the
    increments of ``brownian_increments(seed, paths, k, …)``, shared with FusedEulerMaruyama."""

    def __init__(self, seed: int, paths: int, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.seed, self._shape, self._dtype, self._device = seed, (paths, size), dtype, device
        self.step = 0

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None or return_U or return_A:
            raise NotImplementedError("only increments over one step are drawn")
        return brownian_increments(
            self.seed, self._shape[0], self.step, self._shape[1], float(tb - ta), self._dtype, self._device
        )

    def __repr__(self) -> str:
        return f"_StepIncrements(seed={self.seed}, shape={self._shape})"

    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._device)
    shape = property(lambda self: self._shape)
    levy_area_approximation = property(lambda self: "none")


@dataclass(frozen=True)
class SDE(Integrator):
    """torchsde's `method` on the SGD-noise SDE (``SGDNoise``), its noise through ``g_prod``.

    Fixed steps (default): steps h ≤ `dt` landing on every save time, with the increments of
    FusedEulerMaruyama (a pure function of (seed, path, step)), so both integrators give the same
    paths to round-off; a step costs a drift and a noise evaluation (two backward passes).
    ``adaptive=True``: torchsde's step doubling to ``atol + rtol·|y|`` from `dt`, never below
    `dt_min`, on a ``BrownianInterval`` per save interval seeded by (seed, interval); torchsde
    does not guarantee convergence of adaptive Euler–Maruyama for multiplicative noise.
    Its `order` is Euler–Maruyama's weak order (strong: ½).

    **Raises** ConfigError for a method torchsde lacks for Itô SDEs with general noise.
    """

    method: str
    dt: float
    adaptive: bool = False
    rtol: float = 1e-5
    atol: float = 1e-4
    dt_min: float = 1e-5
    term = Noise
    order = 1

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ConfigError(f"integrator.method: got {self.method!r}; expected one of torchsde's {', '.join(_METHODS)}")
        if self.method not in GENERAL_NOISE_ITO:
            cls = TORCHSDE.method_class(self.method)
            why = f"it solves {cls.sde_type} SDEs" if cls.sde_type != "ito" else f"it takes only {', '.join(cls.noise_types)} noise"
            raise ConfigError(
                f"integrator.method: got {self.method!r}; the SGD-noise SDE is Itô with general noise, and {why}; "
                f"expected one of {', '.join(GENERAL_NOISE_ITO)}"
            )
        check_field(self, "integrator", "dt", minimum=0.0, exclusive_minimum=True)
        if not isinstance(self.adaptive, bool):
            raise ConfigError(f"integrator.adaptive: got {self.adaptive!r}; expected true or false")
        check_field(self, "integrator", "rtol", minimum=0.0, exclusive_minimum=True)
        check_field(self, "integrator", "atol", minimum=0.0, exclusive_minimum=True)
        check_field(self, "integrator", "dt_min", minimum=0.0, exclusive_minimum=True)

    def check_grid(self, grid: SaveGrid) -> None:
        check_fixed_step("integrator.dt", None if self.adaptive else self.dt, grid, "a longer step would be cut to the interval")

    def solve(self, term: Noise, grid: SaveGrid, seed: int, start: dict[str, Any] | None = None) -> Iterator[SavePoint]:
        """Its checkpoint at save index i is ``{"index": i, "step": k, "nfe", "y"}``: the
        increments are a pure function of (seed, path, step), or of (seed, interval) with
        ``adaptive=True``, whose step size starts again from `dt` in every interval."""
        sde = _NoiseSDE(term)
        size, paths = term.noise_size, term.paths
        increments = _StepIncrements(seed, paths, size, term.y0.dtype, term.y0.device)
        solver = TORCHSDE.solver(sde, increments, self.method, self.dt, self.adaptive, self.rtol, self.atol, self.dt_min)
        if start is None:
            y, k, first = term.y0.expand(paths, -1).clone(), 0, 1
            yield SavePoint(grid.times[0], 0, 0, y, checkpoint={"index": 0, "step": 0, "nfe": 0, "y": y})
        else:
            y, k, first, sde.nfe = start["y"], start["step"], start["index"] + 1, start["nfe"]
        for interval in range(first - 1, len(grid.times) - 1):
            t0, t1 = grid.times[interval], grid.times[interval + 1]
            if self.adaptive:
                entropy = _interval_seed(seed, interval)
                bm = BrownianInterval(t0, t1, size=(paths, size), dtype=y.dtype, device=y.device, entropy=entropy)
                with warnings.catch_warnings():  # the class docstring says it once
                    warnings.simplefilter("ignore", UserWarning)
                    y = TORCHSDE.integrate(solver, bm, y, torch.tensor([t0, t1], dtype=y.dtype, device=y.device))
                k = sde.nfe
            else:
                n, h = fixed_steps(t0, t1, self.dt)
                for j in range(n):
                    increments.step = k
                    y = TORCHSDE.step(solver, t0 + j * h, t1 if j == n - 1 else t0 + (j + 1) * h, y)
                    k += 1
            checkpoint = {"index": interval + 1, "step": k, "nfe": sde.nfe, "y": y}
            yield SavePoint(t1, k, sde.nfe, y, checkpoint=checkpoint)


def _interval_seed(seed: int, interval: int) -> int:
    """BrownianInterval's entropy for save interval `interval` (below 2**63)."""
    return int(np.random.SeedSequence((seed, interval)).generate_state(1, np.uint64)[0] >> np.uint64(1))
