"""A CPU stand-in for memit_fast._native: the same functions on host pointers, with cuBLAS /
cuSOLVER's column-major semantics (only the named triangle is read or written), so the
row-/column-major mapping in memit_fast/solve.py is tested without a GPU."""

import ctypes

import numpy as np
import torch


def _view(ptr: int, f64: bool, rows: int, cols: int, ld: int) -> torch.Tensor:
    """Column-major rows x cols matrix with leading dimension ld at host address ptr."""
    ctype, count = (ctypes.c_double if f64 else ctypes.c_float), ld * (cols - 1) + rows
    flat = torch.from_numpy(np.ctypeslib.as_array((ctype * count).from_address(ptr)))
    return flat.as_strided((rows, cols), (1, ld))


def _sym(m: torch.Tensor, upper: bool) -> torch.Tensor:
    t = m.triu() if upper else m.tril()
    return t + (t.triu(1) if upper else t.tril(-1)).mT


def _tri(m: torch.Tensor, upper: bool) -> torch.Tensor:
    return m.triu() if upper else m.tril()


def _write_tri(m: torch.Tensor, value: torch.Tensor, upper: bool) -> None:
    mask = torch.ones_like(value, dtype=torch.bool)
    mask = mask.triu() if upper else mask.tril()
    m.copy_(torch.where(mask, value, m))


def potrf_workspace(f64, upper, n, lda, stream, device):
    return n


def potrf(f64, upper, n, a, lda, work, lwork, info, stream, device):
    m = _view(a, f64, n, n, lda)
    L, err = torch.linalg.cholesky_ex(_sym(m, upper))
    _view(info, False, 1, 1, 1).view(torch.int32).fill_(int(err))
    if int(err) == 0:
        _write_tri(m, L.mT if upper else L, upper)


def potrs(f64, upper, n, nrhs, a, lda, b, ldb, info, stream, device):
    t = _tri(_view(a, f64, n, n, lda), upper)
    L = t.mT if upper else t
    rhs = _view(b, f64, n, nrhs, ldb)
    rhs.copy_(torch.cholesky_solve(rhs.clone(), L))
    _view(info, False, 1, 1, 1).view(torch.int32).fill_(0)


def syrk(f64, upper, trans, n, k, alpha, a, lda, beta, c, ldc, stream, device):
    op = _view(a, f64, k, n, lda).mT if trans else _view(a, f64, n, k, lda)
    cm = _view(c, f64, n, n, ldc)
    _write_tri(cm, alpha * op @ op.mT + beta * cm, upper)


def trsm(f64, left, upper, trans, m, n, alpha, t, ldt, b, ldb, stream, device):
    tm = _tri(_view(t, f64, m if left else n, m if left else n, ldt), upper)
    op, op_upper = (tm.mT, not upper) if trans else (tm, upper)
    bm = _view(b, f64, m, n, ldb)
    bm.copy_(alpha * torch.linalg.solve_triangular(op, bm.clone(), upper=op_upper, left=left))
