"""Edits as portable artifacts: the weight changes of an edit, stored as exact low-rank factors.

MEMIT's update of a critical layer is Delta W = R A^T (section 5), (d_model, d_ff), of rank at
most n for n requests. `build_edits` factors each edited layer's dense float64 delta with a thin
SVD truncated at its numerical rank r: the singular values above the rounding of the weights'
dtype, eps * rms(W) * (sqrt(d_model) + sqrt(d_ff)), a few times the top singular value of the
noise that rounding the edited weight (|error| <= eps |W_ij| / 2 per entry) adds to the
difference of two weights. B = U sqrt(S) (d_model, r) and
A = sqrt(S) V^T (r, d_ff) give B @ A = Delta W to that rounding.

Saved folder, format "memit_fast":
    edits.json         base model (fingerprint, name, type), memit_fast version, hparams, requests,
                       and for each edited parameter its form and tensor names
    edits.safetensors  "<param>.B" and "<param>.A" (form "low_rank"), or "<param>.delta" (form
                       "dense": where r (d_model + d_ff) >= d_model d_ff, factors save no space)
Format "peft": a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) on the MLP
output projections of the edited layers, r = the rank, lora_alpha = r so the scaling is 1
(rank_pattern / alpha_pattern where layers differ), fan_in_fan_out for GPT-2's Conv1D; beside
it the same edits.json, so `load_edits` / `apply_edits` read it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .edit_requests import normalize_requests
from .errors import ArtifactError
from .hparams import MEMITHyperParams
from .model_access import RewriteWeight, rewrite_weights
from .cache import model_fingerprint

FORMATS = ("memit_fast", "peft")
META_FILE = "edits.json"
FORMAT_NAME = "memit_fast-edits"
FORMAT_VERSION = 1
_TENSOR_FILES = {"memit_fast": "edits.safetensors", "peft": "adapter_model.safetensors"}


@dataclass
class LayerEdit:
    """The change of one edited weight, as factors B (d_model, r), A (r, d_ff) or a dense (d_model, d_ff)."""

    name: str  # parameter name, e.g. "model.layers.4.mlp.down_proj.weight"
    layer: int
    conv1d: bool  # stored (d_ff, d_model) in the model, as GPT-2's Conv1D
    shape: tuple[int, int]  # (d_model, d_ff)
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def rank(self) -> int | None:
        """r of the factors; None for a layer held dense."""
        return None if self.B is None else self.B.shape[1]

    def delta(self) -> torch.Tensor:
        """Delta W (d_model, d_ff), float64."""
        return self.dense.double() if self.B is None else self.B.double() @ self.A.double()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A); a layer held dense is factored at the numerical rank of its stored dtype."""
        if self.B is not None:
            return self.B, self.A
        s_max = torch.linalg.matrix_norm(self.dense.double(), ord=2)
        return low_rank_factors(self.dense, float(torch.finfo(self.dense.dtype).eps * s_max * max(self.shape)))


@dataclass
class Edits:
    """Edited layers with what they came from: base model, hparams, requests."""

    layers: list[LayerEdit]
    hparams: MEMITHyperParams
    requests: list[dict] | None
    base_model: dict  # fingerprint, name_or_path, model_type
    dtype: torch.dtype  # of the stored tensors
    memit_fast_version: str = __version__

    def save(self, directory: str | Path, format: str = "memit_fast") -> Path:
        """Write the folder (see the module docstring); returns it."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, entries = {}, {}
        for e in self.layers:
            m, k = e.shape
            entry = {"layer": e.layer, "conv1d": e.conv1d, "shape": [m, k]}
            if format == "peft":
                B, A = e.factors()
                prefix = f"base_model.model.{e.module}"
                entry |= {"form": "low_rank", "rank": B.shape[1], "B": f"{prefix}.lora_B.weight", "A": f"{prefix}.lora_A.weight"}
            elif e.rank is not None and e.rank * (m + k) < m * k:
                B, A = e.B, e.A
                entry |= {"form": "low_rank", "rank": e.rank, "B": f"{e.name}.B", "A": f"{e.name}.A"}
            else:
                entry |= {"form": "dense", "delta": f"{e.name}.delta"}
                tensors[entry["delta"]] = e.delta().to(self.dtype)
            if entry["form"] == "low_rank" and entry["rank"] > 0:  # rank 0: nothing stored
                tensors[entry["B"]], tensors[entry["A"]] = B.to(self.dtype), A.to(self.dtype)
            entries[e.name] = entry
        tensor_file = directory / _TENSOR_FILES[format]
        if format == "peft":
            _write_json(directory / "adapter_config.json", self._peft_config(entries))
        _save_safetensors(tensor_file, tensors)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "memit_fast": self.memit_fast_version,
            "form": format,
            "tensors": tensor_file.name,
            "tensors_sha256": file_sha256(tensor_file),
            "dtype": str(self.dtype).removeprefix("torch."),
            "base_model": self.base_model,
            "hparams": self.hparams.to_dict(),
            "requests": self.requests,
            "layers": entries,
        }
        _write_json(directory / META_FILE, meta)
        return directory

    def _peft_config(self, entries: dict) -> dict:
        ranked = {name[: -len(".weight")]: e["rank"] for name, e in entries.items() if e["rank"] > 0}
        if not ranked:
            raise ArtifactError("the edit changes no weight: there is no adapter to write")
        r = max(ranked.values())
        pattern = {re.escape(module): rank for module, rank in ranked.items() if rank != r}
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model.get("name_or_path") or None,
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranked),
            "fan_in_fan_out": any(e["conv1d"] for e in entries.values()),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }


def low_rank_factors(delta: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (m, r), A (r, k)) float64 with B @ A = delta (m, k) less its singular values <= tol."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = int((S > tol).sum())
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def build_edits(
    model,
    orig_weights: dict[str, torch.Tensor] | None = None,
    *,
    deltas: dict[str, torch.Tensor] | None = None,
    hparams: MEMITHyperParams | None = None,
    requests=None,
    dtype: torch.dtype | None = None,
) -> Edits:
    """The edits of `model` as factors, from exactly one of:
    orig_weights: {parameter name: original tensor}, as `apply(..., return_orig_weights=True)`
        returns it; the delta is the model's weight now minus the original, in float64;
    deltas: {parameter name: Delta W (d_model, d_ff)}.
    hparams: those of the edit (default the model's preset): they name the edited modules and key
    the base-model fingerprint. requests: the original request dicts, recorded. dtype: of the stored
    tensors (default float32, float64 for a float64 model).
    """
    from .presets import for_model

    if (orig_weights is None) == (deltas is None):
        raise ValueError("give exactly one of orig_weights (from apply(..., return_orig_weights=True)) and deltas")
    hparams = hparams or for_model(model)
    source = orig_weights if orig_weights is not None else deltas
    weights = _weights_by_name(model, hparams, list(source))
    model_dtype = next(model.parameters()).dtype
    dtype = dtype or (torch.float64 if model_dtype == torch.float64 else torch.float32)
    layers = []
    for name, value in source.items():
        w = weights[name]
        p = w.param.detach()
        if orig_weights is not None:
            if tuple(value.shape) != tuple(p.shape):
                raise ArtifactError(f"orig_weights[{name!r}] has shape {tuple(value.shape)}, the model's weight {tuple(p.shape)}")
            delta = p.double() - value.to(p.device, torch.float64)
            delta = delta.T if w.conv1d else delta
        else:
            if tuple(value.shape) != (w.d_model, w.d_ff):
                raise ArtifactError(f"deltas[{name!r}] has shape {tuple(value.shape)}, expected (d_model, d_ff) = {(w.d_model, w.d_ff)}")
            delta = value.to(p.device, torch.float64)
        s_max = float(torch.linalg.matrix_norm(delta, ord=2))
        noise = torch.finfo(p.dtype).eps * float(p.double().pow(2).mean().sqrt()) * (w.d_model**0.5 + w.d_ff**0.5)
        B, A = low_rank_factors(delta, max(noise, torch.finfo(torch.float64).eps * s_max * max(delta.shape)))
        layers.append(LayerEdit(name, w.layer, w.conv1d, (w.d_model, w.d_ff), B.cpu(), A.cpu()))
    layers.sort(key=lambda e: e.layer)
    recorded = None if requests is None else [{"prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target}} for r in normalize_requests(requests)]
    return Edits(layers, hparams, recorded, _base_model(model, hparams), dtype)


def save_edits(directory: str | Path, model, orig_weights=None, *, deltas=None, hparams=None, requests=None, format: str = "memit_fast", dtype=None) -> Edits:
    """`build_edits(model, orig_weights, ...)` written to `directory` in `format` ("memit_fast" or "peft"); returns the Edits."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    edits = build_edits(model, orig_weights, deltas=deltas, hparams=hparams, requests=requests, dtype=dtype)
    edits.save(directory, format)
    return edits


def export_peft(directory: str | Path, model, orig_weights=None, **kwargs) -> Edits:
    """`save_edits(..., format="peft")`: a PEFT LoRA adapter folder that `peft.PeftModel.from_pretrained` loads."""
    return save_edits(directory, model, orig_weights, format="peft", **kwargs)


def load_edits(directory: str | Path) -> Edits:
    """Read a folder written by `save_edits` (either format); checks its tensors against the metadata."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{directory} is not a saved edit: {META_FILE} not found")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{meta_path} is not a memit_fast edit (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{directory} has format version {meta['format_version']}; this memit_fast ({__version__}) reads up to {FORMAT_VERSION}")
    tensor_file = directory / meta["tensors"]
    if not tensor_file.is_file():
        raise ArtifactError(f"{tensor_file} not found")
    if file_sha256(tensor_file) != meta["tensors_sha256"]:
        raise ArtifactError(f"{tensor_file} does not match its checksum in {META_FILE}: the file was changed or truncated")
    tensors = load_file(str(tensor_file))
    dtype = getattr(torch, meta["dtype"])
    layers = []
    for name, entry in meta["layers"].items():
        m, k = entry["shape"]
        if entry["form"] == "dense":
            layer = LayerEdit(name, entry["layer"], entry["conv1d"], (m, k), dense=_tensor(tensors, entry["delta"], (m, k), tensor_file))
        elif entry["rank"] == 0:
            layer = LayerEdit(name, entry["layer"], entry["conv1d"], (m, k), torch.zeros(m, 0, dtype=dtype), torch.zeros(0, k, dtype=dtype))
        else:
            r = entry["rank"]
            layer = LayerEdit(name, entry["layer"], entry["conv1d"], (m, k), _tensor(tensors, entry["B"], (m, r), tensor_file), _tensor(tensors, entry["A"], (r, k), tensor_file))
        layers.append(layer)
    return Edits(layers, MEMITHyperParams.from_dict(meta["hparams"]), meta["requests"], meta["base_model"], dtype, meta["memit_fast"])


def apply_edits(model, source: str | Path | Edits) -> dict[str, torch.Tensor]:
    """Add saved edits (a folder or an Edits) to `model`'s weights, in place; returns
    {parameter name: CPU copy of the original tensor}, for `memit_fast.restore`.
    Refuses (ArtifactError) a model whose fingerprint differs from the edit's base model; on any
    error the weights are left as they were."""
    from .api import restore
    from .update import write_layer

    edits = source if isinstance(source, Edits) else load_edits(source)
    fingerprint = model_fingerprint(model, edits.hparams)
    if fingerprint != edits.base_model["fingerprint"]:
        raise ArtifactError(
            f"these edits were made on another base model: fingerprint {edits.base_model['fingerprint']} "
            f"({edits.base_model.get('name_or_path') or 'unnamed'}), this model's is {fingerprint}"
        )
    weights = _weights_by_name(model, edits.hparams, [e.name for e in edits.layers])
    for e in edits.layers:
        w = weights[e.name]
        if (w.d_model, w.d_ff) != e.shape:
            raise ArtifactError(f"{e.name} is {(w.d_model, w.d_ff)} (d_model, d_ff) in this model, {e.shape} in the edit")
    backup = {e.name: weights[e.name].param.detach().clone() for e in edits.layers}
    try:
        for e in edits.layers:
            write_layer(weights[e.name], e.delta().to(weights[e.name].param.device))
    except BaseException:
        restore(model, backup)
        raise
    return {name: t.cpu() for name, t in backup.items()}


def _weights_by_name(model, hparams: MEMITHyperParams, names: list[str]) -> dict[str, RewriteWeight]:
    """The RewriteWeight of each parameter name, which must be hparams.rewrite_module_tmp's `.weight`."""
    pattern = re.compile(re.escape(hparams.rewrite_module_tmp).replace(r"\{\}", r"(\d+)") + r"\.weight")
    layers = {}
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            raise ArtifactError(f"{name!r} is not the weight of an MLP output projection {hparams.rewrite_module_tmp!r}")
        layers[name] = int(match[1])
    weights = rewrite_weights(model, hparams.replace(layers=sorted(set(layers.values()))))
    return {w.name: w for w in weights}


def _base_model(model, hparams: MEMITHyperParams) -> dict:
    return {
        "fingerprint": model_fingerprint(model, hparams),
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
        "model_type": getattr(model.config, "model_type", None),
    }


def _tensor(tensors: dict, key: str, shape: tuple[int, int], where: Path) -> torch.Tensor:
    if key not in tensors:
        raise ArtifactError(f"{where} lacks tensor {key!r}")
    if tuple(tensors[key].shape) != tuple(shape):
        raise ArtifactError(f"{where}: {key} is {tuple(tensors[key].shape)}, expected {tuple(shape)}")
    return tensors[key]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_safetensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    _atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"}))


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))
