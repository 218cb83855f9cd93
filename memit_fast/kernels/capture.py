"""Capture of hidden-state rows at (sequence, position) pairs, for forward hooks (docs/algorithm.md sections 2-3).

    out[i, :] = hidden[index[i] // S, index[i] % S, :]        hidden: (B, S, d), index: (n,)

One Triton launch reads only the n requested rows of `hidden` (any strides, so no contiguous copy
of the activations) and writes them, converted to out's dtype, into a preallocated buffer (e.g.
a slice of a per-layer key buffer). An index outside [0, B*S) gives a row of NaN, never a read
out of bounds. `gather_rows_triton` is the CUDA implementation of the op memit_fast::gather_rows
(memit_fast/ops.py), `gather_rows_reference` its twin (the CPU path).
"""

from __future__ import annotations

import torch

from ._triton import tl, triton


@triton.jit
def _gather_rows_kernel(
    h_ptr, idx_ptr, out_ptr,
    n, d, seq_len, n_flat,
    stride_b, stride_s, stride_d, stride_out, stride_out_d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_r, in_c = rows < n, cols < d
    flat = tl.load(idx_ptr + rows, mask=in_r, other=0).to(tl.int64)
    valid = (flat >= 0) & (flat < n_flat)
    flat = tl.where(valid, flat, 0)
    # ROW_ALIGN (checked on the host) tells the compiler rows start on 16 bytes: vector loads
    row_off = tl.multiple_of((flat // seq_len) * stride_b + (flat % seq_len) * stride_s, ROW_ALIGN)
    src = h_ptr + row_off[:, None] + cols[None, :].to(tl.int64) * stride_d
    v = tl.load(src, mask=valid[:, None] & in_c[None, :], other=float("nan"))
    dst = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :].to(tl.int64) * stride_out_d
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=in_r[:, None] & in_c[None, :])


def gather_rows_triton(h: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = h[index[i] // S, index[i] % S] for h (B, S, d), index (n,) int32/int64, out (n, d)
    any float dtype and strides; a bad index gives a NaN row. CUDA, or CPU under TRITON_INTERPRET=1."""
    if len(index) == 0 or h.shape[2] == 0:
        return
    B, S, d = h.shape
    block_r, block_d = 4, min(triton.next_power_of_2(d), 1024)
    vec = 16 // h.element_size()
    aligned = h.data_ptr() % 16 == 0 and h.stride(0) % vec == 0 and h.stride(1) % vec == 0
    _gather_rows_kernel[(triton.cdiv(len(index), block_r), triton.cdiv(d, block_d))](
        h, index, out, len(index), d, S, B * S, *h.stride(), *out.stride(),
        BLOCK_R=block_r, BLOCK_D=block_d, ROW_ALIGN=vec if aligned else 1, num_warps=4)


def gather_rows_reference(h: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """The twin: out.copy_(h[index // S, index % S]) for h (B, S, d); IndexError for a bad index."""
    B, S, _ = h.shape
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= B * S):
        raise IndexError(f"index outside [0, {B * S})")
    out.copy_(h[index // S, index % S])

