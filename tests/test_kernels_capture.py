"""The row-capture kernel against its twin (Triton's interpreter on CPU)."""

import pytest
import torch

from memit_fast import ops
from memit_fast.kernels import capture

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def hidden_views(B, S, d, dtype, device):
    """A contiguous (B, S, d) tensor and two strided views of the same shape."""
    base = torch.randn(B, S, d, device=device).to(dtype)
    wide = torch.randn(B, S + 3, d + 5, device=device).to(dtype)[:, 1:S + 1, 2:d + 2]
    swapped = torch.randn(S, B, d, device=device).to(dtype).transpose(0, 1)
    return [base, wide, swapped]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("B,S,d,n", [(1, 1, 1, 1), (2, 7, 33, 5), (3, 5, 3000, 4)])
def test_gather_matches_twin(dtype, out_dtype, B, S, d, n):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for h in hidden_views(B, S, d, dtype, device):
        index = torch.randint(0, B * S, (n,), device=device)
        buf = torch.full((n + 4, d + 2), float("nan"), dtype=out_dtype or dtype, device=device)
        out = buf[2:n + 2, 1:d + 1]  # a strided slice of a bigger buffer
        capture.gather_rows_triton(h, index.int(), out)
        want = torch.empty_like(out)
        capture.gather_rows_reference(h, index, want)
        assert torch.equal(out, want)
        assert torch.isnan(buf[:2]).all() and torch.isnan(buf[:, 0]).all(), "wrote outside the slice"


def test_bad_index_gives_nan_row_and_twin_raises():
    h = torch.randn(2, 3, 8)
    out = torch.zeros(3, 8)
    capture.gather_rows_triton(h, torch.tensor([0, 6, -1]), out)
    assert torch.equal(out[0], h[0, 0]) and torch.isnan(out[1:]).all()
    with pytest.raises(IndexError):
        capture.gather_rows_reference(h, torch.tensor([6]), out[:1])


def test_public_function():
    h = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    index = torch.tensor([9, 0, 4])
    out = ops.gather_rows(h, index, dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, h.reshape(10, 16)[index].float())
    assert torch.equal(ops.gather_rows(h[0], torch.tensor([3])), h[0, 3:4])
    with pytest.raises(ValueError, match="out must be"):
        ops.gather_rows(h, index, torch.empty(2, 16))


@pytest.mark.cuda
@pytest.mark.parametrize("d", [4096, 6400, 14336, 16384])
def test_cuda_gather_real_sizes(d):
    h = torch.randn(8, 1024, d, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, 8 * 1024, (1000,), device="cuda")
    out = torch.empty(1000, d, device="cuda", dtype=torch.float32)
    ops.gather_rows(h, index, out)
    assert torch.equal(out, h.reshape(-1, d)[index].float())
