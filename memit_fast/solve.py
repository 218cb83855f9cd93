"""Solves of the multi-layer update (MEMIT.md section 5, step 4): A = (lam*C + K K^T)^{-1} K.

Plain-PyTorch version; the native cuSOLVER path arrives with the GPU kernels.
"""

from __future__ import annotations

import torch

from .errors import NotPositiveDefiniteError, SolveError


def solve_update_keys(cov: torch.Tensor, keys: torch.Tensor, lam: float, *, method: str = "cholesky") -> torch.Tensor:
    """A (d, n) float64 = (lam*cov + K K^T)^{-1} K; cov (d, d), keys K (d, n).

    method "cholesky": Cholesky factor and solve in float64; "dense": torch.linalg.solve in
    float64, the original's solve (the reference).
    """
    c, k = cov.double(), keys.double()
    a = lam * c + k @ k.T
    if method == "dense":
        x = torch.linalg.solve(a, k)
    elif method == "cholesky":
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            raise NotPositiveDefiniteError(f"lam*C + K K^T is not positive definite (leading minor {int(info)} fails)")
        x = torch.cholesky_solve(k, factor)
    else:
        raise ValueError(f"unknown solve method {method!r}")
    if not torch.isfinite(x).all():
        raise SolveError("the update solve produced NaN or inf")
    return x
