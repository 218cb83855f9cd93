"""z's shared-template prefix cache (memit_fast/layouts/shared_prefix.py, docs/algorithm.md 6.2)
against the per-row prefix cache, CPU float64, every family of tests/test_layouts.py: the same
block `layer` output over the suffixes, the same forward from it (blocks layer+1..stop), and the
same after the batch shrinks to fewer requests; templates padded to different lengths (one with
no tokens), own prefixes of different lengths (some empty), rows that do not read their template
(their own prefix is their whole prefix), sliding windows shorter than the rows.
"""

from __future__ import annotations

import functools

import pytest
import torch

from memit_fast.layouts import FAMILIES, layout_for
from memit_fast.layouts.base import prefix_attention
from memit_fast.layouts.shared_prefix import shared_prefix_attention

from test_layouts import CONFIGS, NAMES, _assert_close, _hparams, _layout, _model, _pad, _rows, _rtol

TEMPLATE_LENGTHS = [0, 4, 2]  # n = 3 templates, padded to 4; template 0 has no tokens (no BOS)
OWN_LENGTHS = [[2, 0, 3], [1, 4, 0], [0, 2, 2]]  # per request, per template
SUFFIX_LENGTHS = [[3, 1, 2], [2, 2, 4], [1, 3, 3]]
NOT_USED = {(1, 1), (2, 2)}  # (request, template): rows that do not start with their template's tokens


def _batch(seed=0):
    templates = _rows(TEMPLATE_LENGTHS, seed)
    own = [_rows(lengths, seed + 1 + b) for b, lengths in enumerate(OWN_LENGTHS)]
    suffix = [_rows(lengths, seed + 10 + b) for b, lengths in enumerate(SUFFIX_LENGTHS)]
    rows = [(templates[j], own[b][j], suffix[b][j], (b, j) not in NOT_USED) for b in range(len(OWN_LENGTHS)) for j in range(len(templates))]
    return templates, rows


def _runners(layout, layer, stop, device="cpu", from_templates=False):
    """(the per-row runner over whole prefixes, the shared-template runner (from_templates: the
    per-row runner built from the templates' keys and values), the suffixes' mask) of `_batch`."""
    templates, rows = _batch()
    template_ids, template_mask = _pad(templates)
    template_mask[[j for j, t in enumerate(templates) if not t]] = 0
    own_ids, own_mask = _pad([o for _, o, _, _ in rows])
    own_mask[[r for r, (_, o, _, _) in enumerate(rows) if not o]] = 0
    prefix = [t * u + o for t, o, _, u in rows]  # a row that does not use its template: its own prefix only
    prefix_ids, prefix_mask = _pad(prefix)
    prefix_mask[[r for r, p in enumerate(prefix) if not p]] = 0
    suffix_ids, suffix_mask = _pad([s for _, _, s, _ in rows])
    start = torch.tensor([len(p) for p in prefix])
    last = start + torch.tensor([len(s) for _, _, s, _ in rows]) - 1
    pos = torch.minimum(start[:, None] + torch.arange(suffix_ids.shape[1]), last[:, None])
    uses = torch.tensor([u for *_, u in rows])
    prefix_ids, prefix_mask, suffix_ids, suffix_mask, pos, template_ids, template_mask, own_ids, own_mask, uses = (
        t.to(device) for t in (prefix_ids, prefix_mask, suffix_ids, suffix_mask, pos, template_ids, template_mask, own_ids, own_mask, uses))
    per_row = layout.suffix_runner(prefix_ids, prefix_mask, suffix_ids, suffix_mask, pos, layer, stop)
    make = layout.template_suffix_runner if from_templates else layout.shared_suffix_runner
    other = make(template_ids, template_mask, own_ids, own_mask, suffix_ids, pos, layer, stop, uses=uses)
    return per_row, other, suffix_mask


@pytest.mark.parametrize("from_templates", [False, True], ids=["held-once", "copied-per-row"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_shared_template_cache_equals_per_row_cache(name, layer, from_templates):
    """The templates' keys and values computed once, held once or copied into each row's cache
    (its key slots then the template's, padding, the own prefix's), give the runner over whole
    prefixes: block `layer`'s output, the forward, the forward after the batch shrinks."""
    close = functools.partial(_assert_close, rtol=_rtol(name))
    layout = _layout(name)
    stop = layout.n_layers - 1
    per_row, shared, mask = _runners(layout, layer, stop, from_templates=from_templates)
    assert shared.cache.length.tolist() == per_row.cache.length.tolist()
    if from_templates:
        assert type(shared) is type(per_row) and sorted(shared.cache.kv) == sorted(per_row.cache.kv)
    close(shared.hidden, per_row.hidden, mask, "block layer's output")
    delta = torch.randn(per_row.hidden.shape, generator=torch.Generator().manual_seed(3), dtype=per_row.hidden.dtype)
    with torch.no_grad():
        close(shared.forward(shared.hidden + delta), per_row.forward(per_row.hidden + delta), mask, "forward")
        keep = torch.arange(len(mask))
        for requests in ([2, 0], [1]):  # the batch shrinks twice, whole requests (3 rows each)
            rows = (torch.tensor(requests)[:, None] * 3 + torch.arange(3)).reshape(-1)
            shared.select(rows)
            per_row.select(rows)
            keep = keep[rows]
            h = per_row.hidden[keep] + delta[keep]
            close(shared.forward(h), per_row.forward(h), mask[keep], f"forward after keeping rows {keep.tolist()}")
    if not from_templates:
        with pytest.raises(ValueError):
            shared.select(torch.tensor([0, 1]))  # not whole requests


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_shared_prefix_attention_equals_prefix_attention(heads, kv_heads, dtype, tol):
    """Three parts joined as scores == prefix_attention over each row's template and own prefix
    joined (float64), outputs and input gradients, with padded templates and own prefixes;
    tolerances relative to the largest value, per dtype."""
    g = torch.Generator().manual_seed(5)
    B, n, S, T, P, hd = 2, 3, 4, 5, 3, 8
    R = B * n
    q, k, v = (torch.randn(R, h, S, hd, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    template = tuple(torch.randn(n, kv_heads, T, hd, generator=g, dtype=torch.float64) for _ in range(2))
    own = tuple(torch.randn(R, kv_heads, P, hd, generator=g, dtype=torch.float64) for _ in range(2))
    t_ok = torch.arange(T)[None] < torch.tensor([5, 0, 2])[:, None]  # (n, T)
    o_ok = torch.arange(P)[None] < torch.tensor([3, 1, 0, 2, 3, 0])[:, None]  # (R, P)
    causal = torch.ones(S, S, dtype=torch.bool).tril().expand(R, S, S)
    mask = torch.cat([torch.cat([t_ok.repeat(B, 1), o_ok], 1)[:, None].expand(R, S, T + P), causal], -1)[:, None]

    def run(fn, dt):
        ins = [t.detach().to(dt, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*ins, *(tuple(t.to(dt) for t in pair) for pair in (template, own)))
        out.float().pow(2).sum().backward()
        return [out.double()] + [t.grad.double() for t in ins]

    joined = lambda q, k, v, t, o: prefix_attention(q, k, v, tuple(torch.cat([a.repeat(B, 1, 1, 1), b], 2) for a, b in zip(t, o)), mask, 0.3)  # noqa: E731
    want = run(joined, torch.float64)
    got = run(lambda q, k, v, t, o: shared_prefix_attention(q, k, v, t, o, mask, n, 0.3), dtype)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < tol, f"{name}: {err:.2e} relative to float64 (tolerance {tol:.0e} for {dtype})"


@pytest.mark.cuda
@pytest.mark.parametrize("from_templates", [False, True], ids=["held-once", "copied-per-row"])
@pytest.mark.parametrize("name", ["gpt2", "gptj-partial-rotary", "neox-parallel", "llama-gqa", "mistral-sliding-window"])
def test_shared_template_cache_in_bfloat16_on_the_gpu(name, from_templates):
    """bf16 on the GPU: the shared-template runner's forward (or the per-row runner built from the
    templates, whose steps run the Triton kernels) is within twice the per-row runner's own bf16
    error, both against the per-row runner in float64 over the same (bf16-rounded) weights."""
    import copy

    model = copy.deepcopy(_model(name)).to("cuda", torch.bfloat16)
    reference = copy.deepcopy(model).to(torch.float64)
    layouts = [layout_for(m, _hparams(m)) for m in (model, reference)]
    assert all(type(lay) is FAMILIES[CONFIGS[name][0]] for lay in layouts)
    (per_row, shared, mask), (ref, _, _) = (_runners(lay, 0, lay.n_layers - 1, "cuda", from_templates) for lay in layouts)
    delta = torch.randn(ref.hidden.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).cuda()
    keep = mask.cuda().bool()
    with torch.no_grad():
        want = ref.forward(ref.hidden + delta)[keep]
        errors = [(r.forward(r.hidden + delta.to(r.hidden.dtype)).double()[keep] - want).abs().max().item() for r in (shared, per_row)]
    assert errors[0] <= 2 * errors[1], f"{name}: shared bf16 error {errors[0]:.3e} > twice the per-row runner's ({errors[1]:.3e})"
