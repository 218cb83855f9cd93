"""z_probe's experimental attention (`split-bf16`: scores as low-precision products accumulated in
float32, with a hand-written backward) against the library's `prefix_attention`: outputs and
input gradients on the CPU, where its products are cast to float32 first (the GPU kernel,
torch.bmm(out_dtype=float32), runs only on CUDA), grouped-query heads and a padded prefix."""

import torch

import z_probe
from memit_fast.layouts.base import prefix_attention


def test_low_precision_scores_equal_prefix_attention_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, S, P, hd = 3, 6, 2, 4, 5, 8
    q, k, v = (torch.randn(B, h, S, hd, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, H_kv, H_kv))
    past = tuple(torch.randn(B, H_kv, P, hd, generator=g, dtype=torch.float64) for _ in range(2))
    prefix_ok = torch.arange(P)[None] < torch.tensor([5, 2, 0])[:, None]  # the last row has no prefix
    mask = torch.cat([prefix_ok[:, None, None].expand(B, 1, S, P), torch.ones(S, S, dtype=torch.bool).tril().expand(B, 1, S, S)], -1)
    w = torch.randn(B, H, S, hd, generator=g, dtype=torch.float64)
    results = []
    for attend in (prefix_attention, z_probe._prefix_attention_low_precision):
        out = attend(q, k, v, past, mask, 0.3)
        results.append((out, *torch.autograd.grad((out * w).sum(), (q, k, v))))
    for name, a, b in zip(("output", "dq", "dk", "dv"), *results):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-5, f"{name}: {err:.1e} (float32 products on the CPU; tolerance 1e-5)"
