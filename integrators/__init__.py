"""HOW the dynamics move: torchdiffeq ODE solvers and a fused Runge–Kutta loop, Adams–Bashforth,
scipy.integrate, an exponential integrator for stiff flows, Gauss–Legendre collocation (every
quadratic law kept at any step), the discrete step loop, and the SGD-noise SDE (torchsde, and a
fused Euler–Maruyama)."""

from .adams import AdamsBashforth
from .base import Integrator, SaveGrid, SavePoint
from .discrete import Discrete
from .exponential import Exponential
from .fused import FusedEulerMaruyama
from .gauss_legendre import GaussLegendre
from .ode import ODE
from .rk import RK
from .scipy import SciPy
from .sde import SDE

#: the integrators a config may name
INTEGRATORS = {
    "ODE": ODE,
    "RK": RK,
    "AdamsBashforth": AdamsBashforth,
    "SciPy": SciPy,
    "Exponential": Exponential,
    "GaussLegendre": GaussLegendre,
    "Discrete": Discrete,
    "SDE": SDE,
    "FusedEulerMaruyama": FusedEulerMaruyama,
}

__all__ = ["Integrator", "SaveGrid", "SavePoint", "INTEGRATORS", *INTEGRATORS]
