"""z's fused attention (memit_fast/layouts/fused.py: rotary, casts, scores, mask, softmax and the
output's layout compiled by torch.compile around the same matrix products) against its eager
twins, base.prefix_attention and shared_prefix.shared_prefix_attention, through the runners of
z's steps: block `stop`'s output and the gradient of a loss with respect to block `layer`'s
output, families of tests/test_layouts.py, both prefix caches. On the CPU in float64 the graphs
are traced with the "aot_eager" backend (Dynamo's capture and the autograd graph, quicker) for
each rotary form and compiled by Inductor for GPT-J; on the GPU by Inductor in float32 and bf16.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import tiny
from memit_fast.config import ConfigError
from memit_fast.layouts import fused, layout_for
from memit_fast.targets import compute_targets
from memit_fast.templates import flatten
from memit_fast.tokens import encode_requests
from memit_fast.edit_requests import normalize_requests

from test_layouts import _hparams, _layout, _model
from test_shared_prefix import _runners

# the rotary forms besides GPT-J's (compiled by Inductor below): none
# (GPT-2), rotate-half on a share of the head (NeoX) and on all of it with grouped queries (Llama)
TRACED = ["gpt2", "neox-parallel", "llama-gqa"]


@pytest.fixture
def backend(monkeypatch):
    """Set fused.BACKEND for one test, with fresh compiled functions and no earlier failure."""

    def use(name):
        torch._dynamo.reset()  # graphs compiled by another backend would otherwise be reused
        monkeypatch.setattr(fused, "BACKEND", name)
        monkeypatch.setattr(fused, "_compiled", {})
        monkeypatch.setitem(fused._state, "failed", None)

    return use


def _step(runner, fused_on: bool, h0: torch.Tensor):
    """(block stop's output, d loss / d h0) of one step from h0, fused or eager."""
    runner.ctx.fused = fused_on
    h = h0.detach().clone().requires_grad_()
    out = runner.forward(h)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).view(out.shape)
    (out.double() * weights).sum().backward()
    return out.detach().double(), h.grad.double()


def _compare(layout, device="cpu", reference_layout=None):
    """{(cache, fused): [output error, gradient error]}: max errors, relative to the largest value,
    of fused and of eager steps against eager steps of `reference_layout` (default: the same
    layout), on the real (unpadded) suffix tokens, for both prefix caches."""
    errors, stop = {}, layout.n_layers - 1
    *runners, mask = _runners(layout, 0, stop, device)
    refs = _runners(reference_layout, 0, stop, device)[:2] if reference_layout is not None else runners
    keep = mask.bool()
    for kind, runner, ref in zip(("per-row", "shared"), runners, refs):
        delta = torch.randn(ref.hidden.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
        want = _step(ref, False, ref.hidden.double() + delta)
        for on in (True, False):
            got = _step(runner, on, (runner.hidden.double() + delta).to(runner.hidden.dtype))
            errors[kind, on] = [((g - w)[keep].abs().max() / w[keep].abs().max()).item() for g, w in zip(got, want)]
    return errors


@pytest.mark.parametrize("name", TRACED)
def test_fused_steps_equal_eager_steps_traced(name, backend):
    backend("aot_eager")
    errors = _compare(_layout(name))
    for (kind, on), (out, grad) in errors.items():
        assert out < 1e-12 and grad < 1e-12, f"{name} {kind} fused={on}: output {out:.1e}, gradient {grad:.1e} (float64 tolerance 1e-12)"


def test_fused_steps_equal_eager_steps_compiled_on_the_cpu(backend):
    """Inductor's own kernels (C++ on the CPU), GPT-J's partial interleaved rotary, float64."""
    backend("inductor")
    errors = _compare(_layout("gptj-partial-rotary"))
    for (kind, on), (out, grad) in errors.items():
        assert out < 1e-12 and grad < 1e-12, f"{kind} fused={on}: output {out:.1e}, gradient {grad:.1e} (float64 tolerance 1e-12)"


def test_one_graph_serves_every_chunk_shape(backend, monkeypatch):
    """z with fused attention compiles one graph for chunks of different rows and widths, and gives
    the eager z (float64)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    backend(counter)
    monkeypatch.setenv("MEMIT_FAST_COMPILE", "1")
    m, tok = tiny.model("gptj"), tiny.tokenizer()
    hp = tiny.hparams(m).replace(v_num_grad_steps=3)
    enc = encode_requests(tok, normalize_requests(tiny.REQUESTS), flatten(tiny.TEMPLATES), hp.fact_token)
    fused_z = [compute_targets(m, tok, enc, hp, chunk_tokens=ct, progress=False) for ct in (20, 400)]
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled for two chunkings"
    monkeypatch.setenv("MEMIT_FAST_COMPILE", "0")
    eager_z = compute_targets(m, tok, enc, hp, chunk_tokens=400, progress=False)
    for z in fused_z:
        assert ((z - eager_z).norm(dim=1) / eager_z.norm(dim=1)).max() < 1e-12


def test_a_failed_compile_warns_and_z_goes_on_eagerly(backend, monkeypatch, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    backend(broken)
    layout = _layout("llama-gqa")
    runner, _, _ = _runners(layout, 0, layout.n_layers - 1)
    h = runner.hidden.double() + 0.1
    with caplog.at_level(logging.WARNING, logger="memit_fast.layouts.fused"):
        got = _step(runner, True, h)
    assert "torch.compile failed" in caplog.text and "no compiler here" in caplog.text
    monkeypatch.setenv("MEMIT_FAST_COMPILE", "1")
    assert not fused.use_fused()  # off for the rest of the process
    want = _step(runner, False, h)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_switch(monkeypatch):
    monkeypatch.delenv("MEMIT_FAST_COMPILE", raising=False)
    assert not fused.use_fused()
    monkeypatch.setenv("MEMIT_FAST_COMPILE", "0")
    assert not fused.use_fused()
    monkeypatch.setenv("MEMIT_FAST_COMPILE", "1")
    assert fused.use_fused()
    monkeypatch.setenv("MEMIT_FAST_COMPILE", "yes")
    with pytest.raises(ConfigError, match="MEMIT_FAST_COMPILE"):
        fused.use_fused()


def test_step_context_reaches_the_copies_for_other_devices(monkeypatch):
    """A model split over GPUs keeps a copy of the context per device; those made before z's steps
    (the prefix pass) must see the steps' settings too (the meta device stands in for a second GPU)."""
    from memit_fast.layouts.base import step_context

    layout = _layout("llama-gqa")
    h = torch.zeros(2, 3, layout.config.hidden_size, dtype=torch.float64)
    ctx = layout.context(h, torch.arange(3).expand(2, 3))
    assert not ctx.on(torch.device("meta")).fused
    monkeypatch.setenv("MEMIT_FAST_COMPILE", "1")
    ctx = step_context(layout, ctx)
    assert ctx.fused and ctx.on(torch.device("meta")).fused


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["gptj-partial-rotary", "llama-gqa"])  # each compiles anew: about a minute
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_steps_on_the_gpu(name, dtype, backend):
    """Inductor's Triton kernels: fused steps against float64 eager steps over the same (rounded)
    weights, within twice the eager steps' own error in that dtype (and 1e-5 in float32)."""
    backend("inductor")
    model = copy.deepcopy(_model(name)).to("cuda", dtype)
    reference = copy.deepcopy(model).to(torch.float64)
    layout, ref_layout = (layout_for(m, _hparams(m)) for m in (model, reference))
    errors = _compare(layout, "cuda", ref_layout)
    for kind in ("per-row", "shared"):
        for what, f, e in zip(("output", "gradient"), errors[kind, True], errors[kind, False]):
            assert f <= 2 * e + (1e-5 if dtype == torch.float32 else 0), f"{name} {kind} {dtype}: {what} fused {f:.2e}, eager {e:.2e}"
            if dtype == torch.float32:
                assert f < 1e-5, f"{name} {kind}: {what} fused {f:.2e} (float32 tolerance 1e-5)"
