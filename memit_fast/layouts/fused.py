"""z's attention with its element-wise work fused: the rotary embedding, the casts to the scores'
dtype, the joined scores, mask, scale and softmax, and the output's head layout, compiled by
`torch.compile` (Inductor's Triton kernels) around the same matrix products as the eager
functions `base.prefix_attention` and `shared_prefix.shared_prefix_attention`, which stay the
reference twins (tests/test_fused.py compares them). One compiled graph serves every block and
every chunk: shapes are dynamic, the weights never enter it (the projections stay outside); a
scale that differs per layer (GPT-2's scale_attn_by_inverse_layer_idx) compiles once per layer.

Off by default: on an H200 at GPT-J shapes it ran z's steps 7% faster in a probe but no faster end
to end (benchmarks/NOTES.md, session 5), and compiling costs ~25 s per process. MEMIT_FAST_COMPILE=1
turns it on (on a GPU or the CPU). If the compiler fails (no working Triton, say), a warning
names the error and z goes on eagerly.
"""

from __future__ import annotations

import logging

import torch

from ..config import env_setting
from .base import prefix_attention
from .shared_prefix import shared_prefix_attention

log = logging.getLogger(__name__)
_state = {"failed": None}  # the compiler's error, once it has failed in this process


def use_fused() -> bool:
    """Whether z's steps run the compiled attention (MEMIT_FAST_COMPILE=1, compiler not failed)."""
    return env_setting("MEMIT_FAST_COMPILE") and _state["failed"] is None


def _per_row(rotate, q, k, v, rope, past_k, past_v, mask, scale):
    q, k = rotate(q, k, rope)
    return prefix_attention(q, k, v, (past_k, past_v), mask, scale).transpose(1, 2).flatten(2)


def _shared(rotate, q, k, v, rope, template_k, template_v, own_k, own_v, mask, n, scale):
    q, k = rotate(q, k, rope)
    own = None if own_k is None else (own_k, own_v)
    return shared_prefix_attention(q, k, v, (template_k, template_v), own, mask, n, scale).transpose(1, 2).flatten(2)


BACKEND = "inductor"  # torch.compile's backend (tests on the CPU also trace with "aot_eager", which is quicker)
_compiled: dict = {}


def _compile(fn):
    key = (fn, BACKEND)
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=True, backend=BACKEND)
    return _compiled[key]


def fused_attention(layout, q, k, v, rope, past, mask, scale):
    """Attention output (B, S, H * h_d) of un-rotated q (B, H, S, h_d), k, v (B, H_kv, S, h_d) over a
    cached prefix `past` ((k, v) per row, or a `shared_prefix.SharedPrefixKV`), as
    `Layout.attention` computes it eagerly."""
    if hasattr(past, "attend"):  # a SharedPrefixKV, told apart as Layout.attention does
        own = past.own or (None, None)
        args = (_shared, layout.rotate, q, k, v, rope, *past.template, *own, mask, past.n, scale)
    else:
        args = (_per_row, layout.rotate, q, k, v, rope, past[0], past[1], mask, scale)
    if _state["failed"] is None:
        try:
            return _compile(args[0])(*args[1:])
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported) as e:
            _state["failed"] = e
            log.warning("torch.compile failed (%s: %s); z's attention runs eagerly from here on "
                        "(unset MEMIT_FAST_COMPILE: no attempt)", type(e).__name__, " ".join(str(e).split())[:400])
    return args[0](*args[1:])
