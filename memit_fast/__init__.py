"""memit_fast: mass-editing of facts in transformer language models (MEMIT), fast on GPUs.

    model, orig = memit_fast.apply(model, tok, requests, hparams)
    memit_fast.restore(model, orig)
"""

from . import presets
from ._version import __version__
from .api import apply, restore
from .config import EditConfig
from .default_model import load_default_model
from .errors import ConfigError, HyperParamsError, MemitError, RequestError, SolveError, StatsError
from .hparams import MEMITHyperParams
from .stats import compute_stats

__all__ = [
    "__version__",
    "apply",
    "restore",
    "compute_stats",
    "load_default_model",
    "presets",
    "EditConfig",
    "MEMITHyperParams",
    "MemitError",
    "RequestError",
    "HyperParamsError",
    "StatsError",
    "SolveError",
    "ConfigError",
]
