"""The fp16x3 products of the solve against float64 (Triton's interpreter on CPU)."""

import pytest
import torch

from memit_fast.kernels import covariance as cov
from memit_fast.kernels import gram

U = 2.0**-24
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"ptr": cov.TileConfig(32, 32, 16, 2, 4, 2), "tma": cov.TileConfig(32, 64, 16, 2, 4, 2, tma=True)}


def bound(x):
    """Relative error allowed for the lower triangle of X^T X from fp16x3. The split holds each
    element of column i to 2^-23 amax_i (the column's largest magnitude, not the element's), so
    a product term errs by at most 2^-23 (amax_i |x_tj| + |x_ti| amax_j); dropping L^T L and the
    fp32 sums over 3N terms add (sqrt(3N) + 8) u |x_ti| |x_tj| (as in test_kernels_covariance):
    || 2^-23 (amax c^T + c amax^T) + (sqrt(3N) + 8) u |X|^T |X| ||_F / ||X^T X||_F, c = sum_t |x_t|."""
    x = x.double()
    s, a = (x.mT @ x).tril(), (x.abs().mT @ x.abs()).tril()
    amax, c = x.abs().amax(0), x.abs().sum(0)
    split = 2.0**-23 * (amax[:, None] * c[None, :] + c[:, None] * amax[None, :]).tril()
    sums = ((3 * x.shape[0]) ** 0.5 + 8) * U * a * (SUMS_ON_TENSOR_CORES if x.is_cuda else 1)
    return float((split + sums).norm() / s.norm().clamp_min(1e-300))


# Hopper's wgmma accumulates in fp32 but not with IEEE round-to-nearest additions: on an H200 the
# sum term came out 2.3x the IEEE estimate (7.1e-5 at n=10,000, d=2048, m=512); allow 4x.
SUMS_ON_TENSOR_CORES = 4


def keys_like(n, d, m):
    """Keys (d, n) spanning six decades across rows, with a positive mean, and residuals (m, n)."""
    k = (torch.randn(d, n, device=DEVICE) + 0.5) * torch.logspace(-3, 3, d, device=DEVICE)[:, None]
    return k, torch.randn(m, n, device=DEVICE) * 1e-2


def test_split_holds_each_column_to_2_to_minus_23():
    k, r = keys_like(40, 33, 5)
    r[:, 2] = 0.0  # a zero column
    x1, x2, inv = gram.split_fp16x3([k.mT, r.mT])
    n, p = 40, 38
    assert x1.shape == (3 * n, p) == x2.shape and x1.dtype == torch.float16
    assert (x1.stride(0) * 2) % 16 == 0, "rows must stay 16-byte aligned for TMA"
    scale = 1 / inv.double().cpu()
    assert torch.equal(torch.frexp(scale)[0], torch.full_like(scale, 0.5)), "scales are powers of two"
    x = torch.cat([k.mT, r.mT], 1).double().cpu() * scale
    amax = x.abs().amax(0)
    assert bool(((amax >= 2**14) & (amax < 2**15) | (amax == 0)).all())
    hi, lo = x1[:n].double().cpu(), x1[2 * n:].double().cpu()
    assert float(((hi + lo - x).abs() / amax.clamp_min(1)).max()) < 2**-23
    assert torch.equal(x1[n:2 * n], x1[:n]) and torch.equal(x2[:n], x1[:n]) and torch.equal(x2[2 * n:], x1[:n])
    assert torch.equal(x2[n:2 * n], x1[2 * n:])


@pytest.mark.triton_loop
@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("n,d,m", [(1, 1, 1), (50, 37, 9), (120, 200, 30), (7, 64, 0)])
def test_gram_matches_float64(name, n, d, m):
    k, r = keys_like(n, d, m)
    pieces = [k.mT] + ([r.mT] if m else [])
    got = gram.gram_fp16x3(pieces, config=SMALL[name])
    x = torch.cat([t.double() for t in pieces], 1)
    want = (x.mT @ x).cpu()
    err = float((got.double().cpu() - want).tril().norm() / want.tril().norm())
    assert err < bound(x), f"relative error {err:.2e} (bound {bound(x):.2e})"


def test_reference_twin():
    a, b = torch.randn(5, 3), torch.randn(5, 2, dtype=torch.bfloat16)
    x = torch.cat([a.double(), b.double()], 1)
    got = gram.gram_reference([a, b])
    assert got.dtype == torch.float32 and torch.equal(got, (x.mT @ x).float())


# fp16x3 against the twin (float64 products rounded to float32), relative error of the lower
# triangle: the split holds float32 inputs to 2^-23 of their column's largest magnitude and
# 16-bit inputs exactly, and 3N float32 sums add ~sqrt(3N) u; with this data's six-decade rows
# (`bound` above) float32 needs the most.
TWIN_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-6, torch.float16: 5e-6}


@pytest.mark.triton_loop
@pytest.mark.parametrize("dtype", list(TWIN_TOL))
def test_kernel_matches_twin(dtype):
    k, r = keys_like(60, 40, 8)
    pieces = [k.mT.to(dtype), r.mT.to(dtype)]
    got, want = gram.gram_fp16x3(pieces, config=SMALL["ptr"]), gram.gram_reference(pieces)
    err = float((got.double() - want.double()).tril().norm() / want.double().tril().norm())
    assert err < TWIN_TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("n,d,m", [(10_000, 2048, 512), (1200, 2000, 300), (3, 4096, 0)])
def test_cuda_gram_real_sizes(n, d, m):
    """At GPT-J's ratios (n = 10,000; d_ff, d_model scaled by 1/8) and awkward ones, default tiles."""
    k, r = keys_like(n, d, m)
    pieces = [k.mT] + ([r.mT] if m else [])
    got = gram.gram_fp16x3(pieces)
    x = torch.cat([t.double() for t in pieces], 1)
    want = (x.mT @ x).tril()
    err = float((got.double().tril() - want).norm() / want.norm())
    tol = bound(x)
    assert err < tol, f"relative error {err:.2e} (bound {tol:.2e})"
