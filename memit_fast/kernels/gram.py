"""The products of the update solve, K K^T and K R^T (docs/algorithm.md section 5), at float32
accuracy on fp16 tensor cores ("fp16x3").

    S = X^T X,  X = [K^T | R^T] (n, d + m) float32:  S[:d, :d] = K K^T,  S[d:, :d] = R K^T

Each column j of X is scaled by a power of two s_j, so that max_t |x_tj s_j| lies in
[2^14, 2^15), and split into two fp16 parts, X D = H + L with H = fp16(X D) and
L = fp16(X D - H): together they hold X D to ~2^-23 relative (to 2^-25 absolute for entries
more than 2^17 below their column's maximum). Products of fp16 values are exact in fp32, so

    D S D ~ H^T H + H^T L + L^T H        (L^T L, ~2^-22 relative, is dropped)

summed in fp32 on the tensor cores: an error of about sqrt(3n) 2^-24 |X|^T |X|, as an fp32
product of X would have. It is one `syrk_lower_` over the 3n rows [H; H; L] against [H; L; H]
(the sum is symmetric, so its lower triangle is the answer), with D^-1 applied to each tile
before it is stored: 3 n p (p + 1) fp16 tensor-core flops for p = d + m, a third of what the
same accuracy costs as tf32x3 (Triton's three tf32 products at half the fp16 rate) or as a
three-way bf16 split (six products). `gram_fp16x3` is the CUDA implementation of the op
memit_fast::gram (memit_fast/ops.py), `gram_reference` its twin (the CPU path).
"""

from __future__ import annotations

import torch

from ._triton import tl, triton

from .covariance import TileConfig, syrk_lower_

# |x s| < 2^15 <= fp16's largest finite value 65504 also after H rounds up
_TOP_EXPONENT = 15


@triton.jit
def _split_fp16x3_kernel(
    x_ptr, scale_ptr, x1_ptr, x2_ptr,
    n, p, col0, stride_xr, stride_xc, stride_out, seg,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """x (n, p) times scale (p,): H = fp16(x s), L = fp16(x s - H) written to columns col0.. of
    x1 = [H; H; L] and x2 = [H; L; H] (3n rows each)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n)[:, None] & (cols < p)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_xr + cols.to(tl.int64)[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    xs = x * tl.load(scale_ptr + cols, mask=cols < p, other=1.0)[None, :]
    hi = xs.to(tl.float16)
    lo = (xs - hi.to(tl.float32)).to(tl.float16)
    at = r64 * stride_out + (col0 + cols)[None, :]  # seg = n * stride_out: the next block of n rows
    tl.store(x1_ptr + at, hi, mask=mask)
    tl.store(x1_ptr + seg + at, hi, mask=mask)
    tl.store(x1_ptr + 2 * seg + at, lo, mask=mask)
    tl.store(x2_ptr + at, hi, mask=mask)
    tl.store(x2_ptr + seg + at, lo, mask=mask)
    tl.store(x2_ptr + 2 * seg + at, hi, mask=mask)


def column_scales(x: torch.Tensor) -> torch.Tensor:
    """(p,) float32 powers of two s with max_t |x_tj| s_j in [2^14, 2^15) (2^15 for a zero column)."""
    _, e = torch.frexp(x.abs().amax(0).float())  # amax = f 2^e, f in [0.5, 1)
    return torch.ldexp(torch.ones(x.shape[1], device=x.device), (_TOP_EXPONENT - e).clamp(-126, 126))


def split_fp16x3(pieces: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x1, x2, inv): x1 = [H; H; L], x2 = [H; L; H] (3n, p) fp16 views with a 16-byte aligned
    row stride, and inv = 1/s (p,) float32, for X = the pieces side by side (each (n, p_i),
    float32/bf16/fp16, any strides)."""
    n = pieces[0].shape[0]
    if any(x.dim() != 2 or x.shape[0] != n or not x.is_floating_point() for x in pieces):
        raise ValueError(f"pieces must be (n, p_i) float tensors with one n; got {[tuple(x.shape) for x in pieces]}")
    p = sum(x.shape[1] for x in pieces)
    width = -(-p // 8) * 8  # rows of 16 bytes multiples: TMA descriptors
    dev = pieces[0].device
    x1 = torch.empty(3 * n, width, dtype=torch.float16, device=dev)
    x2 = torch.empty(3 * n, width, dtype=torch.float16, device=dev)
    inv = torch.empty(p, dtype=torch.float32, device=dev)
    col0 = 0
    for x in pieces:
        pi = x.shape[1]
        if pi and n:
            s = column_scales(x)
            inv[col0:col0 + pi] = 1.0 / s  # exact: powers of two
            block_r, block_c = 32, 64
            _split_fp16x3_kernel[(triton.cdiv(n, block_r), triton.cdiv(pi, block_c))](
                x, s, x1, x2, n, pi, col0, x.stride(0), x.stride(1), width, n * width, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
        col0 += pi
    return x1[:, :p], x2[:, :p], inv


def gram_fp16x3(pieces: list[torch.Tensor], *, config: TileConfig | None = None) -> torch.Tensor:
    """S = X^T X (p, p) float32, lower triangle valid (and the diagonal tiles whole), for X the
    pieces side by side (each (n, p_i)); about float32 accuracy (module docstring). CUDA, or the
    CPU under TRITON_INTERPRET=1."""
    x1, x2, inv = split_fp16x3(pieces)
    p = x1.shape[1]
    out = torch.empty(p, p, dtype=torch.float32, device=x1.device)
    if x1.shape[0] == 0:
        return out.zero_()
    return syrk_lower_(out, x1, y=x2, col_scale=inv, config=config)


def gram_reference(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The twin: X^T X (p, p) computed in float64, returned in float32, for X = the pieces side
    by side (each (n, p_i))."""
    x = torch.cat([t.double() for t in pieces], dim=1)
    return (x.mT @ x).float()
