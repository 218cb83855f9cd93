"""memit_fast: mass-editing of facts in transformer language models (MEMIT), fast on GPUs.

    model, orig = memit_fast.apply(model, tok, requests, hparams)
    memit_fast.restore(model, orig)
"""

from . import presets
from ._version import __version__
from .api import apply, restore
from .artifacts import apply_edits, export_peft, load_edits, save_edits
from .config import EditConfig
from .default_model import load_default_model
from .editor import Editor
from .easyedit import requests_from_easyedit
from .errors import ArtifactError, ConfigError, HyperParamsError, MemitError, RequestError, SolveError, StatsError, TargetError
from .hparams import MEMITHyperParams
from .stats import compute_stats
from .stats_npz import export_npz, import_npz

__all__ = [
    "__version__",
    "apply",
    "restore",
    "Editor",
    "compute_stats",
    "save_edits",
    "load_edits",
    "apply_edits",
    "export_peft",
    "import_npz",
    "export_npz",
    "requests_from_easyedit",
    "load_default_model",
    "presets",
    "EditConfig",
    "MEMITHyperParams",
    "MemitError",
    "RequestError",
    "HyperParamsError",
    "StatsError",
    "SolveError",
    "TargetError",
    "ConfigError",
    "ArtifactError",
]
