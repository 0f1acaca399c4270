"""The SGD-noise SDE on torchsde's solvers, streamed save point by save point.

torchsde integrates Itô SDEs with general (P × m) noise through the product G(θ)·v alone
(``g_prod``), which is how the SGD noise is given: the matrix G is never formed. Among
torchsde's methods only Euler–Maruyama ("euler") takes Itô SDEs with general noise: srk and
Milstein need diagonal, additive or scalar noise, and midpoint, heun, euler_heun, log_ode and
reversible_heun solve Stratonovich SDEs, whose drift correction would need derivatives of G.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchsde import BrownianInterval
from torchsde._brownian.brownian_base import BaseBrownian
from torchsde._core.base_sde import ForwardSDE
from torchsde._core.methods import select
from torchsde.settings import METHODS, NOISE_TYPES, SDE_TYPES

from flowsim.errors import ConfigError, check_field
from flowsim.terms import Noise

from .base import Integrator, SaveGrid, SavePoint, check_fixed_step
from .brownian import brownian_increments, fixed_steps


def _method_class(method: str):
    return select(method, SDE_TYPES.ito)


#: torchsde's methods (the adjoint one is for backpropagation through a solve, not a solve)
_METHODS = tuple(m for m in METHODS.all() if m != METHODS.adjoint_reversible_heun)
#: those that solve Itô SDEs with general noise, the SGD-noise SDE's kind
GENERAL_NOISE_ITO = tuple(
    m for m in _METHODS if _method_class(m).sde_type == SDE_TYPES.ito and NOISE_TYPES.general in _method_class(m).noise_types
)


class _NoiseSDE(torch.nn.Module):
    """torchsde's view of a noise term on a (paths, P) state: drift and G·v, path by path."""

    noise_type = NOISE_TYPES.general
    sde_type = SDE_TYPES.ito

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
            cls = _method_class(self.method)
            why = (
                f"it solves {cls.sde_type} SDEs"
                if cls.sde_type != SDE_TYPES.ito
                else f"it takes only {', '.join(cls.noise_types)} noise"
            )
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
        solver = _method_class(self.method)(
            sde=ForwardSDE(sde),
            bm=increments,
            dt=self.dt,
            adaptive=self.adaptive,
            rtol=self.rtol,
            atol=self.atol,
            dt_min=self.dt_min,
            options={},
        )
        if start is None:
            y, k, first = term.y0.expand(paths, -1).clone(), 0, 1
            yield SavePoint(grid.times[0], 0, 0, y, checkpoint={"index": 0, "step": 0, "nfe": 0, "y": y})
        else:
            y, k, first, sde.nfe = start["y"], start["step"], start["index"] + 1, start["nfe"]
        for interval in range(first - 1, len(grid.times) - 1):
            t0, t1 = grid.times[interval], grid.times[interval + 1]
            if self.adaptive:
                solver.bm = BrownianInterval(
                    t0, t1, size=(paths, size), dtype=y.dtype, device=y.device, entropy=_interval_seed(seed, interval)
                )
                with warnings.catch_warnings():  # the class docstring says it once
                    warnings.simplefilter("ignore", UserWarning)
                    ts = torch.tensor([t0, t1], dtype=y.dtype, device=y.device)
                    y = solver.integrate(y, ts, ())[0][-1]
                k = sde.nfe
            else:
                n, h = fixed_steps(t0, t1, self.dt)
                for j in range(n):
                    increments.step = k
                    y, _ = solver.step(t0 + j * h, t1 if j == n - 1 else t0 + (j + 1) * h, y, ())
                    k += 1
            checkpoint = {"index": interval + 1, "step": k, "nfe": sde.nfe, "y": y}
            yield SavePoint(t1, k, sde.nfe, y, checkpoint=checkpoint)


def _interval_seed(seed: int, interval: int) -> int:
    """BrownianInterval's entropy for save interval `interval` (below 2**63)."""
    return int(np.random.SeedSequence((seed, interval)).generate_state(1, np.uint64)[0] >> np.uint64(1))
