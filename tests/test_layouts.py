"""Each family layout (memit_fast/layouts) against Hugging Face's own forward on tiny random models.

CPU, float64: logits and every block's output within RTOL = 1e-10 of `model(input_ids,
attention_mask, output_hidden_states=True)`, measured as the largest absolute difference over the
real tokens divided by the reference's largest absolute value there. The same for the MLP keys
(read by a forward pre-hook on W_out during HF's forward), the prefix cache (a prefix's keys and
values, then the suffix alone, against the prefix and suffix run as one sequence) and z's
SuffixRunner (against the generic layout's runner, which goes through HF's forward). Batches are
right-padded rows of different lengths; only real tokens are compared. Every family and the
variants its layout branches on: GPT-2 scalings, GPT-J partial and whole-head rotary, NeoX
parallel and sequential residual with partial rotary, Llama grouped- and multi-query attention
with biases, Mistral with its own head size, Qwen2 biases, sliding windows shorter than the rows.
On CUDA, bf16: within twice HF bf16's own error against float64 (test_bfloat16_on_the_gpu).
"""

from __future__ import annotations

import functools

import pytest
import torch

from memit_fast.layouts import FAMILIES, GenericLayout, Layout, layout_for

import tiny

RTOL = 1e-10
# HF's GPT-J with its old eager-only attention (GPTJAttention._attn: transformers 4.56 to 5.0 at
# least) computes attention scores in float32 (q, k and sqrt(h_d) cast to float32) and, in 4.x,
# the logits in float32, so its float64 forward is itself off: measured up to 9e-9 relative on the
# blocks and 6e-8 on the logits of these configs. The layout's attention stays in float64.
RTOL_GPTJ_FLOAT32_SCORES = 1e-7
VOCAB = 101
PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def _configs():
    """name -> (model_type, builder): every family with the variants its layout branches on."""
    import transformers as T

    ids = dict(bos_token_id=0, eos_token_id=0)

    def gpt2(**kw):
        # eager: before transformers 5, GPT-2's SDPA path ignored both scaling options
        config = T.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=64, **ids, **kw)
        config._attn_implementation = "eager"
        return T.GPT2LMHeadModel(config)

    def gptj(rotary_dim, n_head=4):
        config = T.GPTJConfig(vocab_size=VOCAB, n_embd=48, n_layer=3, n_positions=64, n_head=n_head, rotary_dim=rotary_dim or 48, **ids)
        config.__dict__["rotary_dim"] = rotary_dim  # None: transformers 5 validates it as an int but reads None
        return T.GPTJForCausalLM(config)

    def neox(**kw):
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64, **ids, **kw))

    def llama(cls, config, **kw):
        return cls(config(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=3, max_position_embeddings=64, **ids, **kw))

    return {
        "gpt2": ("gpt2", lambda: tiny.model("gpt2", layers=3)),
        "gpt2-inverse-layer-scale": ("gpt2", lambda: gpt2(scale_attn_by_inverse_layer_idx=True)),
        "gpt2-unscaled": ("gpt2", lambda: gpt2(scale_attn_weights=False)),
        "gptj-partial-rotary": ("gptj", lambda: gptj(rotary_dim=4)),  # head dim 12
        # rotary_dim None rotates whole heads; HF's table then spans n_embd, so one head only
        "gptj-full-rotary": ("gptj", lambda: gptj(rotary_dim=None, n_head=1)),
        "neox-parallel": ("gpt_neox", lambda: neox(use_parallel_residual=True, rotary_pct=0.25)),
        "neox-sequential": ("gpt_neox", lambda: neox(use_parallel_residual=False, rotary_pct=0.25)),
        "llama-gqa": ("llama", lambda: tiny.model("llama", layers=3)),  # 4 heads, 2 key/value heads, tied head
        "llama-bias-mqa": ("llama", lambda: llama(T.LlamaForCausalLM, T.LlamaConfig, num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True, rope_theta=500.0)),
        "mistral": ("mistral", lambda: llama(T.MistralForCausalLM, T.MistralConfig, num_attention_heads=4, num_key_value_heads=2, head_dim=20)),
        "qwen2": ("qwen2", lambda: llama(T.Qwen2ForCausalLM, T.Qwen2Config, num_attention_heads=6, num_key_value_heads=2)),
        # windows shorter than the rows: Mistral on every block, Qwen2 on blocks >= max_window_layers
        # (Qwen2's window above the prefixes' length: transformers 5.0's sliding cache keeps only
        # window - 1 prefix keys, which the generic runner would then miss)
        "mistral-sliding-window": ("mistral", lambda: llama(T.MistralForCausalLM, T.MistralConfig, num_attention_heads=4, num_key_value_heads=2, sliding_window=4)),
        "qwen2-sliding-window": ("qwen2", lambda: llama(T.Qwen2ForCausalLM, T.Qwen2Config, num_attention_heads=4, num_key_value_heads=4, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    }


CONFIGS = _configs()
NAMES = list(CONFIGS)


@functools.lru_cache
def _model(name: str):
    torch.manual_seed(len(name))
    model = CONFIGS[name][1]().to(torch.float64).eval()
    # random weights larger than the initialiser's, so that every path moves the result
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _hparams(model, **changes):
    return tiny.hparams(model, **changes)


def _layout(name: str) -> Layout:
    model = _model(name)
    layout = layout_for(model, _hparams(model))
    assert type(layout) is FAMILIES[CONFIGS[name][0]], f"{name} resolved to {type(layout).__name__}"
    return layout


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, max len) and mask (B, max len) of token lists (an empty row has width 1)."""
    width = max(1, *map(len, rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    return ids, mask


def _rows(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [7, 3, 11, 1, 9]  # batch of 5, odd lengths


def _rtol(name: str) -> float:
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    return RTOL_GPTJ_FLOAT32_SCORES if name.startswith("gptj") and hasattr(GPTJAttention, "_attn") else RTOL


def _assert_close(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """max |got - want| over the real tokens (mask (B, S)) <= rtol * max |want| there."""
    keep = mask.bool()
    got, want = got[keep], want[keep]
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert scale > 0, what
    assert err <= rtol * scale, f"{what}: max abs difference {err:.3e}, relative {err / scale:.3e} > {rtol:g}"


def _hf(model, ids, mask, w_outs=()):
    """HF's forward: (logits, hidden states, {i: the input of w_outs[i]} read by pre-hooks)."""
    keys = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: keys.__setitem__(i, args[0])) for i, m in enumerate(w_outs)]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.logits, out.hidden_states, keys


def _layout_blocks(layout: Layout, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output and the logits, block by block through the layout."""
    with torch.no_grad():
        h, ctx = layout.start(ids)
        outs = []
        for i in range(layout.n_layers):
            h = layout.block(i, h, ctx)
            outs.append(h)
        return outs, layout.finish(h)


@pytest.mark.parametrize("name", NAMES)
def test_blocks_and_logits_equal_hf(name):
    close = functools.partial(_assert_close, rtol=_rtol(name))
    layout, model = _layout(name), _model(name)
    ids, mask = _pad(_rows(LENGTHS))
    logits, hidden, _ = _hf(model, ids, mask)
    outs, got_logits = _layout_blocks(layout, ids)
    n = layout.n_layers
    assert len(hidden) == n + 1
    close(layout.embed(ids, torch.arange(ids.shape[1]).expand_as(ids)), hidden[0], mask, "embeddings")
    for i in range(n - 1):
        close(outs[i], hidden[i + 1], mask, f"block {i}")
    # HF's last hidden state is the final norm's output
    close(layout.final_norm(outs[-1]), hidden[n], mask, f"block {n - 1} (final norm)")
    close(got_logits, logits, mask, "logits")


@pytest.mark.parametrize("name", NAMES)
def test_mlp_keys_and_key_and_output_equal_hf(name):
    close = functools.partial(_assert_close, rtol=_rtol(name))
    layout, model = _layout(name), _model(name)
    n = layout.n_layers
    ids, mask = _pad(_rows([4, 9, 2], seed=1))
    _, hidden, keys = _hf(model, ids, mask, [layout.w_out(i) for i in range(n)])
    for layers in ([0, n - 1], [1], list(range(n))):
        got = []
        layout.mlp_keys(ids, mask, layers, lambda i, k: got.append((i, k)))
        assert [i for i, _ in got] == layers
        for i, k in got:
            close(k, keys[i], mask, f"key of layer {i} (layers {layers})")
    for key_layer, out_layer in ((0, 0), (0, n - 2), (1, 1)):
        key, out = layout.key_and_output(ids, mask, key_layer, out_layer)
        close(key, keys[key_layer], mask, f"key_and_output key {key_layer}")
        close(out, hidden[out_layer + 1], mask, f"key_and_output output {out_layer}")
    with pytest.raises(ValueError):
        layout.key_and_output(ids, mask, 2, 1)


PREFIX_LENGTHS = [4, 0, 2, 5, 1]  # right-padded to 5; row 1 has no prefix
SUFFIX_LENGTHS = [3, 5, 1, 2, 4]


def _prefix_batch(seed=2, prefix_lengths=PREFIX_LENGTHS):
    prefixes, suffixes = _rows(prefix_lengths, seed), _rows(SUFFIX_LENGTHS, seed + 1)
    prefix_ids, prefix_mask = _pad(prefixes)
    suffix_ids, suffix_mask = _pad(suffixes)
    full_ids, full_mask = _pad([p + s for p, s in zip(prefixes, suffixes)])
    return prefix_ids, prefix_mask, suffix_ids, suffix_mask, full_ids, full_mask


def _at_suffix(full: torch.Tensor, width: int) -> torch.Tensor:
    """full (B, S_full, ...) at each row's suffix positions: (B, width, ...), zeros past the end."""
    full = torch.cat([full, full.new_zeros(full.shape[0], width, *full.shape[2:])], dim=1)
    return torch.stack([full[r, p : p + width] for r, p in enumerate(PREFIX_LENGTHS)])


@pytest.mark.parametrize("name", NAMES)
def test_prefix_cache_equals_full_sequence(name):
    close = functools.partial(_assert_close, rtol=_rtol(name))
    layout, model = _layout(name), _model(name)
    n = layout.n_layers
    prefix_ids, prefix_mask, suffix_ids, suffix_mask, full_ids, full_mask = _prefix_batch()
    logits, hidden, _ = _hf(model, full_ids, full_mask)
    cache = layout.prefix_cache(prefix_ids, prefix_mask, n)
    assert cache.length.tolist() == PREFIX_LENGTHS
    with torch.no_grad():
        h, ctx = layout.start(suffix_ids, prefix=cache)
        assert ctx.positions.tolist() == [[p + j for j in range(suffix_ids.shape[1])] for p in PREFIX_LENGTHS]
        for i in range(n):
            h = layout.run(h, i, i + 1, ctx, cache)
            if i < n - 1:
                close(h, _at_suffix(hidden[i + 1], h.shape[1]), suffix_mask, f"block {i} after the prefix")
        close(layout.finish(h), _at_suffix(logits, h.shape[1]), suffix_mask, "logits after the prefix")
        # the same through run() over all blocks at once, and with the batch narrowed to some rows
        rows = torch.tensor([3, 1, 0])
        sub = cache.select(rows)
        h, ctx = layout.start(suffix_ids[rows], prefix=sub)
        h = layout.run(h, 0, n, ctx, sub)
    close(layout.finish(h), _at_suffix(logits, h.shape[1])[rows], suffix_mask[rows], "logits after the prefix, rows selected")


def _runner_inputs(prefix_ids, prefix_mask, suffix_ids, suffix_mask, lengths):
    pos = torch.tensor(lengths)[:, None] + torch.arange(suffix_ids.shape[1])
    return prefix_ids, prefix_mask, suffix_ids, suffix_mask, pos


@pytest.mark.parametrize("with_prefix", [True, False], ids=["prefix", "no-prefix"])
@pytest.mark.parametrize("name", NAMES)
def test_suffix_runner_equals_generic_runner(name, with_prefix):
    close = functools.partial(_assert_close, rtol=_rtol(name))
    layout, model = _layout(name), _model(name)
    generic = layout_for(model, _hparams(model), generic=True)
    assert isinstance(generic, GenericLayout)
    lengths = PREFIX_LENGTHS
    if any(layout.window(i) is not None for i in range(layout.n_layers)):
        # HF's sliding window counts cache slots, padding included, so the generic runner is exact
        # only on unpadded prefixes (the layout counts positions: test_prefix_cache_equals_full_sequence)
        lengths = [max(PREFIX_LENGTHS)] * len(PREFIX_LENGTHS)
    prefix_ids, prefix_mask, suffix_ids, suffix_mask, _, _ = _prefix_batch(5, lengths)
    if not with_prefix:
        prefix_ids, prefix_mask, lengths = prefix_ids[:, :0], prefix_mask[:, :0], [0] * len(lengths)
    inputs = _runner_inputs(prefix_ids, prefix_mask, suffix_ids, suffix_mask, lengths)
    layer, stop = 0, layout.n_layers - 1
    fast, slow = layout.suffix_runner(*inputs, layer, stop), generic.suffix_runner(*inputs, layer, stop)
    close(fast.hidden, slow.hidden, suffix_mask, "hidden")
    g = torch.Generator().manual_seed(7)
    delta = torch.randn(fast.hidden.shape, generator=g, dtype=fast.hidden.dtype)
    with torch.no_grad():
        close(fast.forward(fast.hidden + delta), slow.forward(slow.hidden + delta), suffix_mask, "forward")
        keep = torch.arange(len(lengths))
        for rows in (torch.tensor([4, 2, 0, 1]), torch.tensor([2, 0])):  # the batch shrinks twice
            fast.select(rows)
            slow.select(rows)
            keep = keep[rows]
            h = fast.hidden[keep] + delta[keep]
            close(fast.forward(h), slow.forward(h.clone()), suffix_mask[keep], f"forward after select {keep.tolist()}")


@pytest.mark.parametrize("name", NAMES)
def test_generic_layout_agrees_with_family_layout(name):
    close = functools.partial(_assert_close, rtol=_rtol(name))
    layout, model = _layout(name), _model(name)
    generic = layout_for(model, _hparams(model), generic=True)
    n = layout.n_layers
    ids, mask = _pad(_rows([6, 2, 5], seed=3))
    fast, slow = [], []
    layout.mlp_keys(ids, mask, [0, n - 1], lambda i, k: fast.append(k))
    generic.mlp_keys(ids, mask, [0, n - 1], lambda i, k: slow.append(k))
    for i, (a, b) in enumerate(zip(fast, slow)):
        close(a, b, mask, f"mlp_keys {i}")
    for pair in ((0, n - 2), (1, 1)):
        for a, b, what in zip(layout.key_and_output(ids, mask, *pair), generic.key_and_output(ids, mask, *pair), ("key", "output")):
            close(a, b, mask, f"key_and_output {pair} {what}")


def test_layout_for_falls_back_to_generic():
    llama = _model("llama-gqa")
    hp = _hparams(llama)
    assert type(layout_for(llama, hp)) is FAMILIES["llama"]
    # the hyper-parameters name another module than the family's W_out, block, norm or head
    for change in (
        dict(rewrite_module_tmp="model.layers.{}.mlp.up_proj"),
        dict(rewrite_module_tmp="model.layers.{}.self_attn.o_proj"),
        dict(layer_module_tmp="model.layers.{}.mlp"),
        dict(ln_f_module="model.layers.0.input_layernorm"),
    ):
        assert isinstance(layout_for(llama, hp.replace(**change)), GenericLayout), change
    gpt2 = _model("gpt2")
    assert isinstance(layout_for(gpt2, _hparams(gpt2).replace(rewrite_module_tmp="transformer.h.{}.attn.c_proj")), GenericLayout)


def test_generic_layout_on_an_unknown_model_type():
    import transformers as T

    torch.manual_seed(0)
    model = T.GPTNeoForCausalLM(T.GPTNeoConfig(vocab_size=VOCAB, hidden_size=48, num_layers=3, num_heads=4, attention_types=[[["global", "local"], 1], [["global"], 1]], window_size=4, max_position_embeddings=64)).to(torch.float64).eval()
    assert model.config.model_type not in FAMILIES
    hp = _hparams(_model("llama-gqa")).replace(
        rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}", mlp_module_tmp="transformer.h.{}.mlp",
        attn_module_tmp="transformer.h.{}.attn", ln_f_module="transformer.ln_f", lm_head_module="lm_head",
    )
    layout = layout_for(model, hp)
    assert isinstance(layout, GenericLayout)
    ids, mask = _pad(_rows([5, 8, 3], seed=4))
    w_outs = [model.transformer.h[i].mlp.c_proj for i in range(3)]
    logits, hidden, keys = _hf(model, ids, mask, w_outs)
    got = {}
    layout.mlp_keys(ids, mask, [0, 2], got.__setitem__)
    assert sorted(got) == [0, 2]
    for i in got:
        _assert_close(got[i], keys[i], mask, f"key {i}")
    key, out = layout.key_and_output(ids, mask, 0, 1)
    _assert_close(key, keys[0], mask, "key_and_output key")
    _assert_close(out, hidden[2], mask, "key_and_output output")
    key, out = layout.key_and_output(ids, mask, 2, 2)
    _assert_close(layout.finish(out), logits, mask, "finish")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["gpt2", "gptj-partial-rotary", "neox-parallel", "neox-sequential", "llama-gqa", "mistral", "qwen2"])
def test_bfloat16_on_the_gpu(name):
    """bf16 on the GPU: the tolerance is measured, not set. For every block's output and the
    logits, over the real tokens: max |layout bf16 - reference| <= 2 * max |HF bf16 - reference|,
    the reference being HF's forward in float64 over the same (bf16-rounded) weights."""
    import copy

    model = copy.deepcopy(_model(name)).to("cuda", torch.bfloat16)
    reference = copy.deepcopy(model).to(torch.float64)
    layout = layout_for(model, _hparams(model))
    assert type(layout) is FAMILIES[CONFIGS[name][0]]
    ids, mask = (t.cuda() for t in _pad(_rows(LENGTHS)))
    logits, hidden, _ = _hf(model, ids, mask)
    ref_logits, ref_hidden, _ = _hf(reference, ids, mask)
    outs, got_logits = _layout_blocks(layout, ids)
    n = layout.n_layers
    pairs = [(outs[i], hidden[i + 1], ref_hidden[i + 1], f"block {i}") for i in range(n - 1)]
    pairs += [(layout.final_norm(outs[-1]), hidden[n], ref_hidden[n], "final norm"), (got_logits, logits, ref_logits, "logits")]
    keep = mask.bool()
    for got, hf, ref, what in pairs:
        err = (got[keep].double() - ref[keep]).abs().max().item()
        tol = 2 * (hf[keep].double() - ref[keep]).abs().max().item()
        assert err <= tol, f"{name} {what}: layout bf16 error {err:.3e} > twice HF bf16's error ({tol:.3e})"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_prefix_attention_equals_sdpa_over_the_joined_keys(dtype, tol, heads, kv_heads):
    """prefix_attention (prefix read in place, grouped heads unrepeated) == SDPA over the prefix
    joined to the rows' own keys, outputs and gradients, on a padded prefix with a sliding window;
    tolerances relative to the largest value, per dtype, against float64."""
    from memit_fast.layouts.base import prefix_attention

    g = torch.Generator().manual_seed(11)
    B, S, P, hd = 3, 5, 7, 16
    q, k, v = (torch.randn(B, h, S, hd, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    past = tuple(torch.randn(B, kv_heads, P, hd, generator=g, dtype=torch.float64) for _ in range(2))
    real = torch.tensor([7, 3, 0])  # prefix tokens per row; the rest is padding
    prefix_ok = torch.arange(P)[None, :] < real[:, None]
    pos = real[:, None] + torch.arange(S)
    keys = torch.cat([torch.arange(P).expand(B, P), pos], dim=1)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = torch.cat([prefix_ok[:, None, :].expand(B, S, P), causal.expand(B, S, S)], dim=-1)
    mask = (mask & ((pos[:, :, None] - keys[:, None, :]) < 6))[:, None]  # window of 6 positions

    def sdpa(q, k, v, pk, pv):
        rep = heads // kv_heads
        kk, vv = torch.cat([pk, k], 2).repeat_interleave(rep, 1), torch.cat([pv, v], 2).repeat_interleave(rep, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=0.3)

    def run(fn, dt):
        ins = [t.detach().to(dt, copy=True).requires_grad_(i < 3) for i, t in enumerate((q, k, v, *past))]
        out = fn(*ins)
        out.float().pow(2).sum().backward()
        return [out.double()] + [t.grad.double() for t in ins[:3]]

    ref = run(sdpa, torch.float64)
    got = run(lambda q, k, v, pk, pv: prefix_attention(q, k, v, (pk, pv), mask, 0.3), dtype)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, ref):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < tol, f"{name}: {err:.2e} relative to float64 SDPA (tolerance {tol:.0e} for {dtype})"
