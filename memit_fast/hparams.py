"""MEMIT hyper-parameters, in the original code's JSON format (`hparams/MEMIT/*.json`)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from .errors import HyperParamsError

FACT_TOKENS = ("subject_last", "subject_first", "last")
_STRING_FIELDS = (
    "layer_selection", "fact_token", "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
    "ln_f_module", "lm_head_module", "mom2_dataset", "mom2_dtype",
)


def _int(name: str, value, minimum: int) -> int:
    """An int >= minimum (a bool, a float or a string is refused, not converted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise HyperParamsError(f"hparams.{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise HyperParamsError(f"hparams.{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _float(name: str, value, positive: bool) -> float:
    """A finite float, > 0 if `positive` else >= 0 (ints accepted; bools and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HyperParamsError(f"hparams.{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise HyperParamsError(f"hparams.{name} must be finite, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise HyperParamsError(f"hparams.{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


@dataclass
class MEMITHyperParams:
    """The original `MEMITHyperParams` fields, same names and meanings.

    layers: critical layers R (MLP output projections that get edited), ascending.
    v_*: target-vector optimisation at layer L = max(layers) (docs/algorithm.md section 2).
    mom2_*: covariance statistics C = E[k k^T] (section 4); mom2_update_weight is lambda (section 5).
    *_module_tmp: module paths with `{}` for the layer index.
    """

    layers: list[int]
    layer_selection: str
    fact_token: str
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    mom2_adjustment: bool
    mom2_update_weight: float
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    mom2_dataset: str
    mom2_n_samples: int
    mom2_dtype: str

    def __post_init__(self) -> None:
        """Type and range of every field, checked at creation (constructor, from_dict/from_json,
        replace); raises HyperParamsError naming the field and the value."""
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, (list, tuple)):
            raise HyperParamsError(f"hparams.layers must be a list of layer indices, got {self.layers!r}")
        self.layers = [_int(f"layers[{i}]", v, 0) for i, v in enumerate(self.layers)]
        if not self.layers:
            raise HyperParamsError("hparams.layers is empty")
        if sorted(set(self.layers)) != self.layers:
            raise HyperParamsError(f"hparams.layers must be ascending and distinct, got {self.layers}")
        for name in ("v_num_grad_steps", "mom2_n_samples"):
            setattr(self, name, _int(name, getattr(self, name), 1))
        self.v_loss_layer = _int("v_loss_layer", self.v_loss_layer, 0)
        for name, positive in (("v_lr", True), ("clamp_norm_factor", True), ("v_weight_decay", False), ("kl_factor", False), ("mom2_update_weight", False)):
            setattr(self, name, _float(name, getattr(self, name), positive))
        if not isinstance(self.mom2_adjustment, bool):
            raise HyperParamsError(f"hparams.mom2_adjustment must be true or false (a bool), got {self.mom2_adjustment!r}")
        for name in _STRING_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise HyperParamsError(f"hparams.{name} must be a non-empty string, got {value!r}")
        if self.fact_token not in FACT_TOKENS:
            raise HyperParamsError(f"hparams.fact_token {self.fact_token!r} is not one of {FACT_TOKENS}")
        if self.mom2_dtype not in ("float32", "float64"):
            raise HyperParamsError(f"hparams.mom2_dtype must be 'float32' or 'float64', got {self.mom2_dtype!r}")
        for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
            if getattr(self, name).count("{}") != 1:
                raise HyperParamsError(f"hparams.{name} must contain '{{}}' once, for the layer index, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "MEMITHyperParams":
        if not isinstance(data, dict):
            raise HyperParamsError(f"hyper-parameters must be a JSON object / dict of fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise HyperParamsError(f"unknown hyper-parameter field(s) {unknown}; known fields: {sorted(names)}")
        missing = sorted(names - set(data))
        if missing:
            raise HyperParamsError(f"missing hyper-parameter field(s) {missing}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "MEMITHyperParams":
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise HyperParamsError(f"hyper-parameter file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, path: str | Path | dict) -> "MEMITHyperParams":
        """From an EasyEdit MEMIT/AlphaEdit YAML file (or dict, or the original's JSON); its run
        settings are dropped: memit_fast.easyedit.read_hparams returns them."""
        from .easyedit import read_hparams

        return read_hparams(path)[0]

    from_hparams = from_yaml  # EasyEdit's name; also takes a dict or the original's JSON file

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "MEMITHyperParams":
        return dataclasses.replace(self, **changes)
