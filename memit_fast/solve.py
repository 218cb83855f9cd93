"""The update solve of MEMIT (MEMIT.md section 5 step 4; paper Eq. 14):

    A = (lam C + K K^T)^-1 K        C: (d, d) key second moment, K: (d, n) keys, A: (d, n)

so that Delta W = R A^T; `solve_delta_weights` returns Delta W itself, solving for the m = d_model
columns of K R^T when m < n (fewer right-hand sides). Methods:

- "cholesky": G = lam C + K K^T (one symmetric rank-n update), G = L L^T, A = L^-T L^-1 K.
  d^3/3 + 3 d^2 n flops. On CUDA (memit_fast._native): cuBLAS syrk, potrf (`_potrf_native`:
  for d > POTRF_BLOCK a recursion whose flops run in big cuBLAS trsm/syrk calls, cuSOLVER on
  the diagonal blocks), potrs (`_potrs_native`: for d > POTRS_BLOCK a trsm per diagonal block
  and DGEMM updates between them, else cuSOLVER); elsewhere the same steps in torch
  (`_cholesky_torch`, also the CPU path).
- "mixed" (CUDA with the native module; elsewhere it is "cholesky"): cholesky with K K^T and
  K R^T formed in one fp16 tensor-core product at float32 accuracy (kernels/gram.py, "fp16x3":
  3 n (d + m)^2 flops at ~12x the fp64 rate), then G = lam C + K K^T, its factor and the solve
  in `dtype` (float64): fp64 work d^3/3 + 2 d^2 m. float64 keys keep fp64 products.
- "woodbury": with lam C = L L^T factored once per layer (`factor_scaled_cov`, cache it next
  to the statistics): Y = L^-1 K, M = I + Y^T Y, A = L^-T Y M^-1
  (= (lam C)^-1 K (I + K^T (lam C)^-1 K)^-1, MEMIT.md "work a fast implementation may skip" 6).
  2 d^2 n + 3 d n^2 + n^3/3 flops per edit batch, plus d^3/3 if the factor is not given.
- "dense": torch.linalg.solve(lam C + K K^T, K) in float64 (LU), what the original does; the
  reference twin. It does not test definiteness, and it always computes and returns float64
  (`dtype` is ignored).
- "auto": the float64-accurate method with the fewest flops by `solve_flops` (woodbury
  without a factor counts its d^3/3 too): woodbury or cholesky; if woodbury was picked without
  a factor and lam C is not positive definite, cholesky. For A (fp64), woodbury wins for
  n < ~0.5 d with a cached factor and for n < ~0.3 d without one. "mixed" is opt-in only: on
  an H200, six GPT-J layers at n = 10,000 took 0.84 s against 1.17 s for cholesky, but with a
  relative error of 1.7e-2 on a 4-decade spectrum (cond 1.3e5), where cholesky gave 1.6e-12.

Precision: float64 by default and always on CPU. float32 (`dtype=torch.float32`, CUDA only)
has a relative error of about cond(G) * 1.6e-9 (measured on synthetic spectra; cond(lam C) for
woodbury). mixed: about cond(G) * 1e-10 (float32 rounding of K K^T, amplified by G's
condition; at least ~1e-6, the float32 rounding of K R^T), below what the float32 sums of the
statistics themselves already carry (cond(G) * 3e-10 to 5e-10 for fp32 sums over 2048 tokens;
memit_fast folds to float64 every 2^18 tokens, the original never). benchmarks/solve_accuracy.py
(CPU emulation) and benchmarks/kernels_device.py (device, GPT-J sizes, condition ~20 and a
spectrum over 4 decades) measure it against float64.

Errors: a matrix that is not positive definite raises NotPositiveDefiniteError (cholesky,
mixed and woodbury check cuSOLVER's / torch's `info`); NaN or inf in the result raises SolveError.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import native
from .errors import NotPositiveDefiniteError, SolveError

METHODS = ("auto", "cholesky", "woodbury", "dense", "mixed")
# potrf of a matrix larger than this runs as a recursion of big trsm/syrk calls around cuSOLVER
# potrfs of at most this size (0: one cuSOLVER call); MEMIT_FAST_POTRF_BLOCK overrides it
POTRF_BLOCK = int(os.environ.get("MEMIT_FAST_POTRF_BLOCK", "2048"))
# likewise the triangular solves of cholesky/mixed: blocks of this size, DGEMM between them
POTRS_BLOCK = int(os.environ.get("MEMIT_FAST_POTRS_BLOCK", "2048"))
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


def factor_scaled_cov(cov: torch.Tensor, lam: float, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Lower Cholesky factor L of lam * cov: lam C = L L^T.

    cov: (d, d) or (b, d, d) symmetric, float32 or float64 (only its lower triangle is read).
    Returns L of the same shape in `dtype` (default float64; float64 always on CPU), upper
    triangle zero. A batch of layers is factored with one synchronisation. Raises
    NotPositiveDefiniteError naming the first failing matrix.
    """
    _check_square(cov, "cov")
    return torch.ops.memit_fast.factor_scaled_cov(cov, float(lam), _compute_dtype(cov, dtype))


def solve_update_keys(
    cov: torch.Tensor,
    keys: torch.Tensor,
    lam: float,
    *,
    method: str = "auto",
    factor: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A = (lam cov + K K^T)^-1 K.

    cov: (d, d) symmetric positive (semi)definite, float32/float64; keys K: (d, n), any float
    dtype, same device; factor: optional (d, d) lower factor of lam*cov from factor_scaled_cov
    with the same lam (checked on its first column). Returns A (d, n), contiguous, in `dtype`
    (float64 by default, always float64 on CPU and for method="dense"; float32 allowed on CUDA).
    """
    return _solve(cov, keys, None, lam, method, factor, dtype)


def solve_delta_weights(
    cov: torch.Tensor,
    keys: torch.Tensor,
    resid: torch.Tensor,
    lam: float,
    *,
    method: str = "auto",
    factor: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Delta W = R A^T = ((lam cov + K K^T)^-1 K R^T)^T (MEMIT.md section 5 steps 4-5).

    resid R: (m, n), the residuals of section 5 step 3 (m = d_model), same device. Returns
    Delta W (m, d), contiguous, in the compute dtype (as solve_update_keys); transpose it for
    Conv1D layouts. When m < n the solve runs on the m columns of K R^T instead of the n keys
    (for GPT-J, 4096 instead of 10,000 right-hand sides); otherwise it is R @ A^T.
    Other arguments as solve_update_keys.
    """
    if resid.dim() != 2 or resid.shape[1] != keys.shape[-1] or resid.device != keys.device:
        raise ValueError(f"resid must be (m, {keys.shape[-1]}) on {keys.device}; got {tuple(resid.shape)} on {resid.device}")
    if resid.shape[0] >= keys.shape[1]:
        a = _solve(cov, keys, None, lam, method, factor, dtype)
        return _check_finite(resid.to(a.dtype) @ a.mT, "R A^T")
    return _solve(cov, keys, resid, lam, method, factor, dtype)


def solve_update_keys_reference(cov: torch.Tensor, keys: torch.Tensor, lam: float) -> torch.Tensor:
    """The twin: torch.linalg.solve(lam cov + K K^T, K) in float64. cov (d, d), keys (d, n) -> (d, n)."""
    c, k = cov.to(torch.float64), keys.to(torch.float64)
    try:
        a = torch.linalg.solve(torch.addmm(c, k, k.mT, beta=lam), k)
    except torch.linalg.LinAlgError as e:
        raise SolveError(f"lam*C + K K^T is singular: {e}") from e
    return _check_finite(a.contiguous(), "dense solve")


def _solve(cov, keys, resid, lam, method, factor, dtype) -> torch.Tensor:
    """A (resid None) or Delta W (resid (m, n), m < n) by `method`."""
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
    if chosen == "dense":  # the reference twin: float64 whatever `dtype` asks
        a = solve_update_keys_reference(cov, keys, lam)
        return a if resid is None else _check_finite((resid.double() @ a.mT).contiguous(), "R A^T")
    direct = torch.ops.memit_fast.solve_mixed if chosen == "mixed" else torch.ops.memit_fast.solve_cholesky
    if chosen != "woodbury":
        return direct(cov, keys, float(lam), dt, resid)
    if factor is None:
        try:
            factor = factor_scaled_cov(cov, lam, dtype=dt)
        except NotPositiveDefiniteError:
            if method != "auto":
                raise
            return direct(cov, keys, float(lam), dt, resid)
    else:
        _check_factor(factor, cov, lam)
    return torch.ops.memit_fast.solve_woodbury(factor, keys, dt, resid)


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


def _check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise SolveError(f"{what} produced NaN or inf")
    return t


def _raise_not_pd(info: torch.Tensor, what: str, batch: bool = False) -> None:
    """info: (b,) int, cuSOLVER/torch convention (i > 0: leading minor of order i not PD; < 0: a
    bad argument), one entry per matrix of a batch if `batch`, else one per call (potrf, potrs)."""
    info = info.reshape(-1).cpu()
    if bool((info < 0).any()):
        raise SolveError(f"{what}: invalid argument reported by the solver (info {info.tolist()})")
    bad = torch.nonzero(info > 0).reshape(-1)
    if len(bad):
        b = int(bad[0])
        where = f" (matrix {b} of {len(info)})" if batch and len(info) > 1 else ""
        raise NotPositiveDefiniteError(
            f"{what}{where} is not positive definite: its leading minor of order {int(info[b])} is not; "
            "check the statistics (NaN, too few tokens) and lambda"
        )


# ---- torch twins of the native paths (CPU; CUDA without the native module) ----


def _factor_torch(cov: torch.Tensor, lam: float, dtype: torch.dtype) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(cov.to(dtype) * lam)
    _raise_not_pd(info, "lam * C", batch=True)
    return L.contiguous()


def _cholesky_torch(cov, keys, lam, dtype, resid=None) -> torch.Tensor:
    k = keys.to(dtype)
    L, info = torch.linalg.cholesky_ex(torch.addmm(cov.to(dtype), k, k.mT, beta=lam))
    _raise_not_pd(info, "lam * C + K K^T")
    if resid is None:
        return _check_finite(torch.cholesky_solve(k, L).contiguous(), "cholesky solve")
    x = torch.cholesky_solve(k @ resid.to(dtype).mT, L)  # (d, m) = G^-1 K R^T
    return _check_finite(x.mT.contiguous(), "cholesky solve")


def _woodbury_torch(factor, keys, dtype, resid=None) -> torch.Tensor:
    L, k = factor.to(dtype), keys.to(dtype)
    y = torch.linalg.solve_triangular(L, k, upper=False)  # (d, n) = L^-1 K
    m = torch.eye(k.shape[1], dtype=dtype, device=k.device).addmm_(y.mT, y)  # I + Y^T Y
    Lm, info = torch.linalg.cholesky_ex(m)
    _raise_not_pd(info, "I + K^T (lam C)^-1 K")
    if resid is None:
        z = torch.cholesky_solve(y.mT, Lm).mT  # Y M^-1 (d, n)
    else:
        z = y @ torch.cholesky_solve(resid.to(dtype).mT, Lm)  # Y M^-1 R^T (d, m)
    x = torch.linalg.solve_triangular(L.mT, z, upper=True)
    return _check_finite((x if resid is None else x.mT).contiguous(), "woodbury solve")


# ---- native paths (column-major calls on row-major tensors: a row-major lower triangle is
# ---- cuBLAS' upper one, and a row-major (n, d) buffer is a column-major d x n matrix) ----


def _native_ready(t: torch.Tensor) -> bool:
    return t.is_cuda and native.available()


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _potrf_steps(o: int, n: int, block: int) -> list[tuple[int, int, int]]:
    """The recursion of _potrf_native for the diagonal block at o of size n, in order:
    (o, n, 0) = cuSOLVER potrf of that block; (o, k1, k2) = the update after the first k1 of a
    block of k1 + k2. Blocks halve (at multiples of 256 where they can) down to `block` (0: none)."""
    if block <= 0 or n <= block:
        return [(o, n, 0)]
    q = max(1, min(256, block // 2))
    n1 = (n // 2) // q * q or n // 2
    return _potrf_steps(o, n1, block) + [(o, n1, n - n1)] + _potrf_steps(o + n1, n - n1, block)


def _potrf_native(a: torch.Tensor, f64: bool, upper: bool, kw: dict, block: int | None = None) -> torch.Tensor:
    """In place, the Cholesky factor of the column-major n x n matrix in a (a contiguous (n, n)
    tensor; `upper`: in its column-major upper triangle = the row-major lower one, U^T U = A;
    else the column-major lower one, L L^T = A). Right-looking recursion, so that most flops run
    in a few big cuBLAS trsm/syrk calls: A11 = U11^T U11 (recursively), U12 = U11^-T A12,
    A22 -= U12^T U12, A22 = U22^T U22 (recursively); blocks of at most `block` (default
    POTRF_BLOCK) go to cuSOLVER's potrf. Returns info, (1,) int32 on the device without a sync:
    0, or the order of the first leading minor that is not positive definite (cuSOLVER's
    convention; blocks after a failed one factor garbage), or cuSOLVER's negative info."""
    lib, n = native.lib(), a.shape[-1]
    ld, es, base = a.stride(0), a.element_size(), a.data_ptr()
    steps = _potrf_steps(0, n, POTRF_BLOCK if block is None else block)
    blocks = [(o, k) for o, k, k2 in steps if k2 == 0]
    lwork = max(lib.potrf_workspace(f64, upper, k, ld, **kw) for k in {k for _, k in blocks})
    work = torch.empty(max(1, lwork), dtype=a.dtype, device=a.device)
    info = torch.zeros(len(blocks), dtype=torch.int32, device=a.device)
    at = lambda i, j: base + (i + j * ld) * es  # noqa: E731 - column-major element (i, j)
    b = 0
    for o, k1, k2 in steps:
        if k2 == 0:
            lib.potrf(f64, upper, k1, at(o, o), ld, work.data_ptr(), work.numel(), info[b].data_ptr(), **kw)
            b += 1
        elif upper:  # U12 = U11^-T A12 (k1 x k2), A22 -= U12^T U12
            lib.trsm(f64, True, True, True, k1, k2, 1.0, at(o, o), ld, at(o, o + k1), ld, **kw)
            lib.syrk(f64, True, True, k2, k1, -1.0, at(o, o + k1), ld, 1.0, at(o + k1, o + k1), ld, **kw)
        else:  # L21 = A21 L11^-T (k2 x k1), A22 -= L21 L21^T
            lib.trsm(f64, False, False, True, k2, k1, 1.0, at(o, o), ld, at(o + k1, o), ld, **kw)
            lib.syrk(f64, False, False, k2, k1, -1.0, at(o + k1, o), ld, 1.0, at(o + k1, o + k1), ld, **kw)
    if len(blocks) == 1:
        return info
    never = torch.iinfo(torch.int32).max
    offsets = torch.empty_like(info)
    for i, (o, _) in enumerate(blocks):  # fills, not a host-to-device copy: no sync
        offsets[i].fill_(o)
    first = torch.where(info > 0, info + offsets, never).amin()
    return torch.where(info.amin() < 0, info.amin(), torch.where(first < never, first, 0)).reshape(1).to(torch.int32)


def _factor_native(cov: torch.Tensor, lam: float, dtype: torch.dtype) -> torch.Tensor:
    f64 = dtype == torch.float64
    L = (cov.to(dtype) * lam).contiguous()
    mats = L.reshape(-1, L.shape[-1], L.shape[-1])
    with _on_device(cov):
        kw = native.call_args(cov)
        info = torch.cat([_potrf_native(m, f64, True, kw) for m in mats])
    _raise_not_pd(info, "lam * C", batch=True)
    return L.tril_()


def _cholesky_native(cov, keys, lam, dtype, resid=None) -> torch.Tensor:
    lib, f64 = native.lib(), dtype == torch.float64
    d, n = keys.shape
    k = keys.to(dtype).contiguous()  # row-major (d, n): column-major n x d, ld n
    g = torch.empty(d, d, dtype=dtype, device=cov.device).copy_(cov)
    if resid is None:
        b = torch.empty(n, d, dtype=dtype, device=cov.device).copy_(keys.mT)  # column-major d x n: K
    else:
        b = resid.to(dtype) @ k.mT  # row-major (m, d): column-major d x m, K R^T
    with _on_device(cov):
        kw = native.call_args(cov)
        lib.syrk(f64, True, True, d, n, 1.0, k.data_ptr(), n, float(lam), g.data_ptr(), d, **kw)
        return _factor_and_solve(g, b, f64, resid is None, kw)


def _potrs_native(g: torch.Tensor, b: torch.Tensor, f64: bool, info: torch.Tensor, kw: dict, block: int | None = None) -> None:
    """b := G^-1 b in place, G = U^T U with U the column-major upper factor in g (row-major
    lower L = U^T); b (r, d) row-major = column-major d x r. For d > `block` (default
    POTRS_BLOCK) blocked: per diagonal block of L one cuBLAS trsm, then one DGEMM (torch, same
    stream) that updates the rest of b, so most of the 2 d^2 r flops run as GEMM; else cuSOLVER's
    potrs (info: its argument check)."""
    lib, d, r = native.lib(), g.shape[0], b.shape[0]
    block = POTRS_BLOCK if block is None else block
    if block <= 0 or d <= block:
        lib.potrs(f64, True, d, r, g.data_ptr(), d, b.data_ptr(), d, info.data_ptr(), **kw)
        return
    es = g.element_size()
    starts = list(range(0, d, block))
    for o in starts:  # forward: U^T Y = B, i.e. Y^T = B^T L^-T, columns of b left to right
        k = min(block, d - o)
        lib.trsm(f64, True, True, True, k, r, 1.0, g.data_ptr() + (o * d + o) * es, d, b[:, o:].data_ptr(), d, **kw)
        if o + k < d:
            b[:, o + k:].addmm_(b[:, o:o + k], g[o + k:, o:o + k].mT, alpha=-1.0)
    for o in reversed(starts):  # backward: U X = Y, i.e. X^T = Y^T L^-1, right to left
        k = min(block, d - o)
        lib.trsm(f64, True, True, False, k, r, 1.0, g.data_ptr() + (o * d + o) * es, d, b[:, o:].data_ptr(), d, **kw)
        if o:
            b[:, :o].addmm_(b[:, o:o + k], g[o:o + k, :o], alpha=-1.0)


def _factor_and_solve(g, b, f64, keys_form, kw) -> torch.Tensor:
    """g (d, d) row-major lower = G: factored in place; b (r, d) row-major = column-major d x r
    right-hand sides: G^-1 B in place. Returns b (as (d, r) if keys_form)."""
    info = torch.cat([_potrf_native(g, f64, True, kw), torch.zeros(1, dtype=torch.int32, device=g.device)])
    _potrs_native(g, b, f64, info[1], kw)
    _raise_not_pd(info, "lam * C + K K^T")
    return _check_finite(b.mT.contiguous() if keys_form else b, "cholesky solve")


def _mixed_native(cov, keys, lam, dtype, resid=None) -> torch.Tensor:
    """_cholesky_native with K K^T and K R^T from one fp16x3 tensor-core product (kernels/gram.py,
    float32 accuracy) instead of fp64 syrk/gemm; G's factor and the solve stay in `dtype`.
    float64 keys keep the fp64 products."""
    if keys.dtype == torch.float64:
        return _cholesky_native(cov, keys, lam, dtype, resid)
    from .kernels.gram import gram_fp16x3  # Triton: imported on first use

    f64, (d, n) = dtype == torch.float64, keys.shape
    with _on_device(cov):
        kw = native.call_args(cov)
        s = gram_fp16x3([keys.mT] if resid is None else [keys.mT, resid.mT])  # lower of [K^T R^T]^T [K^T R^T]
        if cov.dtype == dtype:
            g = torch.add(s[:d, :d], cov, alpha=lam).contiguous()  # one pass: lam C + K K^T, in dtype
        else:
            g = (cov.to(dtype) * lam).add_(s[:d, :d])
        if resid is None:
            b = torch.empty(n, d, dtype=dtype, device=cov.device).copy_(keys.mT)  # column-major d x n: K
        else:
            b = torch.empty(resid.shape[0], d, dtype=dtype, device=cov.device).copy_(s[d:, :d])  # R K^T: column-major K R^T
        del s
        return _factor_and_solve(g, b, f64, resid is None, kw)


def _woodbury_native(factor, keys, dtype, resid=None) -> torch.Tensor:
    lib, f64 = native.lib(), dtype == torch.float64
    d, n = keys.shape
    L = factor.to(dtype).contiguous()  # row-major lower = column-major upper U, U^T U = lam C
    y = torch.empty(n, d, dtype=dtype, device=keys.device).copy_(keys.mT)  # column-major d x n
    m = torch.eye(n, dtype=dtype, device=keys.device)
    with _on_device(keys):
        kw = native.call_args(keys)
        lib.trsm(f64, True, True, True, d, n, 1.0, L.data_ptr(), d, y.data_ptr(), d, **kw)  # Y = U^-T K
        lib.syrk(f64, False, True, n, d, 1.0, y.data_ptr(), d, 1.0, m.data_ptr(), n, **kw)  # M = I + Y^T Y
        info = torch.cat([_potrf_native(m, f64, False, kw), torch.zeros(1, dtype=torch.int32, device=keys.device)])  # M = Lm Lm^T
        if resid is None:
            lib.trsm(f64, False, False, True, d, n, 1.0, m.data_ptr(), n, y.data_ptr(), d, **kw)  # Y Lm^-T
            lib.trsm(f64, False, False, False, d, n, 1.0, m.data_ptr(), n, y.data_ptr(), d, **kw)  # Y M^-1
            z = y
        else:
            # a fresh copy (potrs overwrites it): resid.to(dtype).contiguous() would be resid itself
            # for a contiguous float32 resid in a float32 solve, and the caller's R would be clobbered
            w = torch.empty(resid.shape, dtype=dtype, device=keys.device).copy_(resid)  # row-major (m, n): column-major n x m, R^T
            lib.potrs(f64, False, n, w.shape[0], m.data_ptr(), n, w.data_ptr(), n, info[1].data_ptr(), **kw)  # M^-1 R^T
            z = w @ y  # row-major (m, d): column-major d x m, Y M^-1 R^T
        lib.trsm(f64, True, True, False, d, z.shape[0], 1.0, L.data_ptr(), d, z.data_ptr(), d, **kw)  # U^-1 Z
    _raise_not_pd(info, "I + K^T (lam C)^-1 K")
    return _check_finite(z.mT.contiguous() if resid is None else z, "woodbury solve")


# ---- torch.library ops: CPU (and any device without the native module) runs the torch twin ----


@torch.library.custom_op("memit_fast::factor_scaled_cov", mutates_args=())
def _factor_op(cov: torch.Tensor, lam: float, dtype: torch.dtype) -> torch.Tensor:
    return (_factor_native if _native_ready(cov) else _factor_torch)(cov, lam, dtype)


@torch.library.custom_op("memit_fast::solve_cholesky", mutates_args=())
def _cholesky_op(cov: torch.Tensor, keys: torch.Tensor, lam: float, dtype: torch.dtype,
                 resid: torch.Tensor | None = None) -> torch.Tensor:
    return (_cholesky_native if _native_ready(cov) else _cholesky_torch)(cov, keys, lam, dtype, resid)


@torch.library.custom_op("memit_fast::solve_woodbury", mutates_args=())
def _woodbury_op(factor: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype,
                 resid: torch.Tensor | None = None) -> torch.Tensor:
    return (_woodbury_native if _native_ready(factor) else _woodbury_torch)(factor, keys, dtype, resid)


@torch.library.custom_op("memit_fast::solve_mixed", mutates_args=())
def _mixed_op(cov: torch.Tensor, keys: torch.Tensor, lam: float, dtype: torch.dtype,
              resid: torch.Tensor | None = None) -> torch.Tensor:
    return (_mixed_native if _native_ready(cov) else _cholesky_torch)(cov, keys, lam, dtype, resid)


@_factor_op.register_fake
def _(cov, lam, dtype):
    return cov.new_empty(cov.shape, dtype=dtype)


def _solve_fake(keys, dtype, resid):
    shape = keys.shape if resid is None else (resid.shape[0], keys.shape[0])
    return keys.new_empty(shape, dtype=dtype)


@_cholesky_op.register_fake
def _(cov, keys, lam, dtype, resid=None):
    return _solve_fake(keys, dtype, resid)


@_woodbury_op.register_fake
def _(factor, keys, dtype, resid=None):
    return _solve_fake(keys, dtype, resid)


@_mixed_op.register_fake
def _(cov, keys, lam, dtype, resid=None):
    return _solve_fake(keys, dtype, resid)
