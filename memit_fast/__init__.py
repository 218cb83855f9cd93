"""memit_fast: mass-editing of facts in transformer language models (MEMIT), fast on GPUs.

    model, orig = memit_fast.apply(model, tok, requests, hparams)
    memit_fast.restore(model, orig)
"""

__version__ = "0.1.0"

from . import presets  # noqa: E402
from .api import apply, restore  # noqa: E402
from .default_model import load_default_model  # noqa: E402
from .errors import HyperParamsError, MemitError, RequestError, SolveError, StatsError  # noqa: E402
from .hparams import MEMITHyperParams  # noqa: E402
from .stats import compute_stats  # noqa: E402

__all__ = [
    "apply",
    "restore",
    "compute_stats",
    "load_default_model",
    "presets",
    "MEMITHyperParams",
    "MemitError",
    "RequestError",
    "HyperParamsError",
    "StatsError",
    "SolveError",
]
