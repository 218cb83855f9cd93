"""Every op of memit_fast, declared once with torch.library (namespace memit_fast), with its
schema, its fake (shapes only, for torch.compile), its default implementation (the plain-PyTorch
twin `<op>_reference`, the CPU path) and its CUDA implementation:

| op | CUDA | twin |
|---|---|---|
| gather_rows | kernels/capture.py gather_rows_triton | gather_rows_reference |
| covariance_update | kernels/covariance.py covariance_update_triton | covariance_update_reference |
| gram | kernels/gram.py gram_fp16x3 | gram_reference |
| factor_scaled_cov, solve_cholesky, solve_woodbury, solve_mixed | native.py `*_native` (cuSOLVER / cuBLAS) | native.py `*_reference` |

The solves run their twin on CUDA too when the native module is not available (native.py says
why). z's attention over its cached prefix (kernels/prefix_attention.py) is no op here: an
autograd.Function of a forward and a backward kernel whose twin is layouts.base.prefix_attention
under autograd (layouts.base.attend_prefix chooses). Call them as torch.ops.memit_fast.<op>; the Python fronts, with argument checks, are
`gather_rows` and `CovarianceAccumulator` here and memit_fast/solve.py for the solves.
"""

from __future__ import annotations

import functools

import torch

from . import native
from .kernels import capture, covariance, gram
from .kernels._triton import HAVE_TRITON
from .kernels.covariance import TileConfig
from .native import POTRF_BLOCK, POTRS_BLOCK


def _declare(name: str, schema: str, mutates: tuple[str, ...], reference, cuda, fake) -> None:
    """Without Triton a Triton op runs its twin on CUDA too."""
    op = torch.library.custom_op(f"memit_fast::{name}", reference, mutates_args=mutates, schema=schema)
    triton_kernel = getattr(cuda, "__module__", "").startswith("memit_fast.kernels")
    op.register_kernel("cuda", cuda if HAVE_TRITON or not triton_kernel else reference)
    op.register_fake(fake)


def _native_or_reference(native_fn, reference_fn):
    """The CUDA implementation of a solve: native when memit_fast._native loaded, else the twin."""
    return lambda *args: (native_fn if native.available() else reference_fn)(*args)


def _solve_fake(keys, dtype, resid):
    return keys.new_empty(keys.shape if resid is None else (resid.shape[0], keys.shape[0]), dtype=dtype)


_declare(
    "gather_rows", "(Tensor h, Tensor index, Tensor(a!) out) -> ()", ("out",),
    capture.gather_rows_reference, capture.gather_rows_triton, lambda h, index, out: None)

_declare(
    "covariance_update",
    "(Tensor(a!) acc, Tensor x, Tensor? row_index=None, Tensor? n_rows=None, bool accumulate=True) -> ()", ("acc",),
    covariance.covariance_update_reference, covariance.covariance_update_triton,
    lambda acc, x, row_index=None, n_rows=None, accumulate=True: None)

_declare(
    "gram", "(Tensor[] pieces) -> Tensor", (), gram.gram_reference, gram.gram_fp16x3,
    lambda pieces: pieces[0].new_empty(2 * (sum(p.shape[1] for p in pieces),), dtype=torch.float32))

_declare(
    "factor_scaled_cov", f"(Tensor cov, float lam, ScalarType dtype, int potrf_block={POTRF_BLOCK}) -> Tensor", (),
    native.factor_scaled_cov_reference,
    _native_or_reference(native.factor_scaled_cov_native, native.factor_scaled_cov_reference),
    lambda cov, lam, dtype, potrf_block=POTRF_BLOCK: cov.new_empty(cov.shape, dtype=dtype))

_DIRECT = (f"(Tensor cov, Tensor keys, float lam, ScalarType dtype, Tensor? resid=None, int potrf_block={POTRF_BLOCK}, "
           f"int potrs_block={POTRS_BLOCK}) -> Tensor")

_declare(
    "solve_cholesky", _DIRECT, (), native.solve_cholesky_reference,
    _native_or_reference(native.solve_cholesky_native, native.solve_cholesky_reference),
    lambda cov, keys, lam, dtype, resid=None, *blocks: _solve_fake(keys, dtype, resid))

_declare(
    "solve_mixed", _DIRECT, (), native.solve_mixed_reference,
    _native_or_reference(native.solve_mixed_native, native.solve_mixed_reference),
    lambda cov, keys, lam, dtype, resid=None, *blocks: _solve_fake(keys, dtype, resid))

_declare(
    "solve_woodbury",
    f"(Tensor factor, Tensor keys, ScalarType dtype, Tensor? resid=None, int potrf_block={POTRF_BLOCK}) -> Tensor", (),
    native.solve_woodbury_reference,
    _native_or_reference(native.solve_woodbury_native, native.solve_woodbury_reference),
    lambda factor, keys, dtype, resid=None, potrf_block=POTRF_BLOCK: _solve_fake(keys, dtype, resid))


def gather_rows(hidden: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None, *,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[i] = hidden[index[i] // S, index[i] % S] for hidden (B, S, d) or (S, d).

    index: (n,) int32/int64 flat positions b*S + s, on hidden's device. out: (n, d), any float
    dtype and strides (a view into a bigger buffer is fine); allocated (dtype, default
    hidden's) if None. The op memit_fast::gather_rows. Returns out.
    """
    h = hidden.unsqueeze(0) if hidden.dim() == 2 else hidden
    if h.dim() != 3 or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"need hidden (B, S, d) and index (n,) int; got {tuple(hidden.shape)}, {tuple(index.shape)} {index.dtype}")
    if out is None:
        out = torch.empty(len(index), h.shape[2], dtype=dtype or h.dtype, device=h.device)
    if out.shape != (len(index), h.shape[2]) or out.device != h.device or index.device != h.device:
        raise ValueError(f"out must be ({len(index)}, {h.shape[2]}) on {h.device}; got {tuple(out.shape)} on {out.device}")
    torch.ops.memit_fast.gather_rows(h, index, out)
    return out


class CovarianceAccumulator:
    """Running sum of x x^T and the number of rows, for one layer's keys.

    d: key size; device (an index-less "cuda" means the current CUDA device; `self.device`
    is always the indexed one that tensors report); dtype: dtype of the keys given to `add`
    (bf16, fp16 or fp32).
    Each chunk goes through memit_fast::covariance_update into a float32 buffer, folded into the
    float64 sum every `fold_tokens` rows (kernels/covariance.py). backend: "auto" (the op: the
    kernel on CUDA, the twin elsewhere), "triton" (the kernel, with `config` and
    `fp32_precision`; CUDA, or CPU under TRITON_INTERPRET=1) or "torch" (the twin). float64 keys
    are rounded to float32 first (the products are float32 in every backend). The state is
    `state()` = (sum (d, d) float64 whose lower triangle is valid, count int64): add both across
    shards to combine them.
    """

    def __init__(self, d: int, device=None, dtype: torch.dtype = torch.bfloat16, *, backend: str = "auto",
                 fold_tokens: int = 2**18, config: TileConfig | None = None, fp32_precision: str = "ieee"):
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be auto, triton or torch, not {backend!r}")
        self._sum = torch.zeros(d, d, dtype=torch.float64, device=device or "cpu")
        # the device of an allocated tensor: an index-less "cuda" becomes the current device (cuda:0)
        self.d, self.dtype, self.device, self.fold_tokens = d, dtype, self._sum.device, fold_tokens
        self._update = {
            "auto": torch.ops.memit_fast.covariance_update,
            "triton": functools.partial(covariance.covariance_update_triton, config=config, fp32_precision=fp32_precision),
            "torch": covariance.covariance_update_reference,
        }[backend]
        self._count = torch.zeros((), dtype=torch.int64, device=self.device)
        self._buf = torch.zeros(d, d, dtype=torch.float32, device=self.device)
        self._pending = 0  # rows (upper bound) in _buf since the last fold

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None, row_index: torch.Tensor | None = None) -> None:
        """Add the rows of x (..., d): all, those where mask (x's leading shape, bool) is True,
        or those listed in row_index (flat row numbers). No host synchronisation."""
        if x.shape[-1] != self.d or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"expected (..., {self.d}) {self.dtype} on {self.device}; got {tuple(x.shape)} {x.dtype} on {x.device}")
        if mask is not None and row_index is not None:
            raise ValueError("give mask or row_index, not both")
        if mask is not None and mask.shape != x.shape[:-1]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match x {tuple(x.shape)}")
        rows = x.reshape(-1, self.d)  # a view for the usual contiguous hidden states
        rows = rows.float() if rows.dtype == torch.float64 else rows
        n_rows = None
        if mask is not None:
            flat = mask.reshape(-1)
            row_index = torch.sort((~flat).to(torch.uint8), stable=True).indices  # masked rows first, in order
            n_rows = flat.sum(dtype=torch.int32).reshape(1)
        if self._pending + rows.shape[0] > self.fold_tokens and self._pending:
            self._fold()
        self._update(self._buf, rows, row_index, n_rows, self._pending > 0)
        self._pending += rows.shape[0] if row_index is None else len(row_index)
        self._count += n_rows[0] if n_rows is not None else (rows.shape[0] if row_index is None else len(row_index))

    def _fold(self) -> None:
        if self._pending:
            self._sum += self._buf  # entries the kernel never writes stay zero; the next add overwrites the rest
            self._pending = 0

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count): float64 (d, d) with the lower triangle valid, and the int64 row count."""
        self._fold()
        return self._sum, self._count

    @property
    def count(self) -> int:
        return int(self._count)

    @property
    def sum(self) -> torch.Tensor:
        """The full symmetric float64 sum of x x^T (d, d)."""
        lower = torch.tril(self.state()[0])
        return lower + torch.tril(lower, -1).mT

    def mean(self) -> torch.Tensor:
        """E[x x^T] = sum / count, float64 (d, d). Raises ValueError if nothing was added."""
        n = self.count
        if n == 0:
            raise ValueError("no rows were added")
        return self.sum / n
