"""memit_fast.solve against a float64 solve on well-conditioned SPD systems, and its failures."""

import pytest
import torch

from cpu_native import compiled, native_build, stand_in  # noqa: F401 - fixtures
from memit_fast import native, solve
from memit_fast.errors import NotPositiveDefiniteError, SolveError

LAM = 15000.0
# relative error ||A - A_ref|| / ||A_ref|| allowed per compute dtype (cond(G) < ~1e3 here)
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


def spd_cov(d, device="cpu", dtype=torch.float64):
    """A second moment like MEMIT's C: X^T X / N for N = 3d random rows, plus a small ridge."""
    x = torch.randn(3 * d, d, dtype=torch.float64, device=device)
    return (x.mT @ x / (3 * d) + 0.05 * torch.eye(d, dtype=torch.float64, device=device)).to(dtype)


def truth(cov, keys, lam=LAM):
    c, k = cov.double().cpu(), keys.double().cpu()
    return torch.linalg.solve(lam * c + k @ k.mT, k)


def rel(a, b):
    return float((a.double().cpu() - b).norm() / b.norm())


SIZES = [(1, 1), (7, 3), (130, 1), (130, 5), (64, 200), (257, 37)]


@pytest.mark.parametrize("d,n", SIZES)
@pytest.mark.parametrize("method", ["cholesky", "woodbury", "dense", "auto"])
def test_methods_match_float64(d, n, method):
    cov, keys = spd_cov(d), torch.randn(d, n) * 3
    a = solve.solve_update_keys(cov, keys, LAM, method=method)
    assert a.shape == (d, n) and a.dtype == torch.float64 and a.is_contiguous()
    assert rel(a, truth(cov, keys)) < TOL[torch.float64]


@pytest.mark.parametrize("d,n,m", [(1, 1, 1), (40, 30, 7), (64, 200, 16), (33, 5, 9)])
@pytest.mark.parametrize("method", ["cholesky", "woodbury", "dense", "auto"])
def test_delta_weights_match_float64(d, n, m, method):
    cov, keys, resid = spd_cov(d), torch.randn(d, n) * 3, torch.randn(m, n)
    delta = solve.solve_delta_weights(cov, keys, resid, LAM, method=method)
    assert delta.shape == (m, d) and delta.dtype == torch.float64 and delta.is_contiguous()
    want = resid.double() @ truth(cov, keys).mT
    assert rel(delta, want) < TOL[torch.float64]


def test_cached_factor_and_batched_factor():
    covs = torch.stack([spd_cov(50) for _ in range(3)])
    L = solve.factor_scaled_cov(covs, LAM)
    assert L.shape == (3, 50, 50) and torch.equal(L, L.tril())
    for b in range(3):
        assert rel(L[b], solve.factor_scaled_cov(covs[b], LAM).cpu()) < 1e-12
        assert rel(L[b] @ L[b].mT, LAM * covs[b]) < 1e-12
        keys = torch.randn(50, 4)
        a = solve.solve_update_keys(covs[b], keys, LAM, method="woodbury", factor=L[b])
        assert rel(a, truth(covs[b], keys)) < TOL[torch.float64]


def test_float32_inputs_and_cpu_dtype():
    cov, keys = spd_cov(40, dtype=torch.float32), torch.randn(40, 6, dtype=torch.bfloat16)
    a = solve.solve_update_keys(cov, keys, LAM, method="cholesky", dtype=torch.float32)
    assert a.dtype == torch.float64  # float64 always on CPU
    assert rel(a, truth(cov, keys)) < TOL[torch.float64]


def test_auto_picks_by_flops():
    assert solve._auto(16384, 10_000, False) == "cholesky"
    assert solve._auto(16384, 10_000, True) == "cholesky"
    assert solve._auto(16384, 2000, False) == "woodbury"
    assert solve._auto(16384, 6000, True) == "woodbury"
    assert solve.solve_flops(16384, 100, "woodbury", factored=True) < solve.solve_flops(16384, 100, "cholesky") / 20
    # Delta W with d_model = 4096 right-hand sides instead of 10,000 keys: ~20% fewer flops
    assert solve.solve_flops(16384, 10_000, "cholesky", m=4096) < 0.85 * solve.solve_flops(16384, 10_000, "cholesky")


def test_not_positive_definite_raises():
    d = 20
    cov = spd_cov(d)
    cov[3, 3] = -1.0  # lam*C indefinite; with one key G stays indefinite
    keys = torch.randn(d, 1) * 1e-3
    for method in ("cholesky", "woodbury", "auto"):
        with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
            solve.solve_update_keys(cov, keys, LAM, method=method)
    with pytest.raises(NotPositiveDefiniteError, match="matrix 1 of 2"):
        solve.factor_scaled_cov(torch.stack([spd_cov(d), cov]), LAM)


def test_auto_falls_back_to_cholesky_when_lam_c_is_singular():
    d = 30
    x = torch.randn(d - 1, d, dtype=torch.float64)
    cov = x.mT @ x  # rank d-1: lam*C is singular, G = lam*C + K K^T is not
    keys = torch.randn(d, 2, dtype=torch.float64) * 100
    a = solve.solve_update_keys(cov, keys, LAM, method="auto")  # woodbury by flops, then fallback
    assert rel(a, truth(cov, keys)) < 1e-6
    with pytest.raises(NotPositiveDefiniteError):
        solve.solve_update_keys(cov, keys, LAM, method="woodbury")


def test_nan_and_bad_input_fail_clearly():
    cov, keys = spd_cov(10), torch.randn(10, 2)
    bad = cov.clone()
    bad[2, 5] = bad[5, 2] = float("nan")
    with pytest.raises((NotPositiveDefiniteError, SolveError)):
        solve.solve_update_keys(bad, keys, LAM, method="cholesky")
    with pytest.raises(SolveError):
        solve.solve_update_keys(bad, keys, LAM, method="dense")
    with pytest.raises(ValueError, match="Cholesky factor of lam"):
        solve.solve_update_keys(cov, keys, LAM, method="woodbury", factor=solve.factor_scaled_cov(cov, 2 * LAM))
    with pytest.raises(ValueError, match="unknown method"):
        solve.solve_update_keys(cov, keys, LAM, method="lu")
    with pytest.raises(ValueError, match="keys"):
        solve.solve_update_keys(cov, torch.randn(11, 2), LAM)
    with pytest.raises(TypeError):
        solve.factor_scaled_cov(cov.half(), LAM)


NOT_PD_ORDER_4 = r"^lam \* C \+ K K\^T is not positive definite: its leading minor of order 4 "


def _not_pd_at_4():
    bad = spd_cov(40)
    bad[3, 3] = -1.0
    return bad


def _unchanged(fn, *args):
    """fn(*args), asserting that no tensor argument was written to (the ops declare mutates_args=())."""
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f"{fn.__name__} overwrote an input of shape {tuple(a.shape)}"
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_call_sequence_on_cpu_stand_in(stand_in, dtype):
    """The native paths (compiled module, tests/cpu_cuda_libs.cpp for the libraries) on CPU tensors.
    Keys and residuals are float32 and contiguous, as on the GPU: in a float32 solve .to(dtype)
    returns the caller's tensor itself, so an in-place library call on it would clobber it
    (the woodbury Delta W bug of the first device run: potrs wrote M^-1 R^T into R)."""
    tol = TOL[dtype]
    # (d, n, m): tiny; n > d; and m < n < d, the shape of the failing GPU test (2000, 1200, 300) / 10
    for d, n, m in [(1, 1, 1), (33, 5, 2), (70, 90, 30), (200, 120, 30)]:
        cov, keys, resid = spd_cov(d), torch.randn(d, n) * 3, torch.randn(m, n)
        ref = truth(cov, keys)
        want = resid.double() @ ref.mT
        # the op's arguments as the dispatcher passes them: those the caller gave (schema defaults)
        assert rel(_unchanged(native.solve_cholesky_native, cov, keys, LAM, dtype), ref) < tol
        L = _unchanged(native.factor_scaled_cov_native, torch.stack([cov, cov]), LAM, dtype)
        assert torch.equal(L, L.tril()) and rel(L[1], native.factor_scaled_cov_reference(cov, LAM, torch.float64)) < tol
        assert rel(_unchanged(native.solve_woodbury_native, L[0], keys, dtype), ref) < tol
        assert rel(native.solve_cholesky_native(cov, keys, LAM, dtype, None, 64, 64), ref) < tol
        assert rel(native.solve_woodbury_native(native.factor_scaled_cov_native(cov, LAM, dtype, 64), keys, dtype, None, 64), ref) < tol
        assert rel(_unchanged(native.solve_cholesky_native, cov, keys, LAM, dtype, resid, 64, 64), want) < tol
        assert rel(_unchanged(native.solve_woodbury_native, L[0], keys, dtype, resid, 64), want) < tol
    with pytest.raises(NotPositiveDefiniteError):
        native.factor_scaled_cov_native(-spd_cov(5), LAM, dtype, 64)
    with pytest.raises(NotPositiveDefiniteError, match=NOT_PD_ORDER_4):  # one matrix: no "matrix 0 of 2"
        native.solve_cholesky_native(_not_pd_at_4(), torch.randn(40, 2) * 1e-3, LAM, dtype, torch.randn(1, 2), 16, 16)


@pytest.mark.parametrize("upper", [True, False])
@pytest.mark.parametrize("block", [0, 16, 40])
def test_blocked_potrf_on_cpu_stand_in(stand_in, upper, block):
    """The recursion of the native potrf (trsm + syrk around cuSOLVER blocks) in both triangles."""
    for d in (1, 16, 37, 70, 130):
        g = spd_cov(d) * LAM
        a = g.clone()
        assert int(native.potrf(a, upper, block)) == 0
        f = a.tril() if upper else a.triu().mT  # the factor as a row-major lower L, L L^T = G
        assert rel(f @ f.mT, g) < 1e-13 and rel(f, torch.linalg.cholesky(g)) < 1e-12
        _, offsets = stand_in.potrf_plan(native._buffer(a), upper, block, 0)
        sizes = [b - o for o, b in zip(offsets, offsets[1:] + [d])]
        assert offsets[0] == 0 and all(0 < k <= (block if block > 0 else d) for k in sizes)
        for bad in sorted({1, d // 2 + 1, d}):  # the first failing leading minor, in any block
            h = g.clone()
            h[bad - 1, bad - 1] = -1.0
            assert int(native.potrf(h, upper, block)) == bad


@pytest.mark.parametrize("block", [0, 16, 40])
def test_blocked_potrs_on_cpu_stand_in(stand_in, block):
    """The native potrs: trsm per diagonal block and a GEMM update between them, both directions."""
    for d, r in [(1, 1), (37, 5), (70, 1), (130, 24)]:
        g = spd_cov(d) * LAM
        f = g.clone()
        assert int(native.potrf(f, True, block)) == 0
        b = torch.randn(r, d, dtype=torch.float64)
        x = b.clone()
        native.potrs(f, x, True, block, torch.zeros(1, dtype=torch.int32))
        assert rel(x.mT, torch.linalg.solve(g, b.mT)) < 1e-12


@pytest.mark.triton_loop
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through Triton need its interpreter; the cuda tests cover mixed there")
@pytest.mark.parametrize("d,n,m", [(1, 1, 1), (70, 90, 30), (200, 120, 30), (130, 40, None)])
def test_mixed_on_cpu_stand_in(stand_in, d, n, m):
    """The mixed path: fp16x3 products (Triton, interpreted here) into the fp64 factor and solve.
    Error bound: the products' float32 rounding, amplified by cond(G) < ~20 for these matrices."""
    cov, keys = spd_cov(d), torch.randn(d, n) * 3
    ref = truth(cov, keys)
    mixed = lambda *a: native.solve_mixed_native(*a, 64, 64)  # noqa: E731
    if m is None:
        a = _unchanged(native.solve_mixed_native, cov, keys, LAM, torch.float64)
        assert a.shape == (d, n) and a.dtype == torch.float64 and rel(a, ref) < 2e-6
        return
    resid = torch.randn(m, n)
    delta = _unchanged(mixed, cov, keys, LAM, torch.float64, resid)
    assert delta.shape == (m, d) and delta.dtype == torch.float64
    assert rel(delta, resid.double() @ ref.mT) < 2e-6
    # float64 keys keep fp64 products: float64 accuracy
    delta = mixed(cov, keys.double(), LAM, torch.float64, resid.double())
    assert rel(delta, resid.double() @ ref.mT) < TOL[torch.float64]
    with pytest.raises(NotPositiveDefiniteError, match=NOT_PD_ORDER_4):
        mixed(_not_pd_at_4(), torch.randn(40, 2) * 1e-3, LAM, torch.float64, torch.randn(1, 2))


def test_auto_never_picks_mixed():
    """mixed is opt-in (float32-level products); auto stays float64-accurate."""
    assert solve._auto(16384, 10_000, False, 4096) == "cholesky"
    assert solve._auto(16384, 1000, False, 4096) == "woodbury"
    # mixed's fp64 work: the factor and the solve for 4096 right-hand sides, 48% of cholesky's
    fp64 = 16384**3 / 3 + 2 * 16384**2 * 4096
    assert fp64 < 0.5 * solve.solve_flops(16384, 10_000, "cholesky", m=4096)


def test_mixed_on_cpu_is_the_float64_cholesky():
    cov, keys, resid = spd_cov(30), torch.randn(30, 8), torch.randn(3, 8)
    delta = solve.solve_delta_weights(cov, keys, resid, LAM, method="mixed")
    assert delta.dtype == torch.float64 and rel(delta, resid.double() @ truth(cov, keys).mT) < TOL[torch.float64]


def tol(method, dtype):
    """mixed: fp16x3 products carry float32 rounding (~1e-7 relative) into G, times cond(G) < ~20."""
    return max(TOL[dtype], 1e-5) if method == "mixed" else TOL[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["cholesky", "woodbury", "dense", "mixed"])
@pytest.mark.parametrize("d,n", [(1, 1), (257, 3), (1000, 1500), (4096, 512)])
def test_cuda_methods_match_float64(method, dtype, d, n):
    cov, keys = spd_cov(d, "cuda"), torch.randn(d, n, device="cuda", dtype=torch.bfloat16)
    a = solve.solve_update_keys(cov, keys, LAM, method=method, dtype=dtype)
    want_dtype = torch.float64 if method == "dense" else dtype  # dense: the float64 reference
    assert a.device.type == "cuda" and a.dtype == want_dtype and a.shape == (d, n)
    assert rel(a, truth(cov, keys)) < tol(method, want_dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["cholesky", "woodbury", "mixed"])
def test_cuda_delta_weights_match_float64(method, dtype):
    d, n, m = 2000, 1200, 300
    cov, keys, resid = spd_cov(d, "cuda"), torch.randn(d, n, device="cuda"), torch.randn(m, n, device="cuda")
    keep = resid.clone()
    delta = solve.solve_delta_weights(cov, keys, resid, LAM, method=method, dtype=dtype)
    assert torch.equal(resid, keep), "the solve overwrote the residuals"
    assert delta.shape == (m, d) and delta.dtype == dtype
    assert rel(delta, resid.double().cpu() @ truth(cov, keys).mT) < tol(method, dtype)


@pytest.mark.cuda
def test_cuda_mixed_at_large_sizes():
    """mixed (asked for): fp16x3 products at ~fp32 error; float64 keys keep fp64 products."""
    d, n, m = 4096, 3000, 1024
    cov, keys, resid = spd_cov(d, "cuda"), torch.randn(d, n, device="cuda"), torch.randn(m, n, device="cuda")
    want = resid.double().cpu() @ truth(cov, keys).mT
    delta = solve.solve_delta_weights(cov, keys, resid, LAM, method="mixed")
    assert delta.dtype == torch.float64 and rel(delta, want) < tol("mixed", torch.float64)
    exact = solve.solve_delta_weights(cov, keys.double(), resid.double(), LAM, method="mixed")
    assert rel(exact, want) < TOL[torch.float64]


@pytest.mark.cuda
def test_cuda_not_positive_definite_raises():
    cov = spd_cov(64, "cuda")
    cov[10, 10] = -5.0
    keys = torch.randn(64, 1, device="cuda") * 1e-3
    with pytest.raises(NotPositiveDefiniteError, match="order 11"):
        solve.solve_update_keys(cov, keys, LAM, method="cholesky")
    with pytest.raises(NotPositiveDefiniteError, match="matrix 2 of 3"):
        solve.factor_scaled_cov(torch.stack([spd_cov(64, "cuda"), spd_cov(64, "cuda"), cov]), LAM)
