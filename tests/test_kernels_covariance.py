"""The covariance kernel and accumulator against a float64 X^T X (Triton's interpreter on CPU)."""

import pytest
import torch

from memit_fast.kernels import covariance as cov

# relative error of the lower triangle vs float64 on the same (rounded) inputs: products of
# bf16/fp16 values are exact in fp32, so every dtype sees only fp32 accumulation error, which
# grows like 2^-24 sqrt(N) for N rows: TOL at N <= 256, scaled by sqrt(N / 256) above
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def tol(dtype, n):
    return TOL[dtype] * max(1.0, (n / 256) ** 0.5)
SMALL = {  # small tiles keep the interpreter fast
    "ptr": cov.TileConfig(32, 32, 16, 2, 4, 2),
    "tma": cov.TileConfig(32, 64, 16, 2, 4, 2, tma=True),
    "persistent": cov.TileConfig(32, 32, 16, 2, 4, 2, tma=True, persistent=True),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def truth(x, rows=None):
    x = x.double().cpu()
    if rows is not None:
        x = x[rows.cpu()]
    return x.mT @ x


def rel_lower(got, want):
    got, want = torch.tril(got.double().cpu()), torch.tril(want)
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("n,d", [(1, 1), (1, 40), (7, 130), (300, 64), (129, 200)])
def test_syrk_lower_matches_float64(dtype, name, n, d):
    x = torch.randn(n, d, device=DEVICE).to(dtype)
    out = torch.full((d, d), float("nan"), device=DEVICE)
    cov.syrk_lower_(out, x, config=SMALL[name])
    assert not torch.isnan(torch.tril(out)).any(), "lower triangle not fully written"
    err = rel_lower(out, truth(x))
    assert err < tol(dtype, n), f"relative error {err:.2e}"
    cov.syrk_lower_(out, x, config=SMALL[name], accumulate=True)
    err = rel_lower(out, 2 * truth(x))
    assert err < tol(dtype, n), f"relative error {err:.2e} after accumulate"


def test_writes_stay_in_lower_tiles():
    d, cfg = 100, SMALL["ptr"]
    out = torch.full((d, d), float("nan"), device=DEVICE)
    cov.syrk_lower_(out, torch.randn(5, d, device=DEVICE), config=cfg)
    written = ~torch.isnan(out.cpu())
    i, j = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    in_diag_tile = (i // cfg.block_m) * cfg.block_m + cfg.block_m - 1 >= (j // cfg.block_n) * cfg.block_n
    assert torch.equal(written, in_diag_tile)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_row_index_and_device_row_count(index_dtype):
    x = torch.randn(50, 70, device=DEVICE, dtype=torch.bfloat16)
    rows = torch.tensor([49, 0, 3, 3, 17, 20], dtype=index_dtype, device=DEVICE)
    out = torch.zeros(70, 70, device=DEVICE)
    cov.syrk_lower_(out, x, row_index=rows, config=SMALL["ptr"])
    assert rel_lower(out, truth(x, rows)) < TOL[torch.bfloat16]
    n_rows = torch.tensor([4], dtype=torch.int32, device=DEVICE)  # only the first 4 entries
    cov.syrk_lower_(out, x, row_index=rows, n_rows=n_rows, config=SMALL["ptr"])
    assert rel_lower(out, truth(x, rows[:4])) < 2e-6


def test_row_count_without_index():
    x = torch.randn(40, 48, device=DEVICE)
    out = torch.zeros(48, 48, device=DEVICE)
    n_rows = torch.tensor([21], dtype=torch.int32, device=DEVICE)
    cov.syrk_lower_(out, x, n_rows=n_rows, config=SMALL["tma"])  # first 21 rows: not a whole TMA box
    assert rel_lower(out, truth(x[:21])) < TOL[torch.float32]


def test_unaligned_rows_fall_back_from_tma():
    x = torch.randn(9, 37, device=DEVICE)[:, :33]  # row stride 37 floats: not 16-byte aligned
    out = torch.zeros(33, 33, device=DEVICE)
    cov.syrk_lower_(out, x, config=SMALL["tma"])
    assert rel_lower(out, truth(x)) < 2e-6


def test_tile_table_covers_lower_triangle_once():
    for d, bm, bn in [(1, 32, 32), (100, 32, 64), (300, 128, 256), (257, 64, 32)]:
        t = cov._tile_table(d, bm, bn, 3, torch.device("cpu"))
        count = torch.zeros(d, d, dtype=torch.int32)
        for tm, tn in t.tolist():
            block = count[tm * bm:(tm + 1) * bm, tn * bn:(tn + 1) * bn]
            assert block.numel() and torch.tril(torch.ones(d, d))[tm * bm:(tm + 1) * bm, tn * bn:(tn + 1) * bn].any()
            block += 1
        assert torch.equal(torch.tril(count), torch.tril(torch.ones(d, d, dtype=torch.int32)))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_accumulator_masks_chunks_and_folds(backend):
    d = 72
    acc = cov.CovarianceAccumulator(d, DEVICE, torch.bfloat16, backend=backend, fold_tokens=40, config=SMALL["tma"])
    want, n = torch.zeros(d, d, dtype=torch.float64), 0
    for b, s in [(2, 11), (1, 30), (3, 5), (4, 9)]:
        x = torch.randn(b, s, d, device=DEVICE).to(torch.bfloat16)
        mask = torch.rand(b, s, device=DEVICE) < 0.7
        acc.add(x, mask=mask)
        want += truth(x.reshape(-1, d), torch.nonzero(mask.reshape(-1)).reshape(-1))
        n += int(mask.sum())
    x = torch.randn(13, d, device=DEVICE).to(torch.bfloat16)
    acc.add(x, row_index=torch.tensor([0, 12, 5], device=DEVICE))
    want += truth(x, torch.tensor([0, 12, 5]))
    acc.add(x)
    want += truth(x)
    n += 3 + 13
    assert acc.count == n
    assert torch.equal(acc.sum, acc.sum.mT) and acc.sum.dtype == torch.float64
    assert float((acc.sum.cpu() - want).norm() / want.norm()) < 2e-6
    assert float((acc.mean().cpu() - want / n).norm() / (want / n).norm()) < 2e-6
    s, c = acc.state()
    assert s.dtype == torch.float64 and c.dtype == torch.int64 and int(c) == n


def test_accumulator_rejects_bad_input():
    acc = cov.CovarianceAccumulator(8, DEVICE, torch.float16, backend="torch")
    with pytest.raises(ValueError, match="no rows"):
        acc.mean()
    with pytest.raises(ValueError, match="expected"):
        acc.add(torch.randn(3, 8, device=DEVICE))  # float32, accumulator takes float16
    with pytest.raises(ValueError, match="mask"):
        acc.add(torch.randn(3, 8, device=DEVICE).half(), mask=torch.ones(4, dtype=torch.bool, device=DEVICE))


def test_reference_twin():
    acc = torch.zeros(6, 6, dtype=torch.float64)
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, False, True, True], [False, False, False, True]])
    assert int(cov.covariance_update_reference(acc, x, mask)) == 4
    assert torch.allclose(acc, truth(x[mask]), rtol=1e-6)


def _check_cuda(cfg, n, d, dtype):
    x = torch.randn(n, d, device="cuda").to(dtype)
    out = torch.full((d, d), float("nan"), device="cuda")
    cov.syrk_lower_(out, x, config=cfg)
    want = (x.double().mT @ x.double()).tril()
    got = out.double().tril()
    assert not torch.isnan(got).any()
    err = float((got - want).norm() / want.norm())
    assert err < tol(dtype, n), f"relative error {err:.2e}"
    rows = torch.randperm(n, device="cuda")[: max(1, n // 2)]
    cov.syrk_lower_(out, x, row_index=rows, config=cfg, accumulate=True)
    want += (x[rows].double().mT @ x[rows].double()).tril()
    err = float((out.double().tril() - want).norm() / want.norm())
    assert err < tol(dtype, n), f"with row_index: relative error {err:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(cov.CONFIGS))
def test_cuda_every_config(name):
    """Each candidate at an awkward size (d not a multiple of any tile; TMA-aligned rows)."""
    _check_cuda(cov.CONFIGS[name], 4097, 1000, torch.float32 if name == "fp32" else torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(1, 1), (1000, 6400), (300, 14336), (257, 16384)])
def test_cuda_default_config_real_sizes(n, d, dtype):
    if dtype != torch.bfloat16 and d > 6400:
        pytest.skip("one dtype at the largest sizes keeps compile time down")
    _check_cuda(cov.default_config(dtype), n, d, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("precision,limit", [("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 3e-3)])
def test_cuda_fp32_precisions(precision, limit):
    x = torch.randn(2000, 777, device="cuda")
    out = torch.zeros(777, 777, device="cuda")
    cov.syrk_lower_(out, x, fp32_precision=precision)
    want = (x.double().mT @ x.double()).tril()
    err = float((out.double().tril() - want).norm() / want.norm())
    assert err < limit, f"{precision}: relative error {err:.2e}"


@pytest.mark.cuda
def test_cuda_accumulator_matches_twin():
    d = 2304
    fast = cov.CovarianceAccumulator(d, "cuda", torch.bfloat16, fold_tokens=3000)
    slow = cov.CovarianceAccumulator(d, "cuda", torch.bfloat16, backend="torch")
    for _ in range(4):
        x = torch.randn(4, 512, d, device="cuda").to(torch.bfloat16)
        mask = torch.rand(4, 512, device="cuda") < 0.8
        fast.add(x, mask=mask)
        slow.add(x, mask=mask)
    assert fast.count == slow.count
    err = float((fast.sum - slow.sum).norm() / slow.sum.norm())
    assert err < 1e-5, f"relative error {err:.2e}"
