"""The prefix-attention kernels against their twin, layouts.base.prefix_attention (Triton's
interpreter on the CPU, compiled on a GPU): outputs and gradients on fresh random inputs of
awkward sizes. Tolerance: the kernel's largest error against the twin in float64 (relative to the
largest value) is at most twice the twin's own error run in the same dtype, plus 2^-10 (bf16) /
2^-13 (fp16) for the different order of summation."""

import pytest
import torch

from memit_fast.kernels import prefix_attention as kernel
from memit_fast.layouts.base import prefix_attention

SLACK = {torch.bfloat16: 2**-10, torch.float16: 2**-13}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, H_kv, S, P, D, dtype, window=None, seed=0):
    """q (a transposed view, as the projections give it), k, v, the cache and a mask with padded
    prefixes (some rows without any prefix token) and, optionally, a sliding window."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2)
    k, v = (torch.randn(B, H_kv, S, D, generator=g).to(dtype) for _ in range(2))
    past = tuple(torch.randn(B, H_kv, P, D, generator=g).to(dtype) for _ in range(2))
    real = torch.randint(0, P + 1, (B,), generator=g)
    real[0] = 0
    prefix_ok = torch.arange(P)[None] < real[:, None]
    mask = torch.cat([prefix_ok[:, None, :].expand(B, S, P), torch.ones(S, S, dtype=torch.bool).tril().expand(B, S, S)], -1)
    if window is not None:
        pos = real[:, None] + torch.arange(S)
        keys = torch.cat([torch.arange(P).expand(B, P), pos], 1)
        mask = mask & ((pos[:, :, None] - keys[:, None, :]) < window)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    return on(q), on(k), on(v), tuple(map(on, past)), on(mask[:, None])


def _run(fn, q, k, v, past, mask, scale, dtype, grad_out):
    ins = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
    out = fn(*ins, tuple(t.to(dtype) for t in past), mask, scale)
    out.backward(grad_out.to(dtype))
    return [out.double()] + [t.grad.double() for t in ins]


CASES = [  # B, H, H_kv, S, P, D, window
    (3, 4, 4, 3, 5, 32, None),
    (2, 8, 2, 5, 37, 80, None),  # grouped heads, a head size that is no power of two, two key blocks
    (2, 6, 2, 17, 0, 64, None),  # no prefix; 17 queries: 32-row tiles, a group over two programs
    (2, 14, 2, 3, 40, 64, 6),  # seven heads per key/value head, a sliding window
    (5, 2, 1, 1, 70, 16, None),  # one query per row
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,H_kv,S,P,D,window", CASES)
def test_kernel_matches_twin(dtype, B, H, H_kv, S, P, D, window):
    q, k, v, past, mask = _inputs(B, H, H_kv, S, P, D, dtype, window)
    assert kernel.supported(q, past)
    grad_out = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = _run(prefix_attention, q, k, v, past, mask, 0.3, torch.float64, grad_out)
    twin = _run(prefix_attention, q, k, v, past, mask, 0.3, dtype, grad_out)
    got = _run(kernel.prefix_attention_triton, q, k, v, past, mask, 0.3, dtype, grad_out)
    for name, a, t, r in zip(("output", "dq", "dk", "dv"), got, twin, ref):
        scale = r.abs().max()
        err, twin_err = ((a - r).abs().max() / scale).item(), ((t - r).abs().max() / scale).item()
        assert err <= 2 * twin_err + SLACK[dtype], f"{name}: kernel {err:.2e}, twin in {dtype} {twin_err:.2e}"


def test_default_scale_and_output_layout():
    q, k, v, past, mask = _inputs(2, 4, 2, 3, 6, 16, torch.bfloat16)
    out = kernel.prefix_attention_triton(q, k, v, past, mask)
    want = prefix_attention(q.double(), k.double(), v.double(), tuple(t.double() for t in past), mask)
    assert out.shape == want.shape and out.transpose(1, 2).is_contiguous()  # (B, S, H, h_d) underneath
    assert ((out.double() - want).abs().max() / want.abs().max()).item() < 2**-6


def test_supported_only_where_the_kernel_runs_as_the_twin():
    q, k, v, past, mask = _inputs(1, 2, 2, 3, 4, 16, torch.bfloat16)
    assert kernel.supported(q, past)
    assert not kernel.supported(q.float(), tuple(t.float() for t in past)), "float32: the twin"
    assert not kernel.supported(q, (past[0].float(), past[1])), "a float32 key cache"
    assert not kernel.supported(q, (past[0].requires_grad_(), past[1])), "a cache that wants gradients"
    long = torch.zeros(1, 2, kernel.MAX_SUFFIX + 1, 16, dtype=torch.bfloat16, device=q.device)
    assert not kernel.supported(long, past)
    wide = torch.zeros(1, 2, 3, kernel.MAX_HEAD_DIM + 1, dtype=torch.bfloat16, device=q.device)
    assert not kernel.supported(wide, past)


@pytest.mark.cuda
@pytest.mark.parametrize("H,H_kv,D,S,P", [(16, 16, 256, 4, 31), (32, 8, 128, 6, 23), (25, 25, 64, 9, 40)])
def test_kernel_matches_twin_at_real_sizes(H, H_kv, D, S, P):
    """GPT-J, Llama-3-8B and GPT-2 XL head shapes, 300 rows, bf16."""
    q, k, v, past, mask = _inputs(300, H, H_kv, S, P, D, torch.bfloat16)
    grad_out = torch.randn(300, H, S, D, device="cuda")
    ref = _run(prefix_attention, q, k, v, past, mask, D**-0.5, torch.float64, grad_out)
    twin = _run(prefix_attention, q, k, v, past, mask, D**-0.5, torch.bfloat16, grad_out)
    got = _run(kernel.prefix_attention_triton, q, k, v, past, mask, D**-0.5, torch.bfloat16, grad_out)
    for name, a, t, r in zip(("output", "dq", "dk", "dv"), got, twin, ref):
        scale = r.abs().max()
        err, twin_err = ((a - r).abs().max() / scale).item(), ((t - r).abs().max() / scale).item()
        assert err <= 2 * twin_err + SLACK[torch.bfloat16], f"{name}: kernel {err:.2e}, twin {twin_err:.2e}"


def test_z_through_the_kernel_as_through_the_twin(monkeypatch):
    """z of a bf16 model with attention over the cached prefix in the kernel (allowed on the CPU
    here, in the interpreter; the cache then stays in bf16) is as close to the float32 model's z as
    z through the twin: |z_kernel - z_32| <= 2 |z_twin - z_32| + 2^-10 |z_32|, largest over requests."""
    import tiny
    from memit_fast.edit_requests import normalize_requests
    from memit_fast.layouts import base
    from memit_fast.targets import compute_targets
    from memit_fast.tokens import encode_requests
    from memit_fast.templates import flatten

    m32 = tiny.model("llama", dtype=torch.float32).to(DEVICE)  # grouped-query heads
    tok = tiny.tokenizer()
    hp = tiny.hparams(m32, v_num_grad_steps=3)
    enc = encode_requests(tok, normalize_requests(tiny.REQUESTS), flatten(tiny.TEMPLATES), hp.fact_token)
    z32 = compute_targets(m32, tok, enc, hp, progress=False)
    m16 = tiny.model("llama", dtype=torch.bfloat16).to(DEVICE)
    z_twin = compute_targets(m16, tok, enc, hp, progress=False)
    calls = []
    real = kernel.prefix_attention_triton
    monkeypatch.setattr(base, "prefix_kernel", lambda device, dtype: dtype in (torch.bfloat16, torch.float16))
    monkeypatch.setattr(kernel, "prefix_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    z_kernel = compute_targets(m16, tok, enc, hp, progress=False)
    assert calls, "the kernel never ran"
    err, twin_err = ((z - z32).norm(dim=1) for z in (z_kernel, z_twin))
    assert (err <= 2 * twin_err + 2**-10 * z32.norm(dim=1)).all(), (err, twin_err)


def test_kernels_that_do_not_compile_leave_the_twin(monkeypatch, caplog):
    """A Triton or GPU that cannot compile the kernels: attend_prefix warns once and runs the twin."""
    from triton.runtime.errors import OutOfResources

    from memit_fast.layouts import base

    tries = []

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tries.append(grid)
                raise OutOfResources(300_000, 232_448, "shared memory")
            return launch

    monkeypatch.setattr(kernel, "_compiled", {})
    monkeypatch.setattr(kernel, "_prefix_attention_fwd", Broken())
    monkeypatch.setattr(base, "prefix_kernel", lambda device, dtype: True)
    q, k, v, past, mask = _inputs(2, 4, 2, 3, 6, 16, torch.bfloat16)
    for _ in range(2):
        with caplog.at_level("WARNING", logger=kernel.__name__):
            out = base.attend_prefix(q, k, v, past, mask, 0.3)
        assert torch.equal(out, prefix_attention(q, k, v, past, mask, 0.3))
    assert len(tries) == 1, "the failed configuration was tried again"
    assert sum("do not compile" in r.getMessage() for r in caplog.records) == 1


def test_the_compile_check_draws_nothing_from_the_rng(monkeypatch):
    monkeypatch.setattr(kernel, "_compiled", {})
    q, k, v, past, mask = _inputs(1, 2, 2, 3, 4, 16, torch.bfloat16)
    state = torch.get_rng_state() if DEVICE == "cpu" else torch.cuda.get_rng_state()
    assert kernel.compiles(q, k)
    assert torch.equal(state, torch.get_rng_state() if DEVICE == "cpu" else torch.cuda.get_rng_state())


def test_the_chunk_estimate_counts_the_cache_the_kernels_keep(monkeypatch):
    """With the kernels the per-row cache keeps its keys in bf16 (2 bytes, not float32's 4): z's
    chunk estimate per cached prefix token says so; the shared-template cache still holds float32 keys."""
    import tiny
    from memit_fast import targets
    from memit_fast.layouts import base, layout_for

    m = tiny.model("llama", dtype=torch.bfloat16)
    hp = tiny.hparams(m)
    layout = layout_for(m, hp)
    _, twin = targets._bytes_per_token(m, layout, hp)
    monkeypatch.setattr(base, "prefix_kernel", lambda device, dtype: True)
    _, with_kernels = targets._bytes_per_token(m, layout, hp)
    assert with_kernels[True] == twin[True]
    assert with_kernels[False] * (4 + 2) == twin[False] * (2 + 2)  # keys + values per element


def test_a_bad_switch_value_is_one_clear_error_and_the_weights_stay(monkeypatch):
    """MEMIT_FAST_ATTENTION_KERNEL is read wherever z runs, the CPU included (there it picks
    nothing, but a value other than 0 or 1 is not ignored)."""
    import memit_fast
    import tiny
    from memit_fast.config import ConfigError

    monkeypatch.setenv("MEMIT_FAST_ATTENTION_KERNEL", "yes")
    m = tiny.model("llama", dtype=torch.float32)
    hp = tiny.hparams(m, v_num_grad_steps=2)
    stats = tiny.stats(m, hp)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ConfigError, match="MEMIT_FAST_ATTENTION_KERNEL='yes' must be 0 or 1"):
        memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, stats=stats, context_templates=tiny.TEMPLATES, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
