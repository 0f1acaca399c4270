"""Save points → xarray.Dataset: the observers (observers.py), the schema (schema.py) and the
recorder that streams rows to the store (recorder.py; the stores themselves: flowsim.store)."""

from ..store import open_record
from .observers import sharpness, sharpness_tolerance
from .recorder import Recorder
from .schema import OBSERVABLES, STATS, VARIABLES, check_observe, json_attr, sharpness_k

__all__ = [
    "Recorder",
    "OBSERVABLES",
    "STATS",
    "VARIABLES",
    "check_observe",
    "json_attr",
    "open_record",
    "sharpness",
    "sharpness_k",
    "sharpness_tolerance",
]
