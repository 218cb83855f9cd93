"""GPT-J (`transformer.h.{i}`): one LayerNorm feeding attention and MLP in parallel, rotary
embedding on the first `rotary_dim` dims of each head with interleaved pairs, MLP
fc_out(gelu(fc_in(x))) whose key is gelu(fc_in(x))."""

from __future__ import annotations

import torch

from .base import Layout, fused_activation


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class GPTJLayout(Layout):
    family = "gptj"
    parallel = True

    def __init__(self, model):
        super().__init__(model)
        base = model.transformer
        self.wte, self.blocks, self.final_norm, self.lm_head = base.wte, base.h, base.ln_f, model.lm_head
        c = self.config
        self.n_heads = self.n_kv_heads = c.n_head
        self.head_dim = c.n_embd // c.n_head
        self.act = fused_activation(self.blocks[0].mlp.act)
        self.rotary_dim = c.rotary_dim or self.head_dim
        # the sinusoid frequencies exactly as transformers builds them (float32)
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.int64) / self.rotary_dim))

    def embed(self, ids, positions):
        return self.wte(ids)

    def rope(self, h, positions):
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        sin, cos = angles.sin().to(h.dtype), angles.cos().to(h.dtype)
        # (B, 1, S, rotary_dim): each frequency serves an interleaved pair
        return sin.repeat_interleave(2, -1)[:, None], cos.repeat_interleave(2, -1)[:, None]

    def _rotate(self, x, rope):
        sin, cos = rope
        r = self.rotary_dim
        rot = x[..., :r] * cos + rotate_every_two(x[..., :r]) * sin
        return torch.cat([rot, x[..., r:]], dim=-1) if r < x.shape[-1] else rot

    def project(self, i, x):
        attn = self.blocks[i].attn
        shape = (*x.shape[:2], self.n_heads, self.head_dim)
        return tuple(p(x).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

    def rotate(self, q, k, rope):
        return self._rotate(q, rope), self._rotate(k, rope)

    def attn_out(self, i, o):
        return self.blocks[i].attn.out_proj(o)

    def attn_scale(self, i):
        return getattr(self.blocks[i].attn, "scaling", None)  # HF's own head_dim**-0.5, not SDPA's 1/sqrt

    def norm_attn(self, i, h):
        return self.blocks[i].ln_1(h)

    norm_mlp = norm_attn

    def mlp_key(self, i, x):
        return self.act(self.blocks[i].mlp.fc_in(x))

    def mlp_out(self, i, a):
        return self.blocks[i].mlp.fc_out(a)


    def w_out(self, i):
        return self.blocks[i].mlp.fc_out

    def block(self, i, h, ctx, past=None, *, want_kv=False, want_key=False):
        h, ctx = self.on_block_device(i, h, ctx)  # a model split over GPUs
        # one LayerNorm for both branches: compute it once
        x = self.norm_attn(i, h)
        a, kv = self.attention(i, x, ctx, past)
        key = self.mlp_key(i, x)
        out = a + self.mlp_out(i, key) + h
        extra = ((kv,) if want_kv else ()) + ((key,) if want_key else ())
        return (out, *extra) if extra else out
