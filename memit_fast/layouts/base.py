"""The forward pass of a causal LM, owned by memit_fast: embeddings, blocks i..j over given hidden
states (with a per-layer prefix key/value cache), the final norm and the head, computed from the
model's own modules and weights (nothing is copied), attention through
`torch.nn.functional.scaled_dot_product_attention` in the model's dtype.

A family file (gpt2.py, gptj.py, neox.py, llama.py) says how one block is built: its norms, its
query/key/value projections and rotary embedding, its MLP split at the key (the input of the
MLP output projection W_out, docs/algorithm.md section 3), and whether attention and MLP run in
parallel. Everything the stages need (statistics, keys, z) is written once here on top of that.
Shapes: B rows, S tokens, P prefix tokens, d = d_model, H heads, h_d head size.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def fused_activation(act: nn.Module):
    """The MLP activation as one fused kernel where transformers spells it out element by element:
    GELU's tanh form (`gelu_new`, GPT-2 and GPT-J: eight eager kernels, each keeping its input for
    the backward pass) is F.gelu(approximate="tanh"), the same function up to rounding."""
    if type(act).__name__ == "NewGELUActivation":
        return functools.partial(F.gelu, approximate="tanh")
    return act


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Attention scores are formed in float32 at least (as fused attention kernels do)."""
    return torch.promote_types(dtype, torch.float32)


def grouped_softmax(scores: torch.Tensor, mask: torch.Tensor, scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    """Attention probabilities (B, H_kv, rep * S, K) in `dtype` from scores (B, H_kv, rep, S, K) in
    `score_dtype` (query heads grouped by their key/value head), mask (B, 1, S, K) bool (True: may
    attend) and the scores' scale."""
    B, H_kv, rep, S, K = scores.shape
    scores = scores.masked_fill(~mask[:, :, None], float("-inf")) * scale
    return scores.softmax(-1).to(dtype).view(B, H_kv, rep * S, K)


def prefix_attention(q, k, v, past, mask, scale=None) -> torch.Tensor:
    """Attention of rows over their cached prefix and their own tokens, without joining the two:
    the prefix's keys and values are read in place (no copy per step, no gradient for them), and
    grouped-query heads share their key/value head without repeating it.

    q (B, H, S, h_d); k, v (B, H_kv, S, h_d): the rows' own; past: the prefix's (k (B, H_kv, P, h_d),
    kept in `score_dtype` by SuffixRunner so no step converts it, v (B, H_kv, P, h_d)); mask (B, 1,
    S, P + S) bool, True where a query may attend. Scores and softmax in `score_dtype`, the
    probabilities cast to v's dtype for the products with v. Returns (B, H, S, h_d)."""
    B, H, S, hd = q.shape
    H_kv, P = k.shape[1], past[0].shape[2]
    f = score_dtype(q.dtype)
    qg = q.reshape(B, H_kv, H // H_kv * S, hd).to(f)  # query heads h_kv*rep .. h_kv*rep + rep - 1 read kv head h_kv
    scores = torch.cat([qg @ past[0].to(f).transpose(-1, -2), qg @ k.to(f).transpose(-1, -2)], dim=-1)
    p = grouped_softmax(scores.view(B, H_kv, H // H_kv, S, P + S), mask, hd**-0.5 if scale is None else scale, v.dtype)
    o = p[..., :P] @ past[1] + p[..., P:] @ v
    return o.view(B, H, S, hd)


def prefix_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether attention over a cached prefix runs the Triton kernels of
    kernels/prefix_attention.py: on a GPU with tensor cores for the dtype (bf16: compute capability
    8.0 or more; fp16: 7.0), MEMIT_FAST_ATTENTION_KERNEL not 0."""
    from ..config import env_setting
    from ..kernels._triton import HAVE_TRITON

    if not env_setting("MEMIT_FAST_ATTENTION_KERNEL"):  # read first: a bad value is an error on the CPU too
        return False
    if device.type != "cuda" or not HAVE_TRITON or dtype not in (torch.bfloat16, torch.float16):
        return False
    return torch.cuda.get_device_capability(device) >= ((8, 0) if dtype == torch.bfloat16 else (7, 0))


def cache_key_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a cached prefix keeps its keys in for a model of `dtype` on `device`: the model's
    own for the Triton kernels, else the twin's scores' dtype (converted once, not at every read)."""
    return dtype if prefix_kernel(device, dtype) else score_dtype(dtype)


def attend_prefix(q, k, v, past, mask, scale=None) -> torch.Tensor:
    """`prefix_attention` (same arguments and result), through its Triton kernels where
    `prefix_kernel` says so, they take these shapes and they compile here, else the twin itself."""
    from ..kernels import prefix_attention as kernel

    if prefix_kernel(q.device, q.dtype) and kernel.supported(q, past) and kernel.compiles(q, k):
        return kernel.prefix_attention_triton(q, k, v, past, mask, scale)
    return prefix_attention(q, k, v, past, mask, scale)


@dataclass
class Context:
    """The attention inputs of one batch, shared by every block.

    positions: (B, S) absolute positions of the rows' tokens. mask: None for causal attention over
    the rows alone (exact at every real token of right-padded rows), else (B, 1, S, P + S) bool,
    True where a query may attend (the real prefix tokens, then the causal part of the rows).
    rope: the family's rotary tables for these positions (None for learned positions).
    fused: attention over a cached prefix runs `fused.fused_attention` (z's steps on a GPU).
    windowed: for each sliding window w of the model that these rows exceed, `mask` (or the causal
    mask) narrowed to the keys less than w positions before the query."""

    positions: torch.Tensor
    mask: torch.Tensor | None
    rope: tuple[torch.Tensor, torch.Tensor] | None
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)
    fused: bool = False  # attention over a cached prefix through the compiled kernels of fused.py
    copies: dict = field(default_factory=dict, repr=False)  # device -> this context there (a model split over GPUs)

    def on(self, device: torch.device) -> "Context":
        """This context with its tensors on `device` (made once per device, for a model split over GPUs)."""
        if self.positions.device == device:
            return self
        if device not in self.copies:
            moved = {f.name: _to_device(getattr(self, f.name), device) for f in dataclasses.fields(self) if f.name != "copies"}
            self.copies[device] = Context(**moved)
        return self.copies[device]


def _to_device(x, device):
    """Tensors, alone or in tuples, lists and dicts, on `device`; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(t, device) for t in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


@dataclass
class PrefixCache:
    """Keys and values of a prefix, per layer (B, H_kv, P, h_d) after the rotary embedding, and its
    mask (B, P) (1 = real token); positions (B, P): each key slot's position, None when the real
    tokens come first (0..P-1). Rows are selected once when the batch shrinks, not every step."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    positions: torch.Tensor | None = None

    @property
    def length(self) -> torch.Tensor:
        """(B,) real prefix tokens per row: the position of the row's first suffix token."""
        return self.mask.sum(1)

    def select(self, rows: torch.Tensor) -> "PrefixCache":
        kv = {i: (k[rows.to(k.device)], v[rows.to(v.device)]) for i, (k, v) in self.kv.items()}
        return PrefixCache(kv, self.mask[rows], None if self.positions is None else self.positions[rows])

    def keep_layers(self, layers) -> "PrefixCache":
        keep = set(layers)
        return PrefixCache({i: kv for i, kv in self.kv.items() if i in keep}, self.mask, self.positions)


class HeadAccess:
    """Where the model's parameters live, read off its output head (`self.lm_head`)."""

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype


class Layout(HeadAccess):
    """A decoder-only transformer run block by block. Subclasses set `blocks`, `final_norm`,
    `lm_head`, `n_heads`, `n_kv_heads`, `head_dim`, `parallel` and implement the family hooks
    below (`embed`, `rope`, `project`, `rotate`, `attn_out`, `norm_attn`, `norm_mlp`, `mlp_key`, `mlp_out`)."""

    family = ""
    parallel = False  # attention and MLP read the same block input (GPT-J, NeoX parallel residual)
    # attention over a cached prefix by `prefix_attention` (True), or by SDPA after joining the
    # prefix's keys and values to the rows' own (False: kept for benchmarks/z_probe.py's comparison)
    split_prefix_attention = True
    # z's steps read each context template's keys and values held once per chunk
    # (`shared_suffix_runner`, True), or a cache of every row's prefix (False, the default). Measured
    # on an H200 (GPT-J, benchmarks/NOTES.md, session 3): at the default chunking the per-row cache
    # ran 174 TFLOP/s, the shared one 152; at 4,096-token chunks the shared one ran 179 (per-row 170)
    # in 25% less memory; since then the per-row cache's steps run the Triton kernels, the shared
    # one's do not (benchmarks/z_probe.py --prefix shared,per-row compares them)
    shared_prefix = False
    # the per-row cache is built from the context templates' keys and values computed once per
    # chunk and copied into each row (`template_suffix_runner`, True), or from every row's whole
    # prefix (False): the same cache; the templates' tokens are ~60% of a CounterFact request's
    # prefix tokens (benchmarks/NOTES.md, session 7)
    prefix_from_templates = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ---- sizes ----
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    # ---- family hooks ----
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rope(self, h: torch.Tensor, positions: torch.Tensor):
        return None

    def project(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q (B, H, S, h_d), k, v (B, H_kv, S, h_d)) of block i's normed input x, before any rotary."""
        raise NotImplementedError

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k with the rotary embedding `rope` applied (as they are for learned positions)."""
        return q, k

    def qkv(self, i: int, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) of block i's normed input x, rotary applied."""
        q, k, v = self.project(i, x)
        return (*self.rotate(q, k, rope), v)

    def attn_out(self, i: int, o: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attn_scale(self, i: int) -> float | None:
        return None  # SDPA's default 1/sqrt(h_d)

    def window(self, i: int) -> int | None:
        """Block i's sliding attention window w (a query sees the keys less than w positions before
        it), None for full causal attention."""
        return None

    def norm_attn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def norm_mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp_key(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP's hidden (B, S, d_ff): the input of W_out, MEMIT's key."""
        raise NotImplementedError

    def mlp_out(self, i: int, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def w_out(self, i: int) -> nn.Module:
        """Block i's MLP output projection, the module MEMIT edits."""
        raise NotImplementedError

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states after the last block -> logits."""
        return self.lm_head(self.final_norm(h))

    # ---- one block ----
    def context(self, h: torch.Tensor, positions: torch.Tensor, prefix_mask: torch.Tensor | None = None, prefix_positions: torch.Tensor | None = None) -> Context:
        """Attention inputs for rows of hidden states h (B, S, d) at `positions` (B, S), after an
        optional prefix (mask (B, P)) whose key slots sit at `prefix_positions` (B, P) (default
        0..P-1: the real tokens first; only sliding windows read them)."""
        (B, S), P = positions.shape, 0 if prefix_mask is None else prefix_mask.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=positions.device).tril().expand(B, 1, S, S)
        mask = None
        if prefix_mask is not None:
            mask = torch.cat([prefix_mask.bool()[:, None, None, :].expand(-1, 1, S, -1), causal], dim=-1)
        windowed = {}
        # positions run on from the prefix's real tokens, so no key is P + S or more positions back
        for w in {self.window(i) for i in range(self.n_layers)} - {None}:
            if P + S > w:
                before = torch.arange(P, device=positions.device).expand(B, P) if prefix_positions is None else prefix_positions
                keys = torch.cat([before, positions], dim=1)
                near = (positions[:, :, None] - keys[:, None, :]) < w
                windowed[w] = (causal if mask is None else mask) & near[:, None]
        return Context(positions, mask, self.rope(h, positions), windowed)

    def attention(self, i: int, x: torch.Tensor, ctx: Context, past=None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Block i's attention output (B, S, d) and this call's (k, v) (before the prefix is joined;
        None on the fused path, whose callers, z's steps, never keep them)."""
        mask = ctx.windowed.get(self.window(i), ctx.mask)
        if ctx.fused and past is not None:  # z's steps: rotary and attention compiled (fused.py)
            from .fused import fused_attention

            return self.attn_out(i, fused_attention(self, *self.project(i, x), ctx.rope, past, mask, self.attn_scale(i))), None
        q, k, v = self.qkv(i, x, ctx.rope)
        kv = (k, v)
        if hasattr(past, "attend"):  # a cache with its own attention (shared_prefix.SharedPrefixKV)
            return self.attn_out(i, past.attend(q, k, v, mask, self.attn_scale(i)).transpose(1, 2).flatten(2)), kv
        if past is not None and self.split_prefix_attention:
            o = attend_prefix(q, k, v, past, mask, self.attn_scale(i))
            return self.attn_out(i, o.transpose(1, 2).flatten(2)), kv
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.attn_scale(i))
        return self.attn_out(i, o.transpose(1, 2).flatten(2)), kv

    def block(self, i: int, h: torch.Tensor, ctx: Context, past=None, *, want_kv: bool = False, want_key: bool = False):
        """Block i on h (B, S, d). Returns h, or a tuple (h, kv) / (h, key) / (h, kv, key) as asked.
        A model split over GPUs: h and ctx move to block i's device, and the results stay there."""
        h, ctx = self.on_block_device(i, h, ctx)
        a, kv = self.attention(i, self.norm_attn(i, h), ctx, past)
        if self.parallel:
            key = self.mlp_key(i, self.norm_mlp(i, h))
            out = self.combine_parallel(h, a, self.mlp_out(i, key))
        else:
            mid = h + a
            key = self.mlp_key(i, self.norm_mlp(i, mid))
            out = mid + self.mlp_out(i, key)
        extra = ((kv,) if want_kv else ()) + ((key,) if want_key else ())
        return (out, *extra) if extra else out

    def combine_parallel(self, h, a, m):
        return h + a + m

    def key_only(self, i: int, h: torch.Tensor, ctx: Context, past=None) -> torch.Tensor:
        """Block i's key (B, S, d_ff), without W_out (a pass that ends at this key)."""
        h, ctx = self.on_block_device(i, h, ctx)
        if self.parallel:
            return self.mlp_key(i, self.norm_mlp(i, h))
        a, _ = self.attention(i, self.norm_attn(i, h), ctx, past)
        return self.mlp_key(i, self.norm_mlp(i, h + a))

    def run(self, h: torch.Tensor, start: int, stop: int, ctx: Context, cache: PrefixCache | None = None) -> torch.Tensor:
        """Blocks start..stop-1 on h; returns block stop-1's output (on h's device)."""
        device = h.device
        for i in range(start, stop):
            h = self.block(i, h, ctx, None if cache is None else cache.kv[i])
        return h.to(device)

    def on_block_device(self, i: int, h: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, Context]:
        """(h, ctx) on block i's device (that of its W_out): a model split over GPUs
        (memit_fast.distributed.balanced_device_map); unchanged on one device."""
        device = self.w_out(i).weight.device
        # the context too, even when h is already there: a block after the first one on this GPU
        # gets h from its predecessor and the context of the caller's device
        return (h if h.device == device else h.to(device)), ctx.on(device)

    # ---- what the stages use ----
    def start(self, ids: torch.Tensor, positions: torch.Tensor | None = None, prefix: PrefixCache | None = None) -> tuple[torch.Tensor, Context]:
        """Embeddings of ids (B, S) and their attention context; positions default to 0..S-1 after
        the prefix's real tokens."""
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            if prefix is not None:
                positions = positions + prefix.length[:, None]
        h = self.embed(ids, positions)
        return h, self.context(h, positions, None if prefix is None else prefix.mask)

    @torch.no_grad()
    def prefix_cache(self, ids: torch.Tensor, mask: torch.Tensor, stop: int) -> PrefixCache:
        """Keys and values of blocks 0..stop-1 over right-padded prefixes ids (B, P)."""
        h, ctx = self.start(ids)
        kv = {}
        for i in range(stop):
            h, kv[i] = self.block(i, h, ctx, want_kv=True)
        return PrefixCache(kv, mask)

    @torch.no_grad()
    def mlp_keys(self, ids: torch.Tensor, mask: torch.Tensor, layers: list[int], consume) -> None:
        """consume(layer, key (B, S, d_ff)) for each of the ascending `layers`, in one pass over
        right-padded rows ids (B, S) (mask (B, S): causal attention is exact at the real tokens);
        the pass ends at the last layer's key."""
        h, ctx = self.start(ids)
        last = max(layers)
        for i in range(last + 1):
            if i == last:
                consume(i, self.key_only(i, h, ctx))
            elif i in layers:
                h, key = self.block(i, h, ctx, want_key=True)
                consume(i, key)
            else:
                h = self.block(i, h, ctx)

    @torch.no_grad()
    def key_and_output(self, ids: torch.Tensor, mask: torch.Tensor, key_layer: int, out_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key (B, S, d_ff) of block key_layer, output (B, S, d) of block out_layer) over
        right-padded rows ids (B, S), the pass ending at block out_layer."""
        if key_layer > out_layer:
            raise ValueError(f"key layer {key_layer} is above the output layer {out_layer}")
        h, ctx = self.start(ids)
        for i in range(out_layer + 1):
            if i == key_layer:
                h, key = self.block(i, h, ctx, want_key=True)
            else:
                h = self.block(i, h, ctx)
        return key.to(ids.device), h.to(ids.device)

    def suffix_runner(self, prefix_ids, prefix_mask, suffix_ids, suffix_mask, suffix_pos, layer: int, stop: int) -> "SuffixRunner":
        return SuffixRunner(self, prefix_ids, prefix_mask, suffix_ids, suffix_pos, layer, stop)

    def shared_suffix_runner(self, template_ids, template_mask, own_ids, own_mask, suffix_ids, suffix_pos, layer: int, stop: int, uses=None):
        """`suffix_runner` with the context templates' keys and values held once per chunk
        (`shared_prefix.SharedPrefixRunner`; row r = b * n + j reads template j where uses[r])."""
        from .shared_prefix import SharedPrefixRunner

        return SharedPrefixRunner(self, template_ids, template_mask, own_ids, own_mask, suffix_ids, suffix_pos, layer, stop, uses)

    def template_suffix_runner(self, template_ids, template_mask, own_ids, own_mask, suffix_ids, suffix_pos, layer: int, stop: int, uses=None):
        """`suffix_runner` whose per-row cache is built with the context templates' keys and values
        computed once per chunk (`SuffixRunner.from_templates`; arguments as `shared_suffix_runner`'s)."""
        return SuffixRunner.from_templates(self, template_ids, template_mask, own_ids, own_mask, suffix_ids, suffix_pos, layer, stop, uses)

    # ---- causal tracing (memit_fast/trace.py, docs/tracing.md) ----
    def block_parts(self, i: int, h: torch.Tensor, ctx: Context, attn_patch=None, mlp_patch=None, past=None):
        """Block i on h (B, S, d) -> (output, attention output, MLP output), each (B, S, d). A patch
        (rows (n,), tokens (n,), values (n, d)) replaces that sub-block's output at those (row,
        token) before it joins the residual stream. past: a cached prefix's (k, v), as `attention`'s."""
        h, ctx = self.on_block_device(i, h, ctx)
        a = patch_rows(self.attention(i, self.norm_attn(i, h), ctx, past)[0], attn_patch)
        if self.parallel:
            m = patch_rows(self.mlp_out(i, self.mlp_key(i, self.norm_mlp(i, h))), mlp_patch)
            return self.combine_parallel(h, a, m), a, m
        mid = h + a
        m = patch_rows(self.mlp_out(i, self.mlp_key(i, self.norm_mlp(i, mid))), mlp_patch)
        return mid + m, a, m

    @torch.no_grad()
    def patched_forward(self, ids: torch.Tensor, last: torch.Tensor, *, noise=None, patches=None, record: bool = False, enter=None):
        """Logits (B, V) at token last[b] of each right-padded row ids (B, S), with `noise` (B, S, d)
        added to the input embeddings and `patches` {layer: {"hidden" | "attn" | "mlp": (rows,
        tokens, values (n, d))}} putting those outputs of the block / its attention / its MLP in
        place. record=True also returns {"hidden", "attn", "mlp": (L, B, S, d)} of this run.
        enter=(layer e, h (B, S, d)) starts the rows at block e from h instead of the embeddings."""
        patches = patches or {}
        if enter is None:
            h, ctx = self.start(ids)
            first = 0
            if noise is not None:
                h = h + noise
        else:
            first, h = enter
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            ctx = self.context(h, positions)
        kept = {"hidden": [], "attn": [], "mlp": []}
        for i in range(first, self.n_layers):
            p = patches.get(i, {})
            h, a, m = self.block_parts(i, h, ctx, p.get("attn"), p.get("mlp"))
            h = patch_rows(h, p.get("hidden"))
            if record:
                for name, t in (("hidden", h), ("attn", a), ("mlp", m)):
                    kept[name].append(t)
        logits = self.finish(h[torch.arange(len(h), device=h.device), last])
        return (logits, {k: torch.stack(v) for k, v in kept.items()}) if record else logits

    @torch.no_grad()
    def input_kv(self, i: int, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i's keys and values (B, H_kv, S, h_d), rotary applied, over its input h (B, S, d)
        at `positions` (B, S): a run's cache, rebuilt from the block inputs it recorded."""
        device = self.w_out(i).weight.device
        x = self.norm_attn(i, h.to(device))
        return self.qkv(i, x, self.rope(x, positions.to(device)))[1:]

    @torch.no_grad()
    def suffix_patched_forward(self, h: torch.Tensor, first: int, positions: torch.Tensor, last: torch.Tensor, *,
                               past=None, prefix_mask=None, patches=None) -> torch.Tensor:
        """`patched_forward` of rows that hold only their tokens from some position on and enter
        at block `first`: h (B, S, d) the block input there, at absolute `positions` (B, S), after
        a prefix whose cached keys and values are past {block: (k, v) (B, H_kv, P, h_d)} with
        prefix_mask (B, P) (1 = real token; None: no prefix). Patches' tokens index h's columns.
        Logits (B, V) at column last[b]; only those columns reach the final norm and head."""
        patches = patches or {}
        ctx = self.context(h, positions, prefix_mask)
        for i in range(first, self.n_layers):
            p = patches.get(i, {})
            h = self.block_parts(i, h, ctx, p.get("attn"), p.get("mlp"), None if past is None else past[i])[0]
            h = patch_rows(h, p.get("hidden"))
        return self.finish(h[torch.arange(len(h), device=h.device), last.to(h.device)])


class SuffixRunner:
    """z's forward (docs/algorithm.md section 6): the prefixes' keys and values are computed once
    for blocks 0..stop-1; `hidden` is block `layer`'s output over the suffixes (no gradients); each
    step runs only blocks layer+1..stop on an edited copy of it, reading the cached prefix."""

    def __init__(self, layout: Layout, prefix_ids, prefix_mask, suffix_ids, suffix_pos, layer: int, stop: int):
        with torch.no_grad():
            cache = layout.prefix_cache(prefix_ids, prefix_mask, stop + 1) if prefix_ids.shape[1] else None
            h, ctx = layout.start(suffix_ids, suffix_pos, cache)
            hidden = layout.run(h, 0, layer + 1, ctx, cache)
        self._hold(layout, hidden, None if cache is None else cache.keep_layers(range(layer + 1, stop + 1)), suffix_pos, layer, stop)

    @classmethod
    def from_templates(cls, layout: Layout, template_ids, template_mask, own_ids, own_mask, suffix_ids, suffix_pos, layer: int, stop: int,
                       uses=None) -> "SuffixRunner":
        """The same runner with its cache built from the context templates' keys and values,
        computed once per chunk (`shared_prefix.SharedPrefixRunner`'s pass; arguments as
        `Layout.shared_suffix_runner`'s) and then laid out per row: a row's key slots are its
        template's (padded to the longest template), then its own prefix's."""
        from .shared_prefix import SharedPrefixRunner

        built = SharedPrefixRunner(layout, template_ids, template_mask, own_ids, own_mask, suffix_ids, suffix_pos, layer, stop, uses)
        runner = cls.__new__(cls)
        runner._hold(layout, built.hidden, built.cache.to_per_row(), suffix_pos, layer, stop)
        return runner

    def _hold(self, layout: Layout, hidden: torch.Tensor, cache: PrefixCache | None, positions: torch.Tensor, layer: int, stop: int) -> None:
        self.layout, self.layer, self.stop, self.hidden, self.positions = layout, layer, stop, hidden, positions
        if cache is not None and layout.split_prefix_attention:
            cache.kv = {i: (k.to(cache_key_dtype(k.device, k.dtype)), v) for i, (k, v) in cache.kv.items()}
        self.cache = cache
        self.ctx = step_context(layout, self._context())

    def _context(self) -> Context:
        cache = self.cache
        return self.layout.context(self.hidden[:1], self.positions, None if cache is None else cache.mask,
                                   prefix_positions=None if cache is None else cache.positions)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (the batch shrinks as requests converge)."""
        self.positions = self.positions[rows]
        self.cache = None if self.cache is None else self.cache.select(rows)
        self.ctx = step_context(self.layout, self._context())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Block `stop`'s output from block `layer`'s output h (rows as selected)."""
        return self.layout.run(h, self.layer + 1, self.stop + 1, self.ctx, self.cache)


def step_context(layout: Layout, ctx: Context) -> Context:
    """ctx for z's steps: fused attention where `fused.use_fused` says so."""
    from .fused import use_fused

    ctx.fused = layout.split_prefix_attention and use_fused()
    ctx.copies.clear()  # a model split over GPUs: the other devices' copies were made before
    return ctx


def patch_rows(t: torch.Tensor, patch) -> torch.Tensor:
    """t (B, S, d) with values (n, d) put at (rows (n,), tokens (n,)) of `patch` (None: t as it is)."""
    if patch is None:
        return t
    rows, tokens, values = patch
    return t.index_put((rows.to(t.device), tokens.to(t.device)), values.to(t.device, t.dtype))
