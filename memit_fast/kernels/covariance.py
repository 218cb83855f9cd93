"""Streaming second moment of key rows, S = sum_t x_t x_t^T (docs/algorithm.md section 4), on tensor cores.

`syrk_lower_` is the kernel: for a chunk X (N, d) (bf16, fp16 or fp32; optionally only the rows
listed in `row_index`, read in place) it computes the tiles of X^T X that touch the lower
triangle, fp32 accumulators, and stores them into (or adds them to) an fp32 buffer. Useful work
N d (d + 1) flops; the diagonal tiles are computed whole: 1% more work for 128x128 tiles, 3%
for 128x256.

`covariance_update_triton` is the CUDA implementation of the op memit_fast::covariance_update
(memit_fast/ops.py), `covariance_update_reference` its twin (the CPU path);
`memit_fast.ops.CovarianceAccumulator` streams chunks through the op. Precision: each chunk's products are summed
in fp32 on the tensor cores (bf16/fp16 inputs are exact in fp32 products); the fp32 buffer holds
at most `fold_tokens` (default 2^18) tokens before it is added into the float64 master sum, so no
fp32 sum runs over more than 2^18 terms (relative error ~ 2^18 * 2^-24 = 1.6e-2 worst case,
~1e-6 typical), and 44M tokens are summed in float64: no loss across chunks. The original sums
everything in fp32.

The state is the plain tensor pair (`sum` lower triangle in float64, `count` int64), so shards
of a corpus computed on several GPUs combine with torch.distributed.all_reduce on both (not
implemented here).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ._triton import TensorDescriptor, tl, triton


# Triton's interpreter (CPU tests) multiplies bf16 dot operands as their raw uint16 bits
# (triton 3.9); under it the kernel upcasts bf16 to fp32 first, which gives the same products.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group: int  # tile rows swept together, for L2 reuse of the column panels
    num_warps: int
    num_stages: int  # with row_index, 2 more: the index load takes pipeline stages of its own
    tma: bool = False  # load through TMA descriptors when there is no row_index and x allows it
    persistent: bool = False  # TMA only: one program per SM looping over tiles (flattened loop)


# A few candidates; benchmarks/kernels_device.py times each on the device.
CONFIGS = {
    "128x256-tma": TileConfig(128, 256, 64, 8, 8, 3, tma=True),
    "128x256": TileConfig(128, 256, 64, 8, 8, 3),
    "128x128-tma": TileConfig(128, 128, 64, 8, 8, 4, tma=True),
    # the flattened loop keeps an epilogue buffer beside the pipeline: 192 KB of shared memory
    # here, 272 KB (too much) for 128x256 with 3 stages
    "128x128-tma-persistent": TileConfig(128, 128, 64, 8, 8, 4, tma=True, persistent=True),
    "128x128": TileConfig(128, 128, 64, 8, 8, 4),
    "128x128-s3": TileConfig(128, 128, 64, 8, 8, 3),  # 96 KB of shared memory: two blocks per SM
    "fp32": TileConfig(128, 128, 32, 8, 8, 3),
}


def default_config(dtype: torch.dtype) -> TileConfig:
    return CONFIGS["fp32" if dtype == torch.float32 else "128x256-tma"]


@triton.jit
def _syrk_lower_kernel(
    x_ptr, y_ptr, rows_ptr, n_rows_ptr, out_ptr, tiles_ptr, scale_ptr,
    d, stride_x, stride_y, stride_out,
    HAS_ROWS: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program p: tile tiles[p] of X^T Y over the first n_rows rows of x and y (of x[rows] and
    y[rows] if HAS_ROWS); y is x for a plain X^T X."""
    pid = tl.program_id(0)
    tile_m = tl.load(tiles_ptr + 2 * pid)
    tile_n = tl.load(tiles_ptr + 2 * pid + 1)
    n_rows = tl.load(n_rows_ptr)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m, in_n = offs_m < d, offs_n < d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, n_rows, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        in_k = offs_k < n_rows
        if HAS_ROWS:
            rows = tl.load(rows_ptr + offs_k, mask=in_k, other=0).to(tl.int64)
        else:
            rows = offs_k.to(tl.int64)
        a = tl.load(x_ptr + rows[:, None] * stride_x + offs_m[None, :], mask=in_k[:, None] & in_m[None, :], other=0.0)  # (K, M)
        b = tl.load(y_ptr + rows[:, None] * stride_y + offs_n[None, :], mask=in_k[:, None] & in_n[None, :], other=0.0)  # (K, N)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    _write_tile(out_ptr, acc, offs_m, offs_n, d, stride_out, scale_ptr, ACCUMULATE, SCALE)


@triton.jit
def _syrk_lower_tma_kernel(
    a_desc, b_desc, n_rows_ptr, out_ptr, tiles_ptr, scale_ptr,
    d, stride_out, n_tiles,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FLATTEN: tl.constexpr,
    SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """As _syrk_lower_kernel without row_index, loading through the tensor memory accelerator
    (a_desc / b_desc: x / y with blocks (BLOCK_K, BLOCK_M) / (BLOCK_K, BLOCK_N), zero outside).
    Program p does tiles p, p + programs, ...: one each on a grid of n_tiles, or persistent on a
    grid of one per SM, where FLATTEN lets the next tile's loads overlap this tile's epilogue."""
    n_rows = tl.load(n_rows_ptr)
    for t in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=FLATTEN):
        tile_m = tl.load(tiles_ptr + 2 * t)
        tile_n = tl.load(tiles_ptr + 2 * t + 1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, n_rows, BLOCK_K):
            a = a_desc.load([k, tile_m * BLOCK_M])  # (K, M)
            b = b_desc.load([k, tile_n * BLOCK_N])  # (K, N)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _write_tile(out_ptr, acc, offs_m, offs_n, d, stride_out, scale_ptr, ACCUMULATE, SCALE)


@triton.jit
def _write_tile(out_ptr, acc, offs_m, offs_n, d, stride_out, scale_ptr, ACCUMULATE: tl.constexpr, SCALE: tl.constexpr):
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_out + offs_n[None, :]
    mask = (offs_m[:, None] < d) & (offs_n[None, :] < d)
    if SCALE:  # diag(c) acc diag(c): exact for powers of two
        acc = acc * tl.load(scale_ptr + offs_m, mask=offs_m < d, other=0.0)[:, None]
        acc = acc * tl.load(scale_ptr + offs_n, mask=offs_n < d, other=0.0)[None, :]
    if ACCUMULATE:  # a relaxed atomic add needs no second tile in registers; each tile has one owner
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, acc, mask=mask)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _tma_ok(x: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and row stride (and rows of 16 bytes or more here)."""
    return (x.shape[0] > 0 and x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0
            and x.shape[1] * x.element_size() >= 16)


@functools.lru_cache(maxsize=32)
def _tile_table(d: int, block_m: int, block_n: int, group: int, device: torch.device) -> torch.Tensor:
    """(tiles, 2) int32 (tile_m, tile_n) of every tile with an element on or below the diagonal,
    `group` tile rows at a time, column by column inside a group."""
    tm_count, tn_count = triton.cdiv(d, block_m), triton.cdiv(d, block_n)
    tiles = [
        (tm, tn)
        for g0 in range(0, tm_count, group)
        for tn in range(tn_count)
        for tm in range(g0, min(g0 + group, tm_count))
        if tm * block_m + block_m - 1 >= tn * block_n
    ]
    return torch.tensor(tiles, dtype=torch.int32, device=device)


def syrk_lower_(
    out: torch.Tensor,
    x: torch.Tensor,
    *,
    y: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
    n_rows: torch.Tensor | None = None,
    accumulate: bool = False,
    col_scale: torch.Tensor | None = None,
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """out[tiles on/below the diagonal] (+)= diag(c) X^T Y diag(c), fp32 accumulation, in place; returns out.

    out: (d, d) float32, unit column stride. x: (N, d) bf16/fp16/fp32, unit column stride.
    y: optional second operand, x's shape, dtype and device (default x: X^T X); X^T Y should be
    symmetric, since only its lower triangle is meaningful.
    row_index: optional (M,) int32/int64 rows of x (and y) to use (the others are not read).
    n_rows: optional int32/int64 device tensor of one element: use only the first n_rows rows
    (of row_index if given, else of x); lets a mask be applied without a host sync.
    col_scale: optional (d,) float32 c; the tile is scaled by c_i c_j before it is stored or added.
    Entries of `out` strictly above the diagonal are written only inside diagonal tiles (with
    their true values); the others are left as they were. fp32_precision: Triton's
    input_precision for fp32 inputs ("ieee" exact, "tf32x3" ~fp32, "tf32" ~1e-3 relative).
    """
    d = x.shape[-1]
    if x.dim() != 2 or out.shape != (d, d) or out.dtype != torch.float32:
        raise ValueError(f"need x (N, d) and out (d, d) float32; got {tuple(x.shape)}, {tuple(out.shape)} {out.dtype}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bf16, fp16 or fp32, not {x.dtype}")
    if x.stride(1) != 1 or out.stride(1) != 1 or x.device != out.device:
        raise ValueError("x and out need unit column stride and one device")
    if y is not None and (y.shape != x.shape or y.dtype != x.dtype or y.device != x.device or y.stride(1) != 1):
        raise ValueError(f"y must match x {tuple(x.shape)} {x.dtype} with unit column stride; got {tuple(y.shape)} {y.dtype}")
    if col_scale is not None and (col_scale.shape != (d,) or col_scale.dtype != torch.float32 or col_scale.device != x.device):
        raise ValueError(f"col_scale must be ({d},) float32 on {x.device}")
    y = x if y is None else y
    cfg = config or default_config(x.dtype)
    # TMA reads whole (BLOCK_K, BLOCK) boxes, zero past the end of x: only for all rows of x
    use_tma = cfg.tma and row_index is None and n_rows is None and _tma_ok(x) and _tma_ok(y)
    rows = row_index if row_index is not None else x.new_empty(0, dtype=torch.int32)
    if n_rows is None:
        n_rows = torch.full((1,), len(rows) if row_index is not None else x.shape[0], dtype=torch.int32, device=x.device)
    tiles = _tile_table(d, cfg.block_m, cfg.block_n, cfg.group, x.device)
    common = dict(
        ACCUMULATE=accumulate,
        PRECISION=fp32_precision if x.dtype == torch.float32 else "ieee",
        UPCAST=x.dtype == torch.bfloat16 and INTERPRET,
        SCALE=col_scale is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
    )
    scale = col_scale if col_scale is not None else out  # not read without SCALE
    if use_tma:
        a_desc = TensorDescriptor.from_tensor(x, [cfg.block_k, cfg.block_m])
        b_desc = TensorDescriptor.from_tensor(y, [cfg.block_k, cfg.block_n])
        programs = min(len(tiles), _sm_count(x.device)) if cfg.persistent else len(tiles)
        _syrk_lower_tma_kernel[(programs,)](
            a_desc, b_desc, n_rows, out, tiles, scale, d, out.stride(0), len(tiles), FLATTEN=cfg.persistent,
            num_stages=cfg.num_stages, **common)
    else:
        _syrk_lower_kernel[(len(tiles),)](
            x, y, rows, n_rows, out, tiles, scale, d, x.stride(0), y.stride(0), out.stride(0), HAS_ROWS=row_index is not None,
            num_stages=cfg.num_stages + (2 if row_index is not None else 0), **common)
    return out


def covariance_update_triton(acc: torch.Tensor, x: torch.Tensor, row_index: torch.Tensor | None = None,
                             n_rows: torch.Tensor | None = None, accumulate: bool = True, *,
                             config: TileConfig | None = None, fp32_precision: str = "ieee") -> None:
    """acc (d, d) float32, lower triangle (+)= X^T X over the selected rows of x (N, d): the
    kernel; arguments as syrk_lower_ (covariance_update_reference says which rows)."""
    syrk_lower_(acc, x, row_index=row_index, n_rows=n_rows, accumulate=accumulate, config=config,
                fp32_precision=fp32_precision)


def covariance_update_reference(acc: torch.Tensor, x: torch.Tensor, row_index: torch.Tensor | None = None,
                                n_rows: torch.Tensor | None = None, accumulate: bool = True) -> None:
    """The twin: acc (d, d) (+)= X^T X, products and sums in float32 (the kernel's), X the rows of
    x (N, d) listed in row_index (all if None), of those the first n_rows ((1,) int tensor) if
    given. The whole of acc is written; only its lower triangle is the op's result."""
    rows = x if row_index is None else x[row_index]
    rows = (rows if n_rows is None else rows[: int(n_rows.reshape(-1)[0])]).float()
    prod = (rows.mT @ rows).to(acc.dtype)
    if accumulate:
        acc.add_(prod)
    else:
        acc.copy_(prod)
