"""flowsim: neural-network training as a continuous dynamical system.

Gradient flow, modified flows and true discrete SGD from the same start on the same data,
with the quantities that the network's symmetries conserve recorded in xarray Datasets.
"""

__version__ = "0.1.0"

from . import errors
from .errors import ConfigError, DataError, FlowsimError, IntegrationError, ModelError, RecordError
from . import data, laws, models, integrators
from . import theory
from .problem import Problem
from .dynamics import CentralFlow, DiscreteAdam, DiscreteSGD, GradientFlow, ModifiedFlow, MomentumFlow, SGDNoise
from .integrators import ODE, RK, SDE, AdamsBashforth, Discrete, Exponential, FusedEulerMaruyama, GaussLegendre, SciPy
from .laws import Law
from .simulation import simulate
from .status import Status
from .config import load_config, run_config
from .record import open_record
from .comparison import compare
from .sweeps import sweep
from . import accessor  # noqa: F401  (registers ds.flowsim)

__all__ = [
    "__version__",
    "errors",
    "ConfigError",
    "DataError",
    "FlowsimError",
    "IntegrationError",
    "ModelError",
    "RecordError",
    "data",
    "laws",
    "theory",
    "models",
    "integrators",
    "Problem",
    "GradientFlow",
    "DiscreteSGD",
    "DiscreteAdam",
    "ModifiedFlow",
    "MomentumFlow",
    "SGDNoise",
    "CentralFlow",
    "RK",
    "AdamsBashforth",
    "ODE",
    "SciPy",
    "Exponential",
    "GaussLegendre",
    "Discrete",
    "SDE",
    "FusedEulerMaruyama",
    "Law",
    "simulate",
    "Status",
    "load_config",
    "run_config",
    "open_record",
    "compare",
    "sweep",
]
