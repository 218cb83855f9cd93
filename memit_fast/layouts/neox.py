"""GPT-NeoX and Pythia (`gpt_neox.layers.{i}`): LayerNorms before attention and MLP, in parallel
(use_parallel_residual) or in sequence, a fused query_key_value projection laid out per head,
rotate-half rotary on a share of each head (the model's own `rotary_emb`), MLP
dense_4h_to_h(act(dense_h_to_4h(x))) whose key is act(dense_h_to_4h(x))."""

from __future__ import annotations

from .base import Layout
from .llama import apply_rotary


class NeoXLayout(Layout):
    family = "gpt_neox"

    def __init__(self, model):
        super().__init__(model)
        base = model.gpt_neox
        self.embed_in, self.blocks, self.final_norm, self.lm_head = base.embed_in, base.layers, base.final_layer_norm, model.get_output_embeddings()
        self.rotary = base.rotary_emb
        c = self.config
        self.parallel = bool(c.use_parallel_residual)
        self.n_heads = self.n_kv_heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads

    def embed(self, ids, positions):
        return self.embed_in(ids)

    def rope(self, h, positions):
        return self.rotary(h, positions)

    def project(self, i, x):
        qkv = self.blocks[i].attention.query_key_value(x).view(*x.shape[:2], self.n_heads, 3 * self.head_dim).transpose(1, 2)
        return qkv.chunk(3, dim=-1)

    def rotate(self, q, k, rope):
        cos, sin = rope
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def attn_out(self, i, o):
        return self.blocks[i].attention.dense(o)

    def attn_scale(self, i):
        return getattr(self.blocks[i].attention, "scaling", None)  # HF's own head_dim**-0.5, not SDPA's 1/sqrt

    def norm_attn(self, i, h):
        return self.blocks[i].input_layernorm(h)

    def norm_mlp(self, i, h):
        return self.blocks[i].post_attention_layernorm(h)

    def mlp_key(self, i, x):
        mlp = self.blocks[i].mlp
        return mlp.act(mlp.dense_h_to_4h(x))

    def mlp_out(self, i, a):
        return self.blocks[i].mlp.dense_4h_to_h(a)


    def w_out(self, i):
        return self.blocks[i].mlp.dense_4h_to_h

    def combine_parallel(self, h, a, m):
        return m + a + h
