"""The covariance kernel and accumulator against a float64 X^T X (Triton's interpreter on CPU)."""

import pytest
import torch

from memit_fast import ops
from memit_fast.kernels import covariance as cov

U = 2.0**-24  # unit roundoff of fp32


def bound(*xs):
    """Relative error allowed for the lower triangle of S = sum_k X_k^T X_k summed in fp32.

    Entry (i, j) of S sums N = sum_k rows(X_k) products p_t = x_ti x_tj. Products of bf16/fp16
    values are exact in fp32; of fp32 values, rounded once (relative u = 2^-24). fp32 summation
    of N terms errs by at most (N - 1) u sum_t |p_t| per entry, and with rounding errors taken as
    independent and of mean zero (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019) by about
    sqrt(N) u sum_t |p_t|. Over all entries: ||E||_F <= (sqrt(N) + 1) u || |X|^T |X| ||_F,
    divided here by ||X^T X||_F (lower triangles; xs on the CPU in float64). Gaussian rows at
    N = 4097, d = 1000: 5.1e-5; measured there 9.9e-6 on an H100 (bf16 wgmma, fp32 accumulators)
    and 6.5e-7 for a CPU fp32 product. tf32-rounded inputs (~1e-3) or a missing tile (~1) fail it.
    """
    n = sum(x.shape[0] for x in xs)
    s = sum(x.mT @ x for x in xs).tril()
    a = sum(x.abs().mT @ x.abs() for x in xs).tril()
    return float((n**0.5 + 1) * U * a.norm() / s.norm().clamp_min(1e-300))


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SMALL = {  # small tiles keep the interpreter fast
    "ptr": cov.TileConfig(32, 32, 16, 2, 4, 2),
    "tma": cov.TileConfig(32, 64, 16, 2, 4, 2, tma=True),
    "persistent": cov.TileConfig(32, 32, 16, 2, 4, 2, tma=True, persistent=True),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rows64(x, rows=None):
    x = x.double().cpu()
    return x if rows is None else x[rows.cpu()]


def truth(x, rows=None):
    x = rows64(x, rows)
    return x.mT @ x


def rel_lower(got, want):
    got, want = torch.tril(got.double().cpu()), torch.tril(want)
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


@pytest.mark.triton_loop
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("n,d", [(1, 1), (1, 40), (7, 130), (300, 64), (129, 200)])
def test_syrk_lower_matches_float64(dtype, name, n, d):
    x = torch.randn(n, d, device=DEVICE).to(dtype)
    out = torch.full((d, d), float("nan"), device=DEVICE)
    cov.syrk_lower_(out, x, config=SMALL[name])
    assert not torch.isnan(torch.tril(out)).any(), "lower triangle not fully written"
    err, tol = rel_lower(out, truth(x)), bound(rows64(x))
    assert err < tol, f"relative error {err:.2e} (bound {tol:.2e})"
    cov.syrk_lower_(out, x, config=SMALL[name], accumulate=True)
    err, tol = rel_lower(out, 2 * truth(x)), bound(rows64(x), rows64(x))
    assert err < tol, f"relative error {err:.2e} (bound {tol:.2e}) after accumulate"


@pytest.mark.triton_loop
def test_writes_stay_in_lower_tiles():
    d, cfg = 100, SMALL["ptr"]
    out = torch.full((d, d), float("nan"), device=DEVICE)
    cov.syrk_lower_(out, torch.randn(5, d, device=DEVICE), config=cfg)
    written = ~torch.isnan(out.cpu())
    i, j = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    in_diag_tile = (i // cfg.block_m) * cfg.block_m + cfg.block_m - 1 >= (j // cfg.block_n) * cfg.block_n
    assert torch.equal(written, in_diag_tile)


@pytest.mark.triton_loop
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_row_index_and_device_row_count(index_dtype):
    x = torch.randn(50, 70, device=DEVICE, dtype=torch.bfloat16)
    rows = torch.tensor([49, 0, 3, 3, 17, 20], dtype=index_dtype, device=DEVICE)
    out = torch.zeros(70, 70, device=DEVICE)
    cov.syrk_lower_(out, x, row_index=rows, config=SMALL["ptr"])
    assert rel_lower(out, truth(x, rows)) < bound(rows64(x, rows))
    n_rows = torch.tensor([4], dtype=torch.int32, device=DEVICE)  # only the first 4 entries
    cov.syrk_lower_(out, x, row_index=rows, n_rows=n_rows, config=SMALL["ptr"])
    assert rel_lower(out, truth(x, rows[:4])) < bound(rows64(x, rows[:4]))


@pytest.mark.triton_loop
def test_row_count_without_index():
    x = torch.randn(40, 48, device=DEVICE)
    out = torch.zeros(48, 48, device=DEVICE)
    n_rows = torch.tensor([21], dtype=torch.int32, device=DEVICE)
    cov.syrk_lower_(out, x, n_rows=n_rows, config=SMALL["tma"])  # first 21 rows: not a whole TMA box
    assert rel_lower(out, truth(x[:21])) < bound(rows64(x[:21]))


@pytest.mark.triton_loop
def test_unaligned_rows_fall_back_from_tma():
    x = torch.randn(9, 37, device=DEVICE)[:, :33]  # row stride 37 floats: not 16-byte aligned
    out = torch.zeros(33, 33, device=DEVICE)
    cov.syrk_lower_(out, x, config=SMALL["tma"])
    assert rel_lower(out, truth(x)) < bound(rows64(x))


def test_tile_table_covers_lower_triangle_once():
    for d, bm, bn in [(1, 32, 32), (100, 32, 64), (300, 128, 256), (257, 64, 32)]:
        t = cov._tile_table(d, bm, bn, 3, torch.device("cpu"))
        count = torch.zeros(d, d, dtype=torch.int32)
        for tm, tn in t.tolist():
            block = count[tm * bm:(tm + 1) * bm, tn * bn:(tn + 1) * bn]
            assert block.numel() and torch.tril(torch.ones(d, d))[tm * bm:(tm + 1) * bm, tn * bn:(tn + 1) * bn].any()
            block += 1
        assert torch.equal(torch.tril(count), torch.tril(torch.ones(d, d, dtype=torch.int32)))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton_loop), "torch", "auto"])
def test_accumulator_masks_chunks_and_folds(backend):
    d = 72
    acc = ops.CovarianceAccumulator(d, DEVICE, torch.bfloat16, backend=backend, fold_tokens=40, config=SMALL["tma"])
    added = []  # float64 rows added, for the truth and the bound
    for b, s in [(2, 11), (1, 30), (3, 5), (4, 9)]:
        x = torch.randn(b, s, d, device=DEVICE).to(torch.bfloat16)
        mask = torch.rand(b, s, device=DEVICE) < 0.7
        acc.add(x, mask=mask)
        added.append(rows64(x.reshape(-1, d), torch.nonzero(mask.reshape(-1)).reshape(-1)))
    x = torch.randn(13, d, device=DEVICE).to(torch.bfloat16)
    acc.add(x, row_index=torch.tensor([0, 12, 5], device=DEVICE))
    acc.add(x)
    added += [rows64(x, torch.tensor([0, 12, 5])), rows64(x)]
    want, n, tol = sum(r.mT @ r for r in added), sum(len(r) for r in added), bound(*added)
    assert acc.count == n
    assert torch.equal(acc.sum, acc.sum.mT) and acc.sum.dtype == torch.float64
    assert float((acc.sum.cpu() - want).norm() / want.norm()) < tol
    assert float((acc.mean().cpu() - want / n).norm() / (want / n).norm()) < tol
    s, c = acc.state()
    assert s.dtype == torch.float64 and c.dtype == torch.int64 and int(c) == n


def test_accumulator_rejects_bad_input():
    acc = ops.CovarianceAccumulator(8, DEVICE, torch.float16, backend="torch")
    with pytest.raises(ValueError, match="no rows"):
        acc.mean()
    with pytest.raises(ValueError, match="expected"):
        acc.add(torch.randn(3, 8, device=DEVICE))  # float32, accumulator takes float16
    with pytest.raises(ValueError, match="mask"):
        acc.add(torch.randn(3, 8, device=DEVICE).half(), mask=torch.ones(4, dtype=torch.bool, device=DEVICE))


def test_reference_twin():
    acc = torch.full((6, 6), float("nan"))
    x = torch.randn(8, 6)
    rows = torch.tensor([7, 0, 2, 3, 5])
    cov.covariance_update_reference(acc, x, rows, torch.tensor([4]), accumulate=False)  # rows 7, 0, 2, 3
    assert rel_lower(acc, truth(x, rows[:4])) < bound(rows64(x, rows[:4]))
    cov.covariance_update_reference(acc, x)
    assert rel_lower(acc, truth(x, rows[:4]) + truth(x)) < bound(rows64(x, rows[:4]), rows64(x))


def test_float64_keys_go_through_as_float32():
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    mask = torch.rand(3, 10) < 0.5
    acc = ops.CovarianceAccumulator(8, "cpu", torch.float64)
    acc.add(x, mask=mask)
    rows = rows64(x[mask].float())
    assert acc.count == int(mask.sum()) and rel_lower(acc.state()[0], rows.mT @ rows) < bound(rows)


# Kernel against twin, relative error of the lower triangle: both form float32 products (exact
# for 16-bit inputs, one rounding each for float32 ones) and sum them in float32, in different
# orders, so every input dtype gets the fp32 summation bound sqrt(N) u = 2.1e-6 at N = 300 (x4).
TWIN_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


@pytest.mark.triton_loop
@pytest.mark.parametrize("dtype", list(TWIN_TOL))
def test_kernel_matches_twin(dtype):
    x = torch.randn(300, 64, device=DEVICE).to(dtype)
    rows = torch.randperm(300, device=DEVICE)[:200]
    n_rows = torch.tensor([150], dtype=torch.int32, device=DEVICE)
    got, want = torch.zeros(64, 64, device=DEVICE), torch.zeros(64, 64, device=DEVICE)
    for update, out in [(cov.covariance_update_triton, got), (cov.covariance_update_reference, want)]:
        kw = {"config": SMALL["ptr"]} if update is cov.covariance_update_triton else {}
        update(out, x, rows, n_rows, False, **kw)
        update(out, x, None, None, True, **kw)
    assert rel_lower(got, want.double().cpu()) < TWIN_TOL[dtype]


def _check_cuda(cfg, n, d, dtype):
    x = torch.randn(n, d, device="cuda").to(dtype)
    out = torch.full((d, d), float("nan"), device="cuda")
    cov.syrk_lower_(out, x, config=cfg)
    x64 = x.double()
    want = (x64.mT @ x64).tril()
    got = out.double().tril()
    assert not torch.isnan(got).any()
    err, tol = float((got - want).norm() / want.norm()), bound(x64)
    assert err < tol, f"relative error {err:.2e} (bound {tol:.2e})"
    rows = torch.randperm(n, device="cuda")[: max(1, n // 2)]
    cov.syrk_lower_(out, x, row_index=rows, config=cfg, accumulate=True)
    want += (x64[rows].mT @ x64[rows]).tril()
    err, tol = float((out.double().tril() - want).norm() / want.norm()), bound(x64, x64[rows])
    assert err < tol, f"with row_index: relative error {err:.2e} (bound {tol:.2e})"


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
    fast = ops.CovarianceAccumulator(d, "cuda", torch.bfloat16, fold_tokens=3000)  # "cuda": no index
    slow = ops.CovarianceAccumulator(d, "cuda", torch.bfloat16, backend="torch")
    assert fast.device == torch.device("cuda", torch.cuda.current_device())
    added = []
    for _ in range(4):
        x = torch.randn(4, 512, d, device="cuda").to(torch.bfloat16)  # on cuda:0
        mask = torch.rand(4, 512, device="cuda") < 0.8
        fast.add(x, mask=mask)
        slow.add(x, mask=mask)
        added.append(x[mask].double())
    assert fast.count == slow.count == sum(len(r) for r in added)
    want, tol = sum(r.mT @ r for r in added), bound(*added)
    for name, acc in [("triton", fast), ("twin", slow)]:
        err = float((acc.sum - want).norm() / want.norm())
        assert err < tol, f"{name}: relative error {err:.2e} (bound {tol:.2e})"
