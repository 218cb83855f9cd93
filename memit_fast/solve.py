"""The update solve of MEMIT (docs/algorithm.md section 5; paper Eq. 14):

    A = (lam C + K K^T)^-1 K        C: (d, d) key second moment, K: (d, n) keys, A: (d, n)

so that Delta W = R A^T; `solve_delta_weights` returns Delta W itself, solving for the m = d_model
columns of K R^T when m < n (fewer right-hand sides). Methods:

- "cholesky": G = lam C + K K^T (one symmetric rank-n update), G = L L^T, A = L^-T L^-1 K.
  d^3/3 + 3 d^2 n flops. On CUDA (memit_fast._native): cuBLAS syrk, potrf (for d >
  potrf_block a recursion whose flops run in big cuBLAS trsm/syrk calls, cuSOLVER on the
  diagonal blocks), potrs (for d > potrs_block a trsm per diagonal block and GEMM updates
  between them, else cuSOLVER); elsewhere the same steps in torch (the op's twin).
- "mixed" (CUDA with the native module; elsewhere it is "cholesky"): cholesky with K K^T and
  K R^T formed in one fp16 tensor-core product at float32 accuracy (kernels/gram.py, "fp16x3":
  3 n (d + m)^2 flops at ~12x the fp64 rate), then G = lam C + K K^T, its factor and the solve
  in `dtype` (float64): fp64 work d^3/3 + 2 d^2 m. float64 keys keep fp64 products.
- "woodbury": with lam C = L L^T factored once per layer (`factor_scaled_cov`, cache it next
  to the statistics): Y = L^-1 K, M = I + Y^T Y, A = L^-T Y M^-1
  (= (lam C)^-1 K (I + K^T (lam C)^-1 K)^-1, docs/algorithm.md section 6).
  2 d^2 n + 3 d n^2 + n^3/3 flops per edit batch, plus d^3/3 if the factor is not given.
- "dense": torch.linalg.solve(lam C + K K^T, K) in float64 (LU), what the original does; the
  reference twin. It does not test definiteness, and it always computes and returns float64
  (`dtype` is ignored).
- "auto": the float64-accurate method with the fewest flops by `solve_flops` (woodbury
  without a factor counts its d^3/3 too): woodbury or cholesky; if woodbury was picked without
  a factor and lam C is not positive definite, cholesky. For A (fp64), woodbury wins for
  n < ~0.5 d with a cached factor and for n < ~0.3 d without one. "mixed" is opt-in only: its
  float32-level products lose accuracy on ill-conditioned statistics.

Precision: float64 by default and always on CPU. float32 (`dtype=torch.float32`, CUDA only)
has a relative error of about cond(G) * 1.6e-9 (measured on synthetic spectra; cond(lam C) for
woodbury). mixed: about cond(G) * 1e-10 (float32 rounding of K K^T, amplified by G's
condition; at least ~1e-6, the float32 rounding of K R^T), below what the float32 sums of the
statistics themselves already carry (cond(G) * 3e-10 to 5e-10 for fp32 sums over 2048 tokens;
memit_fast folds to float64 every 2^18 tokens, the original never). benchmarks/solve_accuracy.py
(CPU emulation) and benchmarks/kernels_device.py (device, GPT-J sizes, condition ~20 and a
spectrum over 4 decades) measure it against float64.

The ops (memit_fast/ops.py) choose the device; potrf_block / potrs_block (the native blocked
factor and solve; <= 0: one cuSOLVER call) are passed through.

Errors: a matrix that is not positive definite raises NotPositiveDefiniteError (cholesky,
mixed and woodbury check cuSOLVER's / torch's `info`); NaN or inf in the result raises SolveError.
"""

from __future__ import annotations

import logging

import torch

from .errors import NotPositiveDefiniteError, SolveError
from .native import check_finite
from .ops import POTRF_BLOCK, POTRS_BLOCK

log = logging.getLogger(__name__)

METHODS = ("auto", "cholesky", "woodbury", "dense", "mixed")
TC_FLOP_WEIGHT = 1 / 12  # an fp16 tensor-core flop in fp64 flops (H100: ~750 vs ~62 TFLOP/s)


def solve_flops(d: int, n: int, method: str, *, factored: bool = False, m: int | None = None) -> float:
    """Floating-point operations of one solve (multiply-add = 2), as "auto" counts them; with m,
    of Delta W for m = d_model right-hand sides (solve_delta_weights, m < n). For "mixed", fp64
    flops plus its fp16 tensor-core flops 3 n (d + m)^2 weighted by TC_FLOP_WEIGHT."""
    if method == "dense":
        return 2 * d**3 / 3 + 4 * d * d * n + (2 * d * n * m if m else 0)
    if method == "cholesky":
        return d**3 / 3 + (3 * d * d * n if m is None else d * d * n + 2 * d * n * m + 2 * d * d * m)
    if method == "mixed":
        p = d + (m or 0)
        return d**3 / 3 + 2 * d * d * (m or n) + TC_FLOP_WEIGHT * 3 * n * p * p
    if method == "woodbury":
        rest = 2 * d * d * n + 3 * d * n * n if m is None else d * d * n + d * n * n + 2 * n * n * m + 2 * d * n * m + d * d * m
        return rest + n**3 / 3 + (0 if factored else d**3 / 3)
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def factor_scaled_cov(cov: torch.Tensor, lam: float, *, dtype: torch.dtype | None = None,
                      potrf_block: int = POTRF_BLOCK) -> torch.Tensor:
    """Lower Cholesky factor L of lam * cov: lam C = L L^T.

    cov: (d, d) or (b, d, d) symmetric, float32 or float64 (only its lower triangle is read).
    Returns L of the same shape in `dtype` (default float64; float64 always on CPU), upper
    triangle zero. A batch of layers is factored with one synchronisation. Raises
    NotPositiveDefiniteError naming the first failing matrix.
    """
    _check_square(cov, "cov")
    return torch.ops.memit_fast.factor_scaled_cov(cov, float(lam), _compute_dtype(cov, dtype), potrf_block)


def solve_update_keys(
    cov: torch.Tensor,
    keys: torch.Tensor,
    lam: float,
    *,
    method: str = "auto",
    factor: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    potrf_block: int = POTRF_BLOCK,
    potrs_block: int = POTRS_BLOCK,
) -> torch.Tensor:
    """A = (lam cov + K K^T)^-1 K.

    cov: (d, d) symmetric positive (semi)definite, float32/float64; keys K: (d, n), any float
    dtype, same device; factor: optional (d, d) lower factor of lam*cov from factor_scaled_cov
    with the same lam (checked on its first column). Returns A (d, n), contiguous, in `dtype`
    (float64 by default, always float64 on CPU and for method="dense"; float32 allowed on CUDA).
    potrf_block / potrs_block: the native factor's and solve's diagonal blocks (module docstring).
    """
    return _solve(cov, keys, None, lam, method, factor, dtype, (potrf_block, potrs_block))


def solve_delta_weights(
    cov: torch.Tensor,
    keys: torch.Tensor,
    resid: torch.Tensor,
    lam: float,
    *,
    method: str = "auto",
    factor: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    potrf_block: int = POTRF_BLOCK,
    potrs_block: int = POTRS_BLOCK,
) -> torch.Tensor:
    """Delta W = R A^T = ((lam cov + K K^T)^-1 K R^T)^T (docs/algorithm.md section 5).

    resid R: (m, n), the residuals of section 5 step 3 (m = d_model), same device. Returns
    Delta W (m, d), contiguous, in the compute dtype (as solve_update_keys); transpose it for
    Conv1D layouts. When m < n the solve runs on the m columns of K R^T instead of the n keys
    (for GPT-J, 4096 instead of 10,000 right-hand sides); otherwise it is R @ A^T.
    Other arguments as solve_update_keys.
    """
    if resid.dim() != 2 or resid.shape[1] != keys.shape[-1] or resid.device != keys.device:
        raise ValueError(f"resid must be (m, {keys.shape[-1]}) on {keys.device}; got {tuple(resid.shape)} on {resid.device}")
    if resid.shape[0] >= keys.shape[1]:
        a = _solve(cov, keys, None, lam, method, factor, dtype, (potrf_block, potrs_block))
        return check_finite(resid.to(a.dtype) @ a.mT, "R A^T")
    return _solve(cov, keys, resid, lam, method, factor, dtype, (potrf_block, potrs_block))


def solve_update_keys_reference(cov: torch.Tensor, keys: torch.Tensor, lam: float) -> torch.Tensor:
    """The twin: torch.linalg.solve(lam cov + K K^T, K) in float64. cov (d, d), keys (d, n) -> (d, n)."""
    c, k = cov.to(torch.float64), keys.to(torch.float64)
    try:
        a = torch.linalg.solve(torch.addmm(c, k, k.mT, beta=lam), k)
    except torch.linalg.LinAlgError as e:
        raise SolveError(f"lam*C + K K^T is singular: {e}") from e
    return check_finite(a.contiguous(), "dense solve")


def _solve(cov, keys, resid, lam, method, factor, dtype, blocks) -> torch.Tensor:
    """A (resid None) or Delta W (resid (m, n), m < n) by `method`; blocks: (potrf, potrs)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    _check_square(cov, "cov")
    if cov.dim() != 2 or keys.dim() != 2 or keys.shape[0] != cov.shape[0] or keys.shape[1] == 0:
        raise ValueError(f"need cov (d, d) and keys (d, n>0); got {tuple(cov.shape)} and {tuple(keys.shape)}")
    if keys.device != cov.device:
        raise ValueError(f"cov on {cov.device} but keys on {keys.device}")
    d, n = keys.shape
    m = None if resid is None else resid.shape[0]
    dt = _compute_dtype(cov, dtype)
    chosen = _auto(d, n, factor is not None, m) if method == "auto" else method
    log.info("solve: %s for d=%d, n=%d%s (%s)", chosen, d, n, ", cached factor" if factor is not None else "", "auto: fewest flops" if method == "auto" else "asked")
    if chosen == "dense":  # the reference twin: float64 whatever `dtype` asks
        a = solve_update_keys_reference(cov, keys, lam)
        return a if resid is None else check_finite((resid.double() @ a.mT).contiguous(), "R A^T")
    direct = torch.ops.memit_fast.solve_mixed if chosen == "mixed" else torch.ops.memit_fast.solve_cholesky
    if chosen != "woodbury":
        return direct(cov, keys, float(lam), dt, resid, *blocks)
    if factor is None:
        try:
            factor = factor_scaled_cov(cov, lam, dtype=dt, potrf_block=blocks[0])
        except NotPositiveDefiniteError:
            if method != "auto":
                raise
            return direct(cov, keys, float(lam), dt, resid, *blocks)
    else:
        _check_factor(factor, cov, lam)
    return torch.ops.memit_fast.solve_woodbury(factor, keys, dt, resid, blocks[0])


def _auto(d: int, n: int, factored: bool, m: int | None = None) -> str:
    """Fewest (weighted) flops among woodbury and cholesky, both float64-accurate. "mixed" is
    never picked automatically: its float32-level products lose accuracy on ill-conditioned
    statistics (measured: 1.7e-2 relative error at cond 1.3e5, against 1.6e-12 for cholesky)."""
    one, wood = solve_flops(d, n, "cholesky", m=m), solve_flops(d, n, "woodbury", factored=factored, m=m)
    return "woodbury" if wood < one else "cholesky"


def _compute_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"solve dtype must be float32 or float64, not {dtype}")
    return torch.float32 if dtype == torch.float32 and t.is_cuda else torch.float64


def _check_square(cov: torch.Tensor, name: str) -> None:
    if cov.dim() not in (2, 3) or cov.shape[-1] != cov.shape[-2] or cov.shape[-1] == 0:
        raise ValueError(f"{name} must be (d, d) or (b, d, d), got {tuple(cov.shape)}")
    if cov.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {cov.dtype}")


def _check_factor(factor: torch.Tensor, cov: torch.Tensor, lam: float) -> None:
    """L[:, 0] * L[0, 0] is the first column of L L^T; it must equal lam * cov[:, 0]."""
    if factor.shape != cov.shape or factor.device != cov.device:
        raise ValueError(f"factor {tuple(factor.shape)} on {factor.device} does not match cov {tuple(cov.shape)} on {cov.device}")
    col = factor[:, 0].double() * factor[0, 0].double()
    want = lam * cov[:, 0].double()
    tol = 1e-4 if factor.dtype == torch.float32 or cov.dtype == torch.float32 else 1e-9
    if not torch.allclose(col, want, rtol=tol, atol=tol * float(want.abs().max())):
        raise ValueError("factor is not the Cholesky factor of lam * cov (other lam or other layer?)")
