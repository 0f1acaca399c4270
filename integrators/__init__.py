"""HOW the dynamics move: torchdiffeq ODE solvers, scipy.integrate, an exponential integrator
for stiff flows, and the discrete step loop."""

from .base import Integrator, SaveGrid, SavePoint
from .discrete import Discrete
from .exponential import Exponential
from .ode import ODE
from .scipy import SciPy

#: the integrators a config may name
INTEGRATORS = {"ODE": ODE, "Discrete": Discrete, "SciPy": SciPy, "Exponential": Exponential}

__all__ = ["Integrator", "SaveGrid", "SavePoint", "Discrete", "ODE", "SciPy", "Exponential", "INTEGRATORS"]
