"""pytest-benchmark: each memit_fast kernel against its twin at GPT-2 XL / Llama-3-8B / GPT-J sizes.

    pytest benchmarks/bench_kernels.py --benchmark-json=OUT.json     # CUDA: real sizes
    pytest benchmarks/bench_kernels.py --benchmark-disable           # CPU smoke (CI): tiny sizes, one run each

Every result carries extra_info: device, torch / triton versions, git commit, and TFLOP/s or
GB/s from the median. `--records FILE` (benchmarks/conftest.py) appends each result as records. benchmarks/kernels_device.py measures the device's ceilings and sweeps
the tile configs.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from memit_fast import ops, solve  # noqa: E402
from results_store import git_commit  # noqa: E402
from memit_fast.kernels import capture, covariance  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
D_FF = {"gpt2-xl": 6400, "llama-3-8b": 14336, "gpt-j": 16384} if CUDA else {"gpt2-xl": 40, "llama-3-8b": 56, "gpt-j": 64}
TOKENS = 16384 if CUDA else 64
EDITS = 10_000 if CUDA else 24
D_MODEL = 4096 if CUDA else 8
PROVIDERS = ["reference", "memit_fast"]


def _commit() -> str:
    return git_commit()


INFO = {
    "device": torch.cuda.get_device_name() if CUDA else "cpu",
    "torch": torch.__version__,
    "triton": triton.__version__,
    "commit": _commit(),
}


def run(benchmark, fn, *, kind="kernel", flops=None, bytes_=None, per_s=None, rounds=5, **info):
    """benchmark.pedantic with a synchronising wrapper; TFLOP/s, GB/s and per_s rates from the median.
    kind: the record kind (benchmarks/results_store.py) of this result, kept in extra_info."""
    def call():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.extra_info.update(INFO, kind=kind, **info)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats:  # None when --benchmark-disable
        median = stats.stats.median
        if flops:
            benchmark.extra_info["tflops"] = round(flops / median / 1e12, 2)
        if bytes_:
            benchmark.extra_info["gbs"] = round(bytes_ / median / 1e9, 1)
        for key, amount in (per_s or {}).items():
            benchmark.extra_info[key] = round(amount / median, 2)


@pytest.mark.parametrize("model", list(D_FF))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_covariance(benchmark, provider, model):
    d = D_FF[model]
    x = torch.randn(TOKENS, d, device=DEV).to(torch.bfloat16)
    if provider == "memit_fast":
        acc = ops.CovarianceAccumulator(d, DEV, torch.bfloat16)
        fn = lambda: acc.add(x)  # noqa: E731
    else:
        total = torch.zeros(d, d, dtype=torch.float64, device=DEV)
        fn = lambda: covariance.covariance_update_reference(total, x)  # noqa: E731 - float32 products, float64 sum
    run(benchmark, fn, flops=TOKENS * d * (d + 1), rounds=10 if provider == "memit_fast" else 3, N=TOKENS, d=d)


@pytest.mark.parametrize("model", list(D_FF))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_capture(benchmark, provider, model):
    d, n = D_FF[model], EDITS
    h = torch.randn(8, max(TOKENS // 8, n // 8 + 1), d, device=DEV).to(torch.bfloat16)
    index = torch.randint(0, h.shape[0] * h.shape[1], (n,), device=DEV)
    out = torch.empty(n, d, device=DEV)
    op = ops.gather_rows if provider == "memit_fast" else capture.gather_rows_reference
    run(benchmark, lambda: op(h, index, out), bytes_=n * d * 6, rounds=20, n=n, d=d)


@pytest.mark.parametrize("method", ["auto", "mixed", "cholesky", "woodbury"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_solve_one_layer(benchmark, provider, method):
    """Delta W of one GPT-J layer: d_ff keys, EDITS edits, d_model = D_MODEL right-hand sides."""
    d, n, m = D_FF["gpt-j"], EDITS, D_MODEL
    x = torch.randn(2 * d, d, device=DEV).to(torch.bfloat16)
    cov = (x.mT @ x).double() / (2 * d) + 0.05 * torch.eye(d, dtype=torch.float64, device=DEV)
    keys, resid = torch.randn(d, n, device=DEV), torch.randn(m, n, device=DEV)
    if provider == "reference":
        if method != "auto":
            pytest.skip("the reference twin is the dense solve")
        fn = lambda: solve.solve_delta_weights(cov, keys, resid, 15000.0, method="dense")  # noqa: E731
        flops = solve.solve_flops(d, n, "dense", m=m)
    else:
        kw = {"factor": solve.factor_scaled_cov(cov, 15000.0)} if method == "woodbury" else {}
        fn = lambda: solve.solve_delta_weights(cov, keys, resid, 15000.0, method=method, **kw)  # noqa: E731
        counted = solve._auto(d, n, False, m) if method == "auto" else method
        flops = solve.solve_flops(d, n, counted, factored=method == "woodbury", m=m)
    run(benchmark, fn, kind="solve", flops=flops, rounds=3, d=d, n=n, m=m, method=method)
