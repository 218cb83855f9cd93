"""Llama, Mistral and Qwen2 (`model.layers.{i}`): RMSNorm before attention and before the MLP,
rotate-half rotary embedding from the model's own `rotary_emb`, grouped-query attention, and a
gated MLP down(act(gate(x)) * up(x)) whose key is act(gate(x)) * up(x). Sliding-window attention
as transformers applies it: Mistral on every block when config.sliding_window is set, Qwen2 on
the blocks that config.layer_types marks "sliding_attention" (config.sliding_window is None
unless use_sliding_window)."""

from __future__ import annotations

import torch

from .base import Layout


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, h_d); cos, sin (B, S, r): rotate-half rotary on the first r dims."""
    cos, sin = cos[:, None], sin[:, None]
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


class LlamaLayout(Layout):
    family = "llama"

    def __init__(self, model):
        super().__init__(model)
        base = model.model
        self.embed_tokens, self.blocks, self.final_norm, self.lm_head = base.embed_tokens, base.layers, base.norm, model.lm_head
        self.rotary = base.rotary_emb
        c = self.config
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.n_heads
        w = getattr(c, "sliding_window", None) if c.model_type in ("mistral", "qwen2") else None
        types = getattr(c, "layer_types", None) if c.model_type == "qwen2" else None
        self.windows = [None if w is None or (types is not None and types[i] != "sliding_attention") else int(w) for i in range(len(self.blocks))]

    def embed(self, ids, positions):
        return self.embed_tokens(ids)

    def rope(self, h, positions):
        return self.rotary(h, positions)  # (cos, sin), each (B, S, h_d)

    def project(self, i, x):
        attn = self.blocks[i].self_attn
        shape = (*x.shape[:2], -1, self.head_dim)
        return tuple(p(x).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

    def rotate(self, q, k, rope):
        cos, sin = rope
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def attn_out(self, i, o):
        return self.blocks[i].self_attn.o_proj(o)

    def attn_scale(self, i):
        return getattr(self.blocks[i].self_attn, "scaling", None)

    def window(self, i):
        return self.windows[i]

    def norm_attn(self, i, h):
        return self.blocks[i].input_layernorm(h)

    def norm_mlp(self, i, h):
        return self.blocks[i].post_attention_layernorm(h)

    def mlp_key(self, i, x):
        mlp = self.blocks[i].mlp
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)

    def mlp_out(self, i, a):
        return self.blocks[i].mlp.down_proj(a)

    def w_out(self, i):
        return self.blocks[i].mlp.down_proj
