"""The CUDA implementations of the solve ops over the compiled module `memit_fast._native`
(cuSOLVER / cuBLAS), and their PyTorch twins (`<op>_reference`, the CPU path); docs/algorithm.md
section 5 gives the method, memit_fast/solve.py the choice between them.

This is the only Python file that talks to `_native`: it describes each tensor as a
`_native.Buffer` (address, shape, strides, dtype, device), which the C++ side checks; block
offsets and the column-major views are computed there. Column-major calls on row-major tensors:
a row-major lower triangle is cuBLAS' upper one, and a row-major (n, d) buffer is a column-major
d x n matrix.

The module is loaded lazily, on the first call of `available()`, `why_unavailable()` or
`lib()`. It needs no CUDA toolkit to build; it dlopen()s libcublas and libcusolver at run time, taking
the copies this process already mapped (torch's), else those of the nvidia-cublas /
nvidia-cusolver wheels, else the sonames on the loader path. `MEMIT_FAST_NATIVE=0` switches it off.
Without it memit_fast runs its PyTorch path; only an explicit native call raises, saying why.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os

import torch

from .config import env_setting
from .errors import MemitError, NotPositiveDefiniteError, SolveError
from .kernels.gram import gram_fp16x3

ABI_VERSION = 2  # must equal _native.ABI_VERSION (csrc/bindings.cpp)
# default diagonal blocks of the factor (larger: trsm/syrk recursion around cuSOLVER) and of the
# triangular solves (GEMM between them); 0: one cuSOLVER call. MEMIT_FAST_POTRF_BLOCK / _POTRS_BLOCK.
POTRF_BLOCK = env_setting("MEMIT_FAST_POTRF_BLOCK")
POTRS_BLOCK = env_setting("MEMIT_FAST_POTRS_BLOCK")
BUILD_HINT = "build it with `MEMIT_FAST_BUILD_NATIVE=1 python -m pip install --no-build-isolation --no-deps -e .`"

_module = None
_reason: str | None = None
_loaded = False


class NativeUnavailableError(MemitError, RuntimeError):
    """A native function was called but memit_fast._native cannot be used here."""


def _library_paths(stem: str, majors: tuple[int, ...]) -> list[str]:
    """Candidates for lib<stem>.so.<major>: mapped already, then nvidia wheels, then sonames."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith(f"lib{stem}.so.") and path not in found:
                    found.append(path)
    except OSError:
        pass
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for major in majors:  # CUDA 13 wheels: nvidia/cu13/lib; CUDA 12 wheels: nvidia/<lib>/lib
            found += sorted(glob.glob(os.path.join(base, "cu*", "lib", f"lib{stem}.so.{major}")))
            found += sorted(glob.glob(os.path.join(base, stem, "lib", f"lib{stem}.so.{major}")))
    return found + [f"lib{stem}.so.{major}" for major in majors]


def _load() -> None:
    global _module, _reason, _loaded
    if _loaded:
        return
    _loaded = True
    if not env_setting("MEMIT_FAST_NATIVE"):
        _reason = "switched off by MEMIT_FAST_NATIVE=0"
        return
    try:
        from . import _native as mod
    except ImportError as e:
        _reason = f"memit_fast._native is not built or does not import ({e}); {BUILD_HINT}"
        return
    if getattr(mod, "ABI_VERSION", None) != ABI_VERSION:
        _reason = f"memit_fast._native is stale (ABI {getattr(mod, 'ABI_VERSION', None)}, need {ABI_VERSION}); {BUILD_HINT}"
        return
    if not torch.cuda.is_available():
        _reason = "no CUDA device (torch.cuda.is_available() is False)"
        return
    torch.cuda.init()
    errors = []
    for cublas in _library_paths("cublas", (13, 12)):
        for cusolver in _library_paths("cusolver", (12, 11)):
            try:
                mod.load_cuda_libs(cublas, cusolver)
                _module = mod
                return
            except RuntimeError as e:
                errors.append(str(e))
    _reason = "cuBLAS/cuSOLVER could not be loaded: " + "; ".join(dict.fromkeys(errors))


def available() -> bool:
    """True if the native module is built, a CUDA device exists and cuSOLVER/cuBLAS loaded."""
    _load()
    return _module is not None


def why_unavailable() -> str | None:
    """None if `available()`, else the reason in one line."""
    _load()
    return _reason


def lib():
    """The loaded module; raises NativeUnavailableError with the reason otherwise."""
    _load()
    if _module is None:
        raise NativeUnavailableError(f"memit_fast native module unavailable: {_reason}")
    return _module


def _buffer(t: torch.Tensor):
    return _module.Buffer(t.data_ptr(), list(t.shape), list(t.stride()), str(t.dtype).removeprefix("torch."), t.get_device())


def _buffers(op: str, **tensors: torch.Tensor) -> list:
    """The descriptors of one call's operands, refused here when they are on different devices
    (the C++ layer checks the same, with the same message)."""
    devices = {name: t.get_device() for name, t in tensors.items()}
    first = next(iter(tensors))
    for name, device in devices.items():
        if device != devices[first]:
            raise ValueError(f"{op}: {name} is on device {device}, the other operands on {devices[first]}")
    return [_buffer(t) for t in tensors.values()]


def _stream(t: torch.Tensor) -> int:
    """The current torch stream of t's device (0, the host, for CPU tensors: the tests' stand-in)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def potrf(a: torch.Tensor, upper: bool, block: int) -> torch.Tensor:
    """a (n, n) := its Cholesky factor in place, column-major (`upper`: in its column-major upper
    triangle = the row-major lower one, U^T U = A; else L L^T = A); blocks of at most `block`
    (<= 0: one) go to cuSOLVER, the rest runs in cuBLAS trsm/syrk calls. Returns info, (1,)
    int32 on the device without a sync: 0, the order of the first leading minor that is not
    positive definite (blocks after a failed one factor garbage), or cuSOLVER's negative info."""
    s = _stream(a)
    lwork, offsets = lib().potrf_plan(_buffer(a), upper, block, s)
    work = a.new_empty(max(1, lwork))
    info = torch.zeros(len(offsets), dtype=torch.int32, device=a.device)
    ba, bw, bi = _buffers("potrf", a=a, work=work, info=info)
    _module.potrf(ba, upper, block, bw, bi, s)
    if len(offsets) == 1:
        return info
    never = torch.iinfo(torch.int32).max
    starts = torch.empty_like(info)
    for i, o in enumerate(offsets):  # fills, not a host-to-device copy: no sync
        starts[i].fill_(o)
    first = torch.where(info > 0, info + starts, never).amin()
    return torch.where(info.amin() < 0, info.amin(), torch.where(first < never, first, 0)).reshape(1).to(torch.int32)


def potrs(a: torch.Tensor, b: torch.Tensor, upper: bool, block: int, info: torch.Tensor) -> None:
    """b (r, n) row-major = column-major n x r := A^-1 b in place, A factored by `potrf`;
    blocked (trsm per diagonal block, GEMM between) for an upper factor and n > block > 0."""
    module = lib()
    ba, bb, bi = _buffers("potrs", a=a, b=b, info=info)
    module.potrs(ba, bb, upper, block, bi, _stream(a))


def syrk(a: torch.Tensor, c: torch.Tensor, upper: bool, trans: bool, alpha: float, beta: float) -> None:
    """Column-major c := alpha op(a) op(a)^T + beta c in its `upper` or lower triangle."""
    module = lib()
    bc, ba = _buffers("syrk", c=c, a=a)
    module.syrk(ba, bc, upper, trans, alpha, beta, _stream(c))


def trsm(t: torch.Tensor, b: torch.Tensor, left: bool, upper: bool, trans: bool) -> None:
    """Column-major b := op(t)^-1 b (left) or b op(t)^-1 (right), t triangular."""
    module = lib()
    bt, bb = _buffers("trsm", t=t, b=b)
    module.trsm(bt, bb, left, upper, trans, 1.0, _stream(t))


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---- the solve ops (memit_fast/ops.py): CUDA implementations, then their twins. The dispatcher
# ---- passes only the arguments the caller gave, so the defaults here are the schema's ----


def factor_scaled_cov_native(cov: torch.Tensor, lam: float, dtype: torch.dtype, potrf_block: int = POTRF_BLOCK) -> torch.Tensor:
    L = (cov.to(dtype) * lam).contiguous()
    with _on_device(cov):
        info = torch.cat([potrf(m, True, potrf_block) for m in L.reshape(-1, L.shape[-1], L.shape[-1])])
    raise_not_pd(info, "lam * C", batch=True)
    return L.tril_()


def solve_cholesky_native(cov, keys, lam, dtype, resid=None, potrf_block=POTRF_BLOCK, potrs_block=POTRS_BLOCK) -> torch.Tensor:
    d, n = keys.shape
    k = keys.to(dtype).contiguous()  # row-major (d, n): column-major n x d
    g = torch.empty(d, d, dtype=dtype, device=cov.device).copy_(cov)
    if resid is None:
        b = torch.empty(n, d, dtype=dtype, device=cov.device).copy_(keys.mT)  # column-major d x n: K
    else:
        b = resid.to(dtype) @ k.mT  # row-major (m, d): column-major d x m, K R^T
    with _on_device(cov):
        syrk(k, g, True, True, 1.0, float(lam))  # G = lam C + K K^T
        return _factor_and_solve(g, b, resid is None, potrf_block, potrs_block)


def _factor_and_solve(g, b, keys_form, potrf_block, potrs_block) -> torch.Tensor:
    """g (d, d) row-major lower = G: factored in place; b (r, d) row-major = column-major d x r
    right-hand sides: G^-1 B in place. Returns b (as (d, r) if keys_form)."""
    info = torch.cat([potrf(g, True, potrf_block), torch.zeros(1, dtype=torch.int32, device=g.device)])
    potrs(g, b, True, potrs_block, info[1:])
    raise_not_pd(info, "lam * C + K K^T")
    return check_finite(b.mT.contiguous() if keys_form else b, "cholesky solve")


def solve_mixed_native(cov, keys, lam, dtype, resid=None, potrf_block=POTRF_BLOCK, potrs_block=POTRS_BLOCK) -> torch.Tensor:
    """solve_cholesky_native with K K^T and K R^T from one fp16x3 tensor-core product
    (kernels/gram.py, float32 accuracy) instead of fp64 syrk/gemm; G's factor and the solve stay
    in `dtype`. float64 keys keep the fp64 products."""
    if keys.dtype == torch.float64:
        return solve_cholesky_native(cov, keys, lam, dtype, resid, potrf_block, potrs_block)
    d, n = keys.shape
    with _on_device(cov):
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
        return _factor_and_solve(g, b, resid is None, potrf_block, potrs_block)


def solve_woodbury_native(factor, keys, dtype, resid=None, potrf_block=POTRF_BLOCK) -> torch.Tensor:
    d, n = keys.shape
    L = factor.to(dtype).contiguous()  # row-major lower = column-major upper U, U^T U = lam C
    y = torch.empty(n, d, dtype=dtype, device=keys.device).copy_(keys.mT)  # column-major d x n
    m = torch.eye(n, dtype=dtype, device=keys.device)
    with _on_device(keys):
        trsm(L, y, True, True, True)  # Y = U^-T K
        syrk(y, m, False, True, 1.0, 1.0)  # M = I + Y^T Y
        info = torch.cat([potrf(m, False, potrf_block), torch.zeros(1, dtype=torch.int32, device=keys.device)])  # M = Lm Lm^T
        if resid is None:
            trsm(m, y, False, False, True)  # Y Lm^-T
            trsm(m, y, False, False, False)  # Y M^-1
            z = y
        else:
            # a fresh copy (potrs overwrites it): resid.to(dtype).contiguous() would be resid itself
            # for a contiguous float32 resid in a float32 solve, and the caller's R would be clobbered
            w = torch.empty(resid.shape, dtype=dtype, device=keys.device).copy_(resid)  # row-major (m, n): column-major n x m, R^T
            potrs(m, w, False, 0, info[1:])  # M^-1 R^T
            z = w @ y  # row-major (m, d): column-major d x m, Y M^-1 R^T
        trsm(L, z, True, True, False)  # U^-1 Z
    raise_not_pd(info, "I + K^T (lam C)^-1 K")
    return check_finite(z.mT.contiguous() if resid is None else z, "woodbury solve")


def factor_scaled_cov_reference(cov: torch.Tensor, lam: float, dtype: torch.dtype, potrf_block: int = 0) -> torch.Tensor:
    """The twin: torch's Cholesky factor of lam cov ((d, d) or (b, d, d)); potrf_block is unused."""
    L, info = torch.linalg.cholesky_ex(cov.to(dtype) * lam)
    raise_not_pd(info, "lam * C", batch=True)
    return L.contiguous()


def solve_cholesky_reference(cov, keys, lam, dtype, resid=None, potrf_block=0, potrs_block=0) -> torch.Tensor:
    """The twin: G = lam cov + K K^T = L L^T by torch; G^-1 K (d, n), or (G^-1 K R^T)^T (m, d)."""
    k = keys.to(dtype)
    L, info = torch.linalg.cholesky_ex(torch.addmm(cov.to(dtype), k, k.mT, beta=lam))
    raise_not_pd(info, "lam * C + K K^T")
    if resid is None:
        return check_finite(torch.cholesky_solve(k, L).contiguous(), "cholesky solve")
    x = torch.cholesky_solve(k @ resid.to(dtype).mT, L)  # (d, m) = G^-1 K R^T
    return check_finite(x.mT.contiguous(), "cholesky solve")


solve_mixed_reference = solve_cholesky_reference  # mixed's products, exact in the twin


def solve_woodbury_reference(factor, keys, dtype, resid=None, potrf_block=0) -> torch.Tensor:
    """The twin: with lam C = L L^T, Y = L^-1 K, M = I + Y^T Y: L^-T Y M^-1 (d, n), or its (m, d) form with R."""
    L, k = factor.to(dtype), keys.to(dtype)
    y = torch.linalg.solve_triangular(L, k, upper=False)  # (d, n) = L^-1 K
    m = torch.eye(k.shape[1], dtype=dtype, device=k.device).addmm_(y.mT, y)  # I + Y^T Y
    Lm, info = torch.linalg.cholesky_ex(m)
    raise_not_pd(info, "I + K^T (lam C)^-1 K")
    if resid is None:
        z = torch.cholesky_solve(y.mT, Lm).mT  # Y M^-1 (d, n)
    else:
        z = y @ torch.cholesky_solve(resid.to(dtype).mT, Lm)  # Y M^-1 R^T (d, m)
    x = torch.linalg.solve_triangular(L.mT, z, upper=True)
    return check_finite((x if resid is None else x.mT).contiguous(), "woodbury solve")


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise SolveError(f"{what} produced NaN or inf")
    return t


def raise_not_pd(info: torch.Tensor, what: str, batch: bool = False) -> None:
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
