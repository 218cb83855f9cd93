"""Attention of z's rows over their cached prefix and their own tokens, in one Triton kernel
forward and one backward (docs/algorithm.md section 6.2).

A z row is a few suffix queries (S ~ 4) over a cached prefix of ~20-40 keys. The twin,
`layouts.base.prefix_attention`, forms the scores with batched matrix products of those thin
matrices in float32 (cuBLAS, a float32 copy of the cached keys), then mask, scale, softmax and the
products with the values as separate kernels, and autograd keeps the float32 scores and
probabilities. Here one program holds a row's queries of one key/value head (HEADS of its query
heads stacked as rows: grouped-query heads read their key/value head once) and streams the
prefix's keys and values once through an online softmax, then the row's own keys (causal part).
Forward keeps only the log-sum-exp per query; backward recomputes the probabilities, reading the
prefix twice more (the second time mostly from the caches): once for delta = sum_j p_j dp_j in
float32, once for dq. The cache stays in the model's dtype.

    o[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . key_j) value_j,  key_j over prefix j < P
                 then own j < S, allowed where mask[b, 0, i, j]

Precision: bf16/fp16 inputs, products on the tensor cores accumulated in float32 (exact
products, as the twin's float32 matmuls of the same inputs), softmax in float32, probabilities cast
to the values' dtype for the products with values (as the twin does); backward forms dS in float32
and multiplies it as the sum of two bf16/fp16 parts (the twin multiplies it in float32; one
rounding to bf16, as flash attention does, tripled dq's error against float64).
Gradients flow to q and the rows' own k and v, never to the cached prefix (made without gradients).
"""

from __future__ import annotations

import logging

import torch

from ._triton import HAVE_TRITON, tl, triton
from .covariance import INTERPRET

MAX_SUFFIX = 64  # longer suffixes (never z's) go to the twin: a row's queries are one tile
MAX_HEAD_DIM = 256
log = logging.getLogger(__name__)
_compiled: dict = {}  # (tile configuration, dtype, device) -> None once both kernels ran, else the compiler's error


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """float32 x in `dtype`, rounded to nearest even. Triton's interpreter (UPCAST) truncates
    float32 to bf16 (triton 3.9), so there the rounding is done on the bits first."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in float32; under the interpreter (UPCAST) of the operands as float32
    (its bf16 products are wrong), after the same roundings to the inputs' dtype as on a GPU."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _dot_split(a, b, UPCAST: tl.constexpr):
    """a @ b for float32 a and b in bf16/fp16: a as the sum of two numbers in b's dtype (the
    rounded one and its remainder), two products on the tensor cores, ~16 bits of a kept."""
    hi = _cast(a, b.dtype, UPCAST)
    lo = _cast(a - hi.to(tl.float32), b.dtype, UPCAST)
    return _dot(hi, b, UPCAST) + _dot(lo, b, UPCAST)


@triton.jit
def _key_block(q, k_base, v_base, sk_s, sk_d, sv_s, sv_d, m_rows, sm_k, col0, n0, n_keys, rows_ok, offs_d, d_ok, scale,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Keys n0.. of n_keys (mask columns col0 + n): (k, v, the scaled scores q k^T, where the
    queries may attend)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_keys
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * sk_s + offs_d[None, :] * sk_d, mask=kv_ok, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * sv_s + offs_d[None, :] * sv_d, mask=kv_ok, other=0.0)
    s = _dot(q, tl.trans(k), UPCAST) * scale
    allowed = tl.load(m_rows[:, None] + (col0 + offs_n)[None, :] * sm_k, mask=rows_ok[:, None] & n_ok[None, :], other=0)
    return k, v, s, allowed != 0


@triton.jit
def _fwd_block(q, m_i, l_i, acc, k_base, v_base, sk_s, sk_d, sv_s, sv_d, m_rows, sm_k, col0, n0, n_keys,
               rows_ok, offs_d, d_ok, scale, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """One block of keys n0.. of n_keys (mask columns col0 + n) folded into the running softmax."""
    k, v, s, allowed = _key_block(q, k_base, v_base, sk_s, sk_d, sv_s, sv_d, m_rows, sm_k, col0, n0, n_keys, rows_ok, offs_d, d_ok,
                                  scale, BLOCK_N, UPCAST)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no allowed key yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, UPCAST), v, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _program(H_kv, S, D, REP: tl.constexpr, HEADS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b * H_kv + g, sub) holds query heads g * REP + sub * HEADS .. + HEADS - 1 of row b
    as HEADS * BLOCK_S rows (row r: that head's query r % BLOCK_S). Returns (b, g, sub, each row's
    query s and head, rows_ok, offs_d, d_ok)."""
    b, g, sub = tl.program_id(0) // H_kv, tl.program_id(0) % H_kv, tl.program_id(1)
    b = b.to(tl.int64)
    r = tl.arange(0, HEADS * BLOCK_S)
    j, s = sub * HEADS + r // BLOCK_S, r % BLOCK_S
    rows_ok = (j < REP) & (s < S)
    head = g * REP + j
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    return b, g, sub, s, head, rows_ok, offs_d, d_ok


@triton.jit
def _prefix_attention_fwd(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, o_ptr, lse_ptr,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    spk_b, spk_h, spk_s, spk_d, spv_b, spv_h, spv_s, spv_d, sm_b, sm_s, sm_k, so_b, so_h, so_s,
    H_kv, S, P, D, scale,
    REP: tl.constexpr, HEADS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    """The output and log-sum-exp of the program's queries (`_program`)."""
    b, g, sub, s, head, rows_ok, offs_d, d_ok = _program(H_kv, S, D, REP, HEADS, BLOCK_S, BLOCK_D)
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + s[:, None] * sq_s + offs_d[None, :] * sq_d,
                mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    m_rows = mask_ptr + b * sm_b + s * sm_s
    m_i = tl.full([HEADS * BLOCK_S], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS * BLOCK_S], tl.float32)
    acc = tl.zeros([HEADS * BLOCK_S, BLOCK_D], tl.float32)
    pk, pv = pk_ptr + b * spk_b + g * spk_h, pv_ptr + b * spv_b + g * spv_h
    for n0 in range(0, P, BLOCK_N):
        m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, pk, pv, spk_s, spk_d, spv_s, spv_d, m_rows, sm_k, 0, n0, P,
                                   rows_ok, offs_d, d_ok, scale, BLOCK_N, UPCAST)
    m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, k_ptr + b * sk_b + g * sk_h, v_ptr + b * sv_b + g * sv_h, sk_s, sk_d,
                               sv_s, sv_d, m_rows, sm_k, P, 0, S, rows_ok, offs_d, d_ok, scale, BLOCK_S, UPCAST)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(o_ptr + b * so_b + head[:, None] * so_h + s[:, None] * so_s + offs_d[None, :], _cast(o, o_ptr.dtype.element_ty, UPCAST),
             mask=rows_ok[:, None] & d_ok[None, :])
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_safe)
    tl.store(lse_ptr + (b * H_kv * REP + head) * S + s, lse, mask=rows_ok)


@triton.jit
def _probabilities(q, do, lse, k_base, v_base, sk_s, sk_d, sv_s, sv_d, m_rows, sm_k, col0, n0, n_keys, rows_ok, offs_d,
                   d_ok, scale, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """(k, p, dp) of one block of keys: the keys, the probabilities recomputed from the saved
    log-sum-exp, and dp = do . v (float32)."""
    k, v, s, allowed = _key_block(q, k_base, v_base, sk_s, sk_d, sv_s, sv_d, m_rows, sm_k, col0, n0, n_keys, rows_ok, offs_d, d_ok,
                                  scale, BLOCK_N, UPCAST)
    p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
    return k, p, _dot(do, tl.trans(v), UPCAST)


@triton.jit
def _bwd_block(q, do, lse, delta, dq, k_base, v_base, sk_s, sk_d, sv_s, sv_d, m_rows, sm_k, col0, n0, n_keys,
               rows_ok, offs_d, d_ok, scale, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """One block of keys: dq accumulated, and this block's probabilities p and score gradients ds."""
    k, p, dp = _probabilities(q, do, lse, k_base, v_base, sk_s, sk_d, sv_s, sv_d, m_rows, sm_k, col0, n0, n_keys,
                              rows_ok, offs_d, d_ok, scale, BLOCK_N, UPCAST)
    ds = p * (dp - delta[:, None])
    dq += _dot_split(ds, k, UPCAST)
    return dq, p, ds


@triton.jit
def _prefix_attention_bwd(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    spk_b, spk_h, spk_s, spk_d, spv_b, spv_h, spv_s, spv_d, sm_b, sm_s, sm_k, so_b, so_h, so_s,
    sdq_b, sdq_h, sdq_s, sdq_d, sdk_u, sdk_b, sdk_h, sdk_s, sdv_u, sdv_b, sdv_h, sdv_s,
    H_kv, S, P, D, scale,
    REP: tl.constexpr, HEADS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    """dq of the program's queries; dk, dv of the row's own keys summed over its HEADS query heads
    (written to slot `sub`; the caller sums the slots of a group split over several programs)."""
    b, g, sub, s, head, rows_ok, offs_d, d_ok = _program(H_kv, S, D, REP, HEADS, BLOCK_S, BLOCK_D)
    ok = rows_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + s[:, None] * sq_s + offs_d[None, :] * sq_d, mask=ok, other=0.0)
    do = tl.load(do_ptr + b * so_b + head[:, None] * so_h + s[:, None] * so_s + offs_d[None, :], mask=ok, other=0.0)
    lse = tl.load(lse_ptr + (b * H_kv * REP + head) * S + s, mask=rows_ok, other=0.0)
    m_rows = mask_ptr + b * sm_b + s * sm_s
    pk, pv = pk_ptr + b * spk_b + g * spk_h, pv_ptr + b * spv_b + g * spv_h
    k_own, v_own = k_ptr + b * sk_b + g * sk_h, v_ptr + b * sv_b + g * sv_h
    # delta = sum_j p_j dp_j = do . o, from the probabilities (a first pass over the keys, from the
    # caches) rather than the stored output, whose rounding to bf16 would enter every dS
    delta = tl.zeros([HEADS * BLOCK_S], tl.float32)
    # (names inside the loops differ from those after them: a block's shapes differ from the own keys')
    for n0 in range(0, P, BLOCK_N):
        _k, p_blk, dp_blk = _probabilities(q, do, lse, pk, pv, spk_s, spk_d, spv_s, spv_d, m_rows, sm_k, 0, n0, P, rows_ok,
                                           offs_d, d_ok, scale, BLOCK_N, UPCAST)
        delta += tl.sum(p_blk * dp_blk, 1)
    _k, p_own, dp_own = _probabilities(q, do, lse, k_own, v_own, sk_s, sk_d, sv_s, sv_d, m_rows, sm_k, P, 0, S, rows_ok,
                                       offs_d, d_ok, scale, BLOCK_S, UPCAST)
    delta += tl.sum(p_own * dp_own, 1)
    dq = tl.zeros([HEADS * BLOCK_S, BLOCK_D], tl.float32)
    for n0 in range(0, P, BLOCK_N):
        dq, _p, _ds = _bwd_block(q, do, lse, delta, dq, pk, pv, spk_s, spk_d, spv_s, spv_d, m_rows, sm_k, 0, n0, P,
                               rows_ok, offs_d, d_ok, scale, BLOCK_N, UPCAST)
    dq, p, ds = _bwd_block(q, do, lse, delta, dq, k_own, v_own, sk_s, sk_d, sv_s, sv_d, m_rows, sm_k, P, 0, S, rows_ok,
                           offs_d, d_ok, scale, BLOCK_S, UPCAST)
    tl.store(dq_ptr + b * sdq_b + head[:, None] * sdq_h + s[:, None] * sdq_s + offs_d[None, :] * sdq_d,
             _cast(dq * scale, dq_ptr.dtype.element_ty, UPCAST), mask=ok)
    dk = _dot_split(tl.trans(ds), q, UPCAST) * scale  # (BLOCK_S own keys, BLOCK_D)
    dv = _dot(tl.trans(_cast(p, do.dtype, UPCAST)), do, UPCAST)
    n = tl.arange(0, BLOCK_S)
    own_ok = (n < S)[:, None] & d_ok[None, :]
    tl.store(dk_ptr + sub * sdk_u + b * sdk_b + g * sdk_h + n[:, None] * sdk_s + offs_d[None, :], _cast(dk, dk_ptr.dtype.element_ty, UPCAST), mask=own_ok)
    tl.store(dv_ptr + sub * sdv_u + b * sdv_b + g * sdv_h + n[:, None] * sdv_s + offs_d[None, :], _cast(dv, dv_ptr.dtype.element_ty, UPCAST), mask=own_ok)


def _tiles(S: int, D: int, rep: int) -> dict:
    """Tile sizes: a row's queries padded to 16 at least (tl.dot's smallest), up to 64 query rows
    per program (HEADS heads of the group), key blocks of 32 for 256-wide heads, else 64."""
    block_s = max(16, triton.next_power_of_2(S))
    heads = 1
    while heads * 2 <= rep and heads * 2 * block_s <= 64:
        heads *= 2
    block_d = max(16, triton.next_power_of_2(D))
    return dict(REP=rep, HEADS=heads, BLOCK_S=block_s, BLOCK_N=32 if block_d >= 256 else 64, BLOCK_D=block_d, UPCAST=INTERPRET)


def _mask_view(mask: torch.Tensor) -> torch.Tensor:
    """(B, S, P + S) uint8 view of the bool mask (B, 1, S, P + S) (any strides, broadcast ones too)."""
    return mask[:, 0].view(torch.uint8)


class _PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, mask, scale):
        B, H, S, D = q.shape
        H_kv, P = k.shape[1], pk.shape[2]
        t = _tiles(S, D, H // H_kv)
        m = _mask_view(mask)
        o = q.new_empty(B, S, H, D)  # the layout the output projection reads: o.flatten(2) is free
        lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
        grid = (B * H_kv, triton.cdiv(t["REP"], t["HEADS"]))
        _prefix_attention_fwd[grid](
            q, k, v, pk, pv, m, o, lse, *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(), *m.stride(),
            o.stride(0), o.stride(2), o.stride(1), H_kv, S, P, D, scale, **t, num_warps=4)
        ctx.save_for_backward(q, k, v, pk, pv, m, lse)
        ctx.scale, ctx.tiles, ctx.grid = scale, t, grid
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, pk, pv, m, lse = ctx.saved_tensors
        do = do.contiguous()
        B, H, S, D = q.shape
        H_kv, P = k.shape[1], pk.shape[2]
        n_sub = ctx.grid[1]
        dq = torch.empty_like(q)
        # the own keys' gradients: one slot per program of a key/value head, summed below
        slot = (n_sub, *k.shape)
        dk = k.new_empty(k.shape).unsqueeze(0) if n_sub == 1 else torch.empty(slot, dtype=torch.float32, device=k.device)
        dv = v.new_empty(v.shape).unsqueeze(0) if n_sub == 1 else torch.empty(slot, dtype=torch.float32, device=v.device)
        _prefix_attention_bwd[ctx.grid](
            q, k, v, pk, pv, m, do, lse, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(),
            *m.stride(), do.stride(0), do.stride(2), do.stride(1), *dq.stride(), *dk.stride()[:4], *dv.stride()[:4],
            H_kv, S, P, D, ctx.scale, **ctx.tiles, num_warps=4)
        dk, dv = (dk[0], dv[0]) if n_sub == 1 else (dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype))
        return dq, dk, dv, None, None, None, None


def supported(q: torch.Tensor, past) -> bool:
    """Whether `prefix_attention_triton` runs these inputs: Triton on q's device (CUDA, or the CPU
    under TRITON_INTERPRET=1), bf16/fp16 queries and a cache of the same dtype without gradients,
    heads of at most MAX_HEAD_DIM, suffixes of at most MAX_SUFFIX tokens."""
    pk, pv = past
    return (HAVE_TRITON and (q.is_cuda or INTERPRET) and q.dtype in (torch.bfloat16, torch.float16)
            and pk.dtype == pv.dtype == q.dtype and not (pk.requires_grad or pv.requires_grad)
            and q.shape[-1] <= MAX_HEAD_DIM and q.shape[2] <= MAX_SUFFIX)


def _compiler_errors() -> tuple[type, ...]:
    try:
        from triton.errors import TritonError

        return (TritonError,)
    except ImportError:  # older Triton: no common base class
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        return (CompilationError, OutOfResources)


def compiles(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether both kernels compile and run for the tile configuration, dtype and device of q
    (B, H, S, h_d) and k (B, H_kv, S, h_d): tried once per configuration on one row of one
    key/value head (a GPU or a Triton that cannot compile them: a warning, and False from then on,
    so the caller runs the twin)."""
    B, H, S, D = q.shape
    tiles = _tiles(S, D, H // k.shape[1])
    key = (tuple(tiles.items()), q.dtype, q.device)
    if key not in _compiled:
        rep = tiles["REP"]
        x = lambda *shape: torch.ones(*shape, dtype=q.dtype, device=q.device)  # noqa: E731  (no draw from the RNG)
        qq, kk, vv = x(1, rep, S, D).requires_grad_(), x(1, 1, S, D).requires_grad_(), x(1, 1, S, D).requires_grad_()
        mask = torch.ones(1, 1, S, S + 1, dtype=torch.bool, device=q.device).tril(1)
        try:
            with torch.enable_grad():
                prefix_attention_triton(qq, kk, vv, (x(1, 1, 1, D), x(1, 1, 1, D)), mask).sum().backward()
            _compiled[key] = None
        except _compiler_errors() as e:
            _compiled[key] = e
            log.warning("the prefix-attention kernels do not compile here (%s: %s); z's attention runs in "
                        "float32 batched products instead", type(e).__name__, " ".join(str(e).split())[:300])
    return _compiled[key] is None


def prefix_attention_triton(q, k, v, past, mask, scale=None) -> torch.Tensor:
    """`layouts.base.prefix_attention` (the twin: same arguments, same result up to rounding) in
    two kernels. q (B, H, S, h_d); k, v (B, H_kv, S, h_d) the rows' own; past (k, v) (B, H_kv, P,
    h_d) the prefix's; mask (B, 1, S, P + S) bool. Returns (B, H, S, h_d), a view of a (B, S, H,
    h_d) tensor. Check `supported` and `compiles` first."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _PrefixAttention.apply(q, k, v, past[0], past[1], mask, float(scale)).transpose(1, 2)
