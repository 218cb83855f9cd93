"""Capture of hidden-state rows at (sequence, position) pairs, for forward hooks (MEMIT.md 2-3).

    out[i, :] = hidden[index[i] // S, index[i] % S, :]        hidden: (B, S, d), index: (n,)

One Triton launch reads only the n requested rows of `hidden` (any strides, so no contiguous copy
of the activations) and writes them, converted to out's dtype, into a preallocated buffer (e.g.
a slice of a per-layer key buffer). An index outside [0, B*S) gives a row of NaN, never a read
out of bounds. `gather_rows_reference` is the torch twin (and the CPU path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def gather_rows(hidden: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None, *,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[i] = hidden[index[i] // S, index[i] % S] for hidden (B, S, d) or (S, d).

    index: (n,) int32/int64 flat positions b*S + s, on hidden's device. out: (n, d), any float
    dtype and strides (a view into a bigger buffer is fine); allocated (dtype, default
    hidden's) if None. CUDA: the Triton kernel; elsewhere the twin. Returns out.
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


def gather_rows_triton(h: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """The kernel launch (CUDA, or CPU under TRITON_INTERPRET=1); arguments as gather_rows, h 3-d."""
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


@torch.library.custom_op("memit_fast::gather_rows", mutates_args=("out",))
def _gather_rows_op(h: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    (gather_rows_triton if h.is_cuda else gather_rows_reference)(h, index, out)
