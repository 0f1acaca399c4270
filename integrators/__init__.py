"""HOW the dynamics move: torchdiffeq ODE solvers and the discrete step loop."""

from .base import Integrator, SaveGrid, SavePoint
from .discrete import Discrete
from .ode import ODE
from .rk import RK

#: the integrators a config may name
INTEGRATORS = {"ODE": ODE, "Discrete": Discrete, "RK": RK}

__all__ = ["Integrator", "SaveGrid", "SavePoint", "Discrete", "ODE", "RK", "INTEGRATORS"]
