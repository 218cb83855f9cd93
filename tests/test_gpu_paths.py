"""The CUDA paths (Triton accumulator and row gather, cuSOLVER solves) agree with the CPU/reference."""

import pytest
import torch

import memit_fast
import tiny

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])  # bf16: the model computes in bf16
def test_statistics_on_cuda_match_cpu(dtype, tol):
    m = tiny.model("llama", dtype=torch.float32)
    hp = tiny.hparams(m)
    texts = tiny.corpus_lines(60)
    cpu = memit_fast.compute_stats(m, tiny.tokenizer(), hp, corpus=texts, use_cache=False, progress=False)
    gpu = memit_fast.compute_stats(m.to("cuda", dtype), tiny.tokenizer(), hp, corpus=texts, use_cache=False, progress=False)
    for layer in hp.layers:
        assert gpu[layer].count == cpu[layer].count
        ref = cpu[layer].mom2.double()
        assert (gpu[layer].mom2.cpu().double() - ref).norm() / ref.norm() < tol


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_fast_equals_reference_on_cuda(arch):
    m = tiny.model(arch, dtype=torch.float64).to("cuda")
    hp = tiny.hparams(m)
    stats = tiny.stats(m, hp)
    before = {n: p.clone() for n, p in m.named_parameters()}
    kw = dict(stats=stats, context_templates=tiny.TEMPLATES, progress=False)
    _, orig = memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, return_orig_weights=True, **kw)
    fast = {n: p.clone() for n, p in m.named_parameters()}
    memit_fast.restore(m, orig)
    memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, mode="reference", **kw)
    for n in orig:
        d_fast, d_ref = fast[n] - before[n], dict(m.named_parameters())[n] - before[n]
        assert (d_fast - d_ref).norm() / d_ref.norm() < 1e-8, n


def test_bf16_model_edits_close_to_float32():
    """A bf16 model: z and keys in float32, solve in float64; the deltas follow the float32 model's
    within what bf16 forward passes and bf16 weight storage allow (0.103 measured on an H200; a
    broken bf16 path gives deltas of another direction, a relative difference near 1 or more)."""
    m32 = tiny.model("llama", dtype=torch.float32).to("cuda")
    hp = tiny.hparams(m32, v_num_grad_steps=3)
    stats = tiny.stats(m32, hp)
    kw = dict(stats=stats, context_templates=tiny.TEMPLATES, progress=False, return_orig_weights=True)
    m16 = tiny.model("llama", dtype=torch.bfloat16).to("cuda")
    for m in (m32, m16):
        _, orig = memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, **kw)
        m.deltas = {n: dict(m.named_parameters())[n].float().cpu() - v.float() for n, v in orig.items()}
    for n, d32 in m32.deltas.items():
        assert (m16.deltas[n] - d32).norm() / d32.norm() < 0.25, n
