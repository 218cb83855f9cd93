"""GPT-2 (`transformer.h.{i}`): learned position embeddings, LayerNorms before attention and MLP
in sequence, Conv1D projections (weights stored (in, out)), MLP c_proj(gelu(c_fc(x))) whose key
is gelu(c_fc(x)); attention scaled as the config says (scale_attn_weights, by inverse layer)."""

from __future__ import annotations

from .base import Layout, fused_activation


class GPT2Layout(Layout):
    family = "gpt2"

    def __init__(self, model):
        super().__init__(model)
        base = model.transformer
        self.wte, self.wpe, self.blocks, self.final_norm, self.lm_head = base.wte, base.wpe, base.h, base.ln_f, model.lm_head
        c = self.config
        self.n_heads = self.n_kv_heads = c.n_head
        self.head_dim = c.n_embd // c.n_head
        self.act = fused_activation(self.blocks[0].mlp.act)

    def embed(self, ids, positions):
        return self.wte(ids) + self.wpe(positions)

    def project(self, i, x):
        shape = (*x.shape[:2], self.n_heads, self.head_dim)
        q, k, v = self.blocks[i].attn.c_attn(x).split(x.shape[-1], dim=-1)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def attn_out(self, i, o):
        return self.blocks[i].attn.c_proj(o)

    def attn_scale(self, i):
        c = self.config
        scale = self.head_dim**-0.5 if c.scale_attn_weights else 1.0
        return scale / (i + 1) if c.scale_attn_by_inverse_layer_idx else scale

    def norm_attn(self, i, h):
        return self.blocks[i].ln_1(h)

    def norm_mlp(self, i, h):
        return self.blocks[i].ln_2(h)

    def mlp_key(self, i, x):
        return self.act(self.blocks[i].mlp.c_fc(x))

    def mlp_out(self, i, a):
        return self.blocks[i].mlp.c_proj(a)

    def w_out(self, i):
        return self.blocks[i].mlp.c_proj
