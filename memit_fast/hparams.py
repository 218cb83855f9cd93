"""MEMIT hyper-parameters, in the original code's JSON format (`hparams/MEMIT/*.json`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import HyperParamsError

FACT_TOKENS = ("subject_last", "subject_first", "last")


@dataclass
class MEMITHyperParams:
    """The original `MEMITHyperParams` fields, same names and meanings.

    layers: critical layers R (MLP output projections that get edited), ascending.
    v_*: target-vector optimisation at layer L = max(layers) (MEMIT.md section 2).
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
        self.layers = [int(layer) for layer in self.layers]
        if not self.layers:
            raise HyperParamsError("hparams.layers is empty")
        if sorted(set(self.layers)) != self.layers:
            raise HyperParamsError(f"hparams.layers must be ascending and distinct, got {self.layers}")
        if self.fact_token not in FACT_TOKENS:
            raise HyperParamsError(f"fact_token {self.fact_token!r} is not one of {FACT_TOKENS}")
        if self.mom2_dtype not in ("float32", "float64"):
            raise HyperParamsError(f"mom2_dtype must be 'float32' or 'float64', got {self.mom2_dtype!r}")
        for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
            if "{}" not in getattr(self, name):
                raise HyperParamsError(f"{name} must contain '{{}}' for the layer index")
        if self.v_num_grad_steps < 1 or self.mom2_n_samples < 1 or self.mom2_update_weight < 0:
            raise HyperParamsError("v_num_grad_steps and mom2_n_samples must be >= 1, mom2_update_weight >= 0")

    @classmethod
    def from_dict(cls, data: dict) -> "MEMITHyperParams":
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
            return cls.from_dict(json.load(f))

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
