"""flowsim: neural-network training as a continuous dynamical system.

Gradient flow, modified flows and true discrete SGD from the same start on the same data,
with the quantities that the network's symmetries conserve recorded in xarray Datasets.
"""

__version__ = "0.1.0"

from . import errors
from .errors import ConfigError, DataError, FlowsimError, IntegrationError, ModelError, RecordError
from . import data, laws, models, integrators  # noqa: E402  (models/integrators need errors first)
from . import theory
from .problem import Problem
from .dynamics import DiscreteSGD, GradientFlow, ModifiedFlow, MomentumFlow, SGDNoise
from .laws import Law
from .simulate import simulate
from .status import Status
from .config import load_config, run_config
from .record import open_record
from .compare import compare
from .sweep import sweep
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
    "ModifiedFlow",
    "MomentumFlow",
    "SGDNoise",
    "Law",
    "simulate",
    "Status",
    "load_config",
    "run_config",
    "open_record",
    "compare",
    "sweep",
]
