"""HOW the dynamics move: torchdiffeq ODE solvers, scipy.integrate, an exponential integrator
for stiff flows, the discrete step loop, and the SGD-noise SDE (torchsde, and a fused
Euler–Maruyama)."""

from .base import Integrator, SaveGrid, SavePoint
from .discrete import Discrete
from .exponential import Exponential
from .ode import ODE
from .fused import FusedEulerMaruyama
from .scipy import SciPy
from .sde import SDE

#: the integrators a config may name
INTEGRATORS = {"ODE": ODE, "Discrete": Discrete}
INTEGRATORS.update(SDE=SDE, FusedEulerMaruyama=FusedEulerMaruyama)
INTEGRATORS.update(SciPy=SciPy, Exponential=Exponential)

__all__ = ["Integrator", "SaveGrid", "SavePoint", "Discrete", "ODE", "INTEGRATORS"]
__all__ += ["SDE", "FusedEulerMaruyama"]
__all__ += ["SciPy", "Exponential"]
