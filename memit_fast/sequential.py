"""Sequential editing pieces (docs/sequential.md): AlphaEdit's null-space projection, the keys of
earlier edit batches accumulated per layer, and the projected update solve.

AlphaEdit's update of layer l for keys K (d_ff, n) and residuals R (d_model, n):

    Delta = R K^T P (K_p K_p^T P + K K^T P + l2 I)^-1

P = U U^T projects onto the eigenvectors of the preserved-key statistics C^l (the MEMIT
statistics) with eigenvalues below `nullspace_threshold`; U (d_ff, r) is orthonormal. For
l2 > 0 every solution X of (P M + l2 I) X = P K R^T (M = K_p K_p^T + K K^T) lies in range(P), so
X = U Y with

    (U^T K_p K_p^T U + l2 I_r + (U^T K)(U^T K)^T) Y = (U^T K) R^T

a symmetric positive definite r x r system: the MEMIT solve (docs/algorithm.md section 5) with
lam = 1, covariance U^T K_p K_p^T U + l2 I_r and keys U^T K. `projected_factors` runs it
through memit_fast.solve and returns Delta as R (U A)^T.

The basis U is computed once per layer with torch.linalg.eigh on the statistics' device and
cached as safetensors beside the statistics, keyed by the model fingerprint, the layer's module,
the checksum of the statistics (which stands for corpus, samples, length and dtype) and the
threshold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from .cache import tensor_checksum
from .errors import HyperParamsError, SolveError
from .native import check_finite
from .solve import solve_update_keys

log = logging.getLogger(__name__)

METHODS = ("memit", "alphaedit")
DEFAULT_NULLSPACE_THRESHOLD = 2e-2  # AlphaEdit's nullspace_threshold: eigenvalues of C^l below it span the null space
DEFAULT_L2 = 10.0  # AlphaEdit's L2: the ridge term l2 I of the projected solve
PROJECTION_FORMAT = "1"


def check_method(method: str, nullspace_threshold: float, l2: float) -> None:
    """Raise HyperParamsError for an unknown method or a threshold / l2 that is not a positive finite number."""
    if method not in METHODS:
        raise HyperParamsError(f"method must be one of {METHODS}, got {method!r}")
    for name, value in (("nullspace_threshold", nullspace_threshold), ("l2", l2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < float(value) < float("inf")):
            raise HyperParamsError(f"{name} must be a positive finite number, got {value!r}")


def null_space_basis(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """U (d, r) float64, orthonormal: the eigenvectors of the symmetric cov (d, d) whose eigenvalues
    are below `threshold`, by torch.linalg.eigh in float64 on cov's device. r may be 0."""
    values, vectors = torch.linalg.eigh(cov.to(torch.float64))
    return vectors[:, values < threshold].contiguous()


def projection_path(cache_dir: Path, model_fp: str, module: str, cov: torch.Tensor, threshold: float) -> tuple[Path, dict[str, str]]:
    """(file, metadata key) of one layer's cached basis."""
    key = {"model": model_fp, "module": module, "stats_checksum": tensor_checksum(cov.detach().cpu().contiguous()),
           "stats_dtype": str(cov.dtype).removeprefix("torch."), "threshold": repr(float(threshold)), "format": PROJECTION_FORMAT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "projections" / model_fp / f"{module}.{digest}.safetensors", key


def cached_null_space(cov: torch.Tensor, threshold: float, *, model_fp: str, module: str, cache_dir: Path | None) -> torch.Tensor:
    """U (d_ff, r) float64 on cov's device: read from the cache when a file with the same key is
    there, else computed (`null_space_basis`) and written (atomically; an unwritable cache is
    logged and the basis kept in memory). Raises SolveError when r = 0 (nothing left to edit)."""
    from safetensors import safe_open

    path, key = projection_path(cache_dir, model_fp, module, cov, threshold) if cache_dir is not None else (None, None)
    basis = None
    if path is not None and path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                meta, basis = f.metadata() or {}, f.get_tensor("basis")
        except Exception as e:  # noqa: BLE001 - a bad file is recomputed
            log.warning("projection file %s cannot be read (%s): computing it again", path, e)
        if basis is not None and (any(meta.get(k) != v for k, v in key.items()) or meta.get("checksum") != tensor_checksum(basis)):
            log.warning("projection file %s does not match its key or checksum: computing it again", path)
            basis = None
        if basis is not None:
            log.info("null-space basis of %s read from %s (rank %d of %d)", module, path, basis.shape[1], basis.shape[0])
            basis = basis.to(cov.device)
    if basis is None:
        basis = null_space_basis(cov, threshold)
        log.info("null-space basis of %s: rank %d of %d at threshold %g", module, basis.shape[1], basis.shape[0], threshold)
        if path is not None:
            _write_basis(path, key, basis)
    if basis.shape[1] == 0:
        raise SolveError(
            f"{module}: no eigenvalue of the statistics is below nullspace_threshold={threshold:g} (smallest "
            f"{float(torch.linalg.eigvalsh(cov.double()).min()):.3g}): the null space is empty and AlphaEdit cannot edit; raise the threshold"
        )
    return basis


def _write_basis(path: Path, key: dict[str, str], basis: torch.Tensor) -> None:
    """Write one basis atomically with its key and checksum; an unwritable cache is logged."""
    from safetensors.torch import save_file

    cpu = basis.cpu().contiguous()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"basis": cpu}, tmp, metadata=key | {"checksum": tensor_checksum(cpu)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        log.warning("projection cache %s cannot be written (%s): kept in memory", path.parent, e)


class KeyAccumulator:
    """The keys of earlier edit batches at one layer: kk = K_p K_p^T (d_ff, d_ff) and its projection
    proj = U^T K_p K_p^T U (r, r), float64 on U's device, summed batch by batch in order (so
    replaying the same batches gives the same bits)."""

    def __init__(self, basis: torch.Tensor):
        self.basis = basis
        d, r = basis.shape
        self.kk = torch.zeros(d, d, dtype=torch.float64, device=basis.device)
        self.proj = torch.zeros(r, r, dtype=torch.float64, device=basis.device)

    def add(self, keys: torch.Tensor) -> None:
        """keys (n, d_ff), any float dtype: K_p K_p^T += K K^T (and its projection)."""
        k = keys.to(self.basis.device, torch.float64)
        ku = k @ self.basis
        self.kk.addmm_(k.mT, k)
        self.proj.addmm_(ku.mT, ku)


def projected_factors(basis: torch.Tensor, acc_proj: torch.Tensor, keys: torch.Tensor, residual: torch.Tensor, l2: float, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's Delta (d_model, d_ff) = R (U A)^T as its factors (R^T (d_model, n), U A (d_ff, n)), float64.

    basis U (d_ff, r); acc_proj U^T K_p K_p^T U (r, r); keys (n, d_ff); residual (n, d_model);
    A = (acc_proj + l2 I + Ku Ku^T)^-1 Ku with Ku = U^T K^T (r, n), by memit_fast.solve (`method`)."""
    dev = basis.device
    ku = (keys.to(dev, torch.float64) @ basis).mT  # (r, n)
    cov = acc_proj.clone()
    cov.diagonal().add_(l2)
    a = solve_update_keys(cov, ku, 1.0, method=method)  # (r, n)
    return residual.mT.contiguous().to(dev, torch.float64), check_finite((basis @ a).contiguous(), "U A")


def factors_delta(r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Delta (d_model, d_ff) = r (d_model, n) @ a (d_ff, n)^T, the one product every write and replay uses."""
    return check_finite(r @ a.mT, "R A^T")

