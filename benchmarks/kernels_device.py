"""Ceilings of the device, then each memit_fast kernel at real sizes against them and its twin.

    python benchmarks/kernels_device.py [--records FILE] [--tiny] [--only ceilings,covariance,capture,solve]

Ceilings: a bf16 8192^3 matrix product on random data (TFLOP/s), a device-to-device copy
(GB/s, bytes read + written), fp64 and fp32 products for the solves. Covariance: every tile
config at N = 16384 tokens x d = 16384 / 14336 / 6400 bf16, useful flops N d (d + 1);
masked rows (row index, in place) vs compaction + dense; the accumulator's tokens/s.
Capture: 10,000 rows of (8, 2048, d) bf16 to fp32. Solves: one GPT-J layer's pieces (the
products as fp16x3, tf32x3 and fp64; potrf by one cuSOLVER call and recursively; potrs), then
six GPT-J layers of Delta W (d 16384, n 10,000 and 1000, m = 4096) by auto / mixed / cholesky /
woodbury, with the error against the dense float64 twin, also on a C with a spectrum over 4
decades.
Prints a table (last) and appends every row as records (`kernel_records`) to FILE (default
benchmarks/results/records.jsonl), section by section.
--tiny: small sizes; without CUDA it runs on the CPU (Triton kernels in the interpreter), to
check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import triton  # noqa: E402

import results_store  # noqa: E402

from memit_fast import native, ops, solve  # noqa: E402
from memit_fast.kernels import capture, covariance  # noqa: E402
from memit_fast.ops import POTRF_BLOCK, POTRS_BLOCK  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
ROWS: list[dict] = []
LAM = 15000.0


def bench(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of fn() (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    if CUDA:
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def record(section, name, ms, *, flops=None, bytes_=None, ceiling=None, **extra):
    row = {"section": section, "name": name, "ms": round(ms, 4), **extra}
    if flops:
        row["tflops"] = round(flops / ms / 1e9, 2)
    if bytes_:
        row["gbs"] = round(bytes_ / ms / 1e6, 1)
    if ceiling:
        kind, value = ceiling
        rate = row.get("tflops") if kind == "tflops" else row.get("gbs")
        row["pct_of_ceiling"] = round(100 * rate / value, 1) if value else None
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return row


def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEV).to(dtype)


# ---- ceilings ----

def ceilings(tiny: bool) -> dict:
    n = 512 if tiny else 8192
    out = {}
    for dtype, key in [(torch.bfloat16, "bf16_tflops"), (torch.float32, "fp32_tflops"), (torch.float64, "fp64_tflops")]:
        m = n if dtype == torch.bfloat16 else n // 2
        a, b = rand(m, m, dtype=dtype), rand(m, m, dtype=dtype)
        ms = bench(lambda: a @ b, reps=20 if dtype == torch.bfloat16 else 5)
        out[key] = record("ceiling", f"matmul {dtype} {m}^3 (tf32 off)", ms, flops=2 * m**3)["tflops"]
    numel = (1 << 20) if tiny else (1 << 30)  # 2 GiB bf16 per buffer
    src, dst = rand(numel), torch.empty(numel, dtype=torch.bfloat16, device=DEV)
    ms = bench(lambda: dst.copy_(src), reps=20)
    out["copy_gbs"] = record("ceiling", f"copy {2 * numel / 2**30:.2f} GiB", ms, bytes_=4 * numel)["gbs"]
    return out


# ---- covariance ----

def covariance_section(ceil: dict, tiny: bool) -> None:
    n = 256 if tiny else 16384
    dims = [96, 160] if tiny else [16384, 14336, 6400]
    bf16_peak = ("tflops", ceil.get("bf16_tflops"))
    for d in dims:
        x = rand(n, d)
        out = torch.zeros(d, d, device=DEV)
        useful = n * d * (d + 1)
        shape = {"N": n, "d": d, "dtype": "bf16"}
        for name, cfg in covariance.CONFIGS.items():
            if name == "fp32":
                continue
            try:
                ms = bench(lambda: covariance.syrk_lower_(out, x, accumulate=True, config=cfg), reps=5 if tiny else 10)
                record("covariance", f"syrk_lower {name}", ms, flops=useful, ceiling=bf16_peak, provider="memit_fast", **shape)
            except Exception as e:  # noqa: BLE001 - one failing config must not hide the others
                record("covariance", f"syrk_lower {name}", float("nan"), provider="memit_fast", error=repr(e)[:300], **shape)
        ms = bench(lambda: x.mT @ x, reps=5)  # cuBLAS, the whole square: 2 N d^2 flops done, N d (d + 1) counted
        record("covariance", "torch bf16 x.T @ x (full product)", ms, flops=useful, ceiling=bf16_peak, provider="torch", **shape)
        acc64 = torch.zeros(d, d, dtype=torch.float64, device=DEV)
        ms = bench(lambda: covariance.covariance_update_reference(acc64, x), reps=3, warmup=1)
        record("covariance", "twin (fp32 product + fp64 add)", ms, flops=useful, ceiling=bf16_peak, provider="reference", **shape)
        if d != dims[0]:
            continue
        # masked rows: 90% of the tokens valid
        mask = torch.rand(n, device=DEV) < 0.9
        idx = torch.sort((~mask).to(torch.uint8), stable=True).indices
        cnt = mask.sum(dtype=torch.int32).reshape(1)
        ms = bench(lambda: covariance.syrk_lower_(out, x, row_index=idx, n_rows=cnt, accumulate=True), reps=10)
        record("covariance", "row_index (90% rows, in place)", ms, flops=int(mask.sum()) * d * (d + 1), ceiling=bf16_peak, provider="memit_fast", **shape)
        ms = bench(lambda: covariance.syrk_lower_(out, x[mask], accumulate=True), reps=10)
        record("covariance", "compaction x[mask] + dense", ms, flops=int(mask.sum()) * d * (d + 1), ceiling=bf16_peak, provider="memit_fast", **shape)
        # the accumulator, steady state, as the statistics loop runs it (fold every 2^18 tokens)
        acc = ops.CovarianceAccumulator(d, DEV, torch.bfloat16, backend="triton")
        xb = x.reshape(8, n // 8, d)
        mb = mask.reshape(8, n // 8)
        ms = bench(lambda: acc.add(xb, mask=mb), reps=20)
        record("covariance", "accumulator.add (masked, incl. folds)", ms, flops=int(mask.sum()) * d * (d + 1), ceiling=bf16_peak,
               provider="memit_fast", tokens_per_s=round(int(mask.sum()) / ms * 1e3), **shape)
        ms = bench(lambda: acc._sum.add_(acc._buf), reps=5)  # what a fold does
        record("covariance", "fold fp32 buffer into fp64", ms, bytes_=d * d * 20, ceiling=("gbs", ceil.get("copy_gbs")), **shape)
        # fp32 keys (GPT-2 XL in fp32) at a smaller d
        d32 = 96 if tiny else 6400
        x32 = rand(n, d32, dtype=torch.float32)
        out32 = torch.zeros(d32, d32, device=DEV)
        for prec in ("ieee", "tf32x3", "tf32"):
            try:
                ms = bench(lambda: covariance.syrk_lower_(out32, x32, accumulate=True, fp32_precision=prec), reps=5)
                record("covariance", f"syrk_lower fp32 {prec}", ms, flops=n * d32 * (d32 + 1), provider="memit_fast",
                       N=n, d=d32, dtype="fp32")
            except Exception as e:  # noqa: BLE001
                record("covariance", f"syrk_lower fp32 {prec}", float("nan"), error=repr(e)[:300], N=n, d=d32, dtype="fp32")
        del x, out, acc64, acc


# ---- capture ----

def capture_section(ceil: dict, tiny: bool) -> None:
    B, S, n = (2, 64, 50) if tiny else (8, 2048, 10_000)
    for d in ([96] if tiny else [16384, 14336, 6400]):
        h = rand(B, S, d)
        index = torch.randint(0, B * S, (n,), device=DEV)
        out = torch.empty(n, d, dtype=torch.float32, device=DEV)
        moved = n * d * (2 + 4)
        shape = {"B": B, "S": S, "d": d, "n": n}
        ms = bench(lambda: ops.gather_rows(h, index, out), reps=20)
        record("capture", "gather_rows bf16->fp32", ms, bytes_=moved, ceiling=("gbs", ceil.get("copy_gbs")), provider="memit_fast", **shape)
        ms = bench(lambda: capture.gather_rows_reference(h, index, out), reps=20)
        record("capture", "twin h[b, s] + copy_", ms, bytes_=moved, ceiling=("gbs", ceil.get("copy_gbs")), provider="reference", **shape)


# ---- solves ----

def spd_cov(d: int) -> torch.Tensor:
    """X^T X / m + 0.05 I with X (m = 2d, d) bf16 random: eigenvalues in about [0.14, 2.9]."""
    x = rand(2 * d, d)
    c = (x.mT @ x).double() / (2 * d)
    return c.add_(torch.eye(d, dtype=torch.float64, device=DEV), alpha=0.05)


def spectrum_cov_and_keys(d: int, n: int, decades: float = 4.0):
    """A C whose eigenvalues are log-uniform over `decades` plus a mean direction (keys are far
    from centred), and n keys (d, n) float32 drawn from the same distribution."""
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, device=DEV))
    lam = 10.0 ** (-decades * torch.arange(d, dtype=torch.float64, device=DEV) / (d - 1))
    mu = q[:, 0] * 3.0
    c = (q * lam) @ q.mT + torch.outer(mu, mu)
    keys = (q * lam.sqrt()) @ torch.randn(d, n, dtype=torch.float64, device=DEV) + mu[:, None]
    del q
    return c, keys.float()


def cond_estimate(g: torch.Tensor, iters: int = 30) -> float:
    """lam_max / lam_min of an SPD g by power iteration on g and on g^-1 (its Cholesky factor)."""
    L = torch.linalg.cholesky(g)
    v = w = torch.randn(g.shape[0], 1, dtype=g.dtype, device=g.device)
    for _ in range(iters):
        v = g @ v
        v = v / v.norm()
        w = torch.cholesky_solve(w, L)
        w = w / w.norm()
    return float((v.mT @ g @ v) / (w.mT @ g @ w))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> str:
    return f"{float((x.double() - ref).norm() / ref.norm()):.2e}"


FASTEST_POTRF_BLOCK = [None]  # set by solve_components: the POTRF_BLOCK that timed fastest
FASTEST_POTRS_BLOCK = [None]  # and the POTRS_BLOCK


def solve_components(cov, keys, resid, ceil) -> None:
    """One GPT-J layer's pieces: the products three ways, potrf by cuSOLVER and recursively, potrs."""
    from memit_fast.kernels import gram  # noqa: PLC0415

    d, n = keys.shape
    m = resid.shape[0]
    p = d + m
    fp64_peak = ("tflops", ceil.get("fp64_tflops"))
    shape = {"d": d, "n": n, "m": m}
    ms = bench(lambda: gram.gram_fp16x3([keys.mT, resid.mT]), reps=5)
    record("solve", "products fp16x3 [K^T R^T]^T[K^T R^T] (split+syrk)", ms, flops=3 * n * p * (p + 1),
           ceiling=("tflops", ceil.get("bf16_tflops")), provider="memit_fast", **shape)
    x1, x2, inv = gram.split_fp16x3([keys.mT, resid.mT])
    out = torch.empty(p, p, device=DEV)
    ms = bench(lambda: covariance.syrk_lower_(out, x1, y=x2, col_scale=inv), reps=5)
    record("solve", "  of which syrk fp16 over 3n rows", ms, flops=3 * n * p * (p + 1), ceiling=("tflops", ceil.get("bf16_tflops")),
           provider="memit_fast", **shape)
    del x1, x2
    xcat = torch.cat([keys.mT, resid.mT], 1)
    try:
        ms = bench(lambda: covariance.syrk_lower_(out, xcat, fp32_precision="tf32x3"), reps=3)
        record("solve", "products tf32x3 (fp32 syrk config)", ms, flops=n * p * (p + 1), provider="memit_fast", **shape)
    except Exception as e:  # noqa: BLE001
        record("solve", "products tf32x3 (fp32 syrk config)", float("nan"), error=repr(e)[:300], **shape)
    del xcat, out
    k64, r64 = keys.double(), resid.double()
    g = cov.clone()
    if native.available():
        ms = bench(lambda: native.syrk(k64, g, True, True, 1.0, LAM), reps=3)
        record("solve", "products fp64: cuBLAS Dsyrk K K^T", ms, flops=n * d * (d + 1), ceiling=fp64_peak, provider="memit_fast", **shape)
    ms = bench(lambda: r64 @ k64.mT, reps=3)
    record("solve", "products fp64: torch R K^T (DGEMM)", ms, flops=2 * d * n * m, ceiling=fp64_peak, provider="torch", **shape)
    del k64, r64
    if not native.available():
        return
    g = torch.addmm(cov, keys.double(), keys.double().mT, beta=LAM)
    b = torch.randn(m, d, dtype=torch.float64, device=DEV)
    work = torch.empty_like(g)
    best = {}
    for block in (0, 1024, 2048, 4096):
        def factor():
            work.copy_(g)
            return native.potrf(work, True, block)
        copy_ms = bench(lambda: work.copy_(g), reps=5)
        ms = bench(factor, reps=3) - copy_ms
        info = int(factor())
        name = "potrf fp64: one cuSOLVER call" if block == 0 else f"potrf fp64: recursive, cuSOLVER blocks <= {block}"
        record("solve", name, ms, flops=d**3 / 3, ceiling=fp64_peak, provider="memit_fast", info=info, **shape)
        best[block] = ms
    FASTEST_POTRF_BLOCK[0] = min(best, key=best.get)
    info = torch.zeros(1, dtype=torch.int32, device=DEV)
    rhs = torch.empty_like(b)
    times = {}
    for block in (0, 1024, 2048, 4096):
        def potrs():
            rhs.copy_(b)
            native.potrs(work, rhs, True, block, info)
        ms = bench(potrs, reps=3) - bench(lambda: rhs.copy_(b), reps=5)
        name = f"potrs fp64, {m} rhs: cuSOLVER" if block == 0 else f"potrs fp64, {m} rhs: trsm blocks <= {block} + DGEMM"
        record("solve", name, ms, flops=2 * d * d * m, ceiling=fp64_peak, provider="memit_fast", **shape)
        times[block] = ms
    FASTEST_POTRS_BLOCK[0] = min(times, key=times.get)
    covs = cov.expand(6, d, d)
    ms = bench(lambda: solve.factor_scaled_cov(covs, LAM), reps=2)
    record("solve", "factor_scaled_cov, 6 layers batched", ms, flops=6 * d**3 / 3, ceiling=fp64_peak, provider="memit_fast", **shape)


def solve_section(ceil: dict, tiny: bool) -> None:
    """Six GPT-J layers of Delta W (m = 4096 right-hand sides) by each method, sequentially with
    fresh keys per layer as apply runs them; the error of layer 0 against the float64 dense twin."""
    d, m, layers = (160, 24, 6) if tiny else (16384, 4096, 6)  # m: GPT-J's d_model
    fp64_peak = ("tflops", ceil.get("fp64_tflops"))
    cov = spd_cov(d)
    factor = solve.factor_scaled_cov(cov, LAM)
    for n in ([120, 40] if tiny else [10_000, 1000]):
        keys = [rand(d, n, dtype=torch.float32) for _ in range(layers)]
        resid = [rand(m, n, dtype=torch.float32) for _ in range(layers)]
        shape = {"d": d, "n": n, "layers": layers}
        if n == (120 if tiny else 10_000):
            solve_components(cov, keys[0], resid[0], ceil)
        ref = resid[0].double() @ solve.solve_update_keys_reference(cov, keys[0], LAM).mT
        ms = bench(lambda: solve.solve_delta_weights(cov, keys[0], resid[0], LAM, method="dense"), reps=1, warmup=1)
        record("solve", "dense twin fp64 (dW), one layer x6", ms * layers,
               flops=layers * solve.solve_flops(d, n, "dense", m=m), ceiling=fp64_peak, provider="reference", **shape)
        auto = solve._auto(d, n, False, m)
        auto_f = solve._auto(d, n, True, m)
        runs = [
            (f"auto (= {auto}) dW", {}, auto, False),
            (f"auto + cached factor (= {auto_f}) dW", {"factor": factor}, auto_f, True),
            ("woodbury + cached factor dW fp64", {"method": "woodbury", "factor": factor}, "woodbury", True),
            ("mixed dW (fp16x3 products + fp64)", {"method": "mixed"}, "mixed", False),
            ("cholesky dW fp64", {"method": "cholesky"}, "cholesky", False),
            ("cholesky dW float32", {"method": "cholesky", "dtype": torch.float32}, "cholesky", False),
        ]
        fastest = (FASTEST_POTRF_BLOCK[0], FASTEST_POTRS_BLOCK[0])
        if None not in fastest and fastest != (POTRF_BLOCK, POTRS_BLOCK):
            runs.insert(1, (f"auto (= {auto}) dW, POTRF/POTRS_BLOCK={fastest[0]}/{fastest[1]}", {"blocks": fastest}, auto, False))
        for name, kw, counted, factored in runs:
            blocks = kw.pop("blocks", (POTRF_BLOCK, POTRS_BLOCK))
            one = lambda i: solve.solve_delta_weights(cov, keys[i], resid[i], LAM, potrf_block=blocks[0], potrs_block=blocks[1], **kw)  # noqa: E731
            try:
                err = rel_err(one(0), ref)
                ms = bench(lambda: [one(i) for i in range(layers)], reps=3, warmup=1)
                record("solve", f"{name}, {layers} layers", ms, flops=layers * solve.solve_flops(d, n, counted, factored=factored, m=m),
                       ceiling=fp64_peak, provider="memit_fast", rel_err_vs_fp64_dense=err, native=native.available(), m=m,
                       potrf_block=blocks[0], potrs_block=blocks[1], **shape)
            except Exception as e:  # noqa: BLE001
                record("solve", f"{name}, {layers} layers", float("nan"), error=repr(e)[:300], **shape)
        del keys, resid, ref
    # the error on a covariance with a realistic spectrum (4 decades plus a mean), GPT-J size
    del factor
    n = 120 if tiny else 10_000
    c, k = spectrum_cov_and_keys(d, n)
    r = rand(m, n, dtype=torch.float32)
    ref = r.double() @ solve.solve_update_keys_reference(c, k, LAM).mT
    cond = f"{cond_estimate(torch.addmm(c, k.double(), k.double().mT, beta=LAM)):.1e}"
    for name, kw in [("mixed", {"method": "mixed"}), ("cholesky fp64", {"method": "cholesky"}),
                     ("cholesky float32", {"method": "cholesky", "dtype": torch.float32})]:
        try:
            err = rel_err(solve.solve_delta_weights(c, k, r, LAM, **kw), ref)
            record("solve", f"4-decade spectrum, cond {cond}: {name}", float("nan"), rel_err_vs_fp64_dense=err, d=d, n=n, m=m)
        except Exception as e:  # noqa: BLE001
            record("solve", f"spectrum 4 decades: {name}", float("nan"), error=repr(e)[:300], d=d, n=n, m=m)


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": results_store.git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "native": native.available() or native.why_unavailable(),
    }
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        env.update(sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    return env


SECTION_KIND = {"ceiling": "ceiling", "covariance": "kernel", "capture": "kernel", "solve": "solve"}
SHAPE_KEYS = ("N", "B", "S", "d", "n", "m", "layers")


def kernel_records(rows: list[dict], env: dict, command: str) -> list[dict]:
    """Rows of record() as records (benchmarks/results_store.py): kind ceiling / kernel / solve by
    section; metrics time [s] (the median), tflops [TFLOP/s], gbs [GB/s], pct_of_ceiling [%],
    rel_error [1] (against the float64 dense solve), rate [tokens/s]; N, B, S, d, n, m, layers as
    the shape; rows that hold an error only are left out (the log has them)."""
    ctx = results_store.context("kernels_device", command)
    ctx.update(device=env["device"], date=env["date"], commit=env["commit"],
               versions={k: str(env[k]) for k in ("python", "torch", "triton") if k in env})
    ctx["run_id"] = f"kernels_device {env['device']} {env['date']}"
    out = []
    for r in rows:
        if "name" not in r:
            continue
        shape = {k: r[k] for k in SHAPE_KEYS if k in r}
        params = {k: v for k, v in r.items() if k not in SHAPE_KEYS and k not in (
            "section", "name", "ms", "provider", "dtype", "tflops", "gbs", "pct_of_ceiling", "rel_err_vs_fp64_dense", "tokens_per_s")}
        if r["section"] == "ceiling":
            params.update({k: env[k] for k in ("native", "sms", "memory_gib") if k in env})
        kw = dict(provider=r.get("provider"), dtype=r.get("dtype"), shape=shape or None, params=params or None)
        values = [("time", r["ms"] / 1e3, "s"), ("tflops", r.get("tflops"), "TFLOP/s"), ("gbs", r.get("gbs"), "GB/s"),
                  ("pct_of_ceiling", r.get("pct_of_ceiling"), "%"), ("rate", r.get("tokens_per_s"), "tokens/s"),
                  ("rel_error", float(r["rel_err_vs_fp64_dense"]) if "rel_err_vs_fp64_dense" in r else None, "1")]
        for metric, value, unit in values:
            if value is not None and value == value:  # NaN: not measured (an error, or an accuracy-only row)
                out.append(results_store.make(SECTION_KIND[r["section"]], r["name"].strip(), metric, value, unit, ctx, **kw))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=Path, default=results_store.DEFAULT_PATH)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default="ceilings,covariance,capture,solve")
    args = ap.parse_args()
    torch.manual_seed(0)
    env = environment()
    print(json.dumps(env), flush=True)
    command = "python benchmarks/kernels_device.py " + " ".join(sys.argv[1:])
    sections = args.only.split(",")
    ceil: dict = {}
    written = 0

    def flush():
        nonlocal written
        results_store.append(kernel_records(ROWS[written:], env, command), args.records)
        written = len(ROWS)
    try:
        for name, fn in [("ceilings", None), ("covariance", covariance_section), ("capture", capture_section), ("solve", solve_section)]:
            if name not in sections:
                continue
            try:
                if name == "ceilings":
                    ceil = ceilings(args.tiny)
                else:
                    fn(ceil, args.tiny)
            except Exception:  # noqa: BLE001 - keep going: one run should give every section it can
                traceback.print_exc()
                ROWS.append({"section": name, "error": traceback.format_exc()[-1000:]})
            if CUDA:
                torch.cuda.empty_cache()
            flush()
    finally:  # also when stopped by a time limit (SIGINT)
        flush()
        print("\n" + table(ROWS))


def table(rows: list[dict]) -> str:
    lines = [f"{'section':<10} {'name':<52} {'shape':<24} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} {'%ceil':>6} note"]
    for r in rows:
        if "name" not in r:
            lines.append(f"{r['section']:<10} ERROR {r.get('error', '')[-200:]!r}")
            continue
        shape = ",".join(f"{k}={r[k]}" for k in ("N", "B", "S", "d", "n", "layers") if k in r)
        note = r.get("error") or r.get("rel_err_vs_fp64_dense") or r.get("tokens_per_s") or ""
        lines.append(f"{r['section']:<10} {r['name'][:52]:<52} {shape[:24]:<24} {r['ms']:>9.3f} {r.get('tflops', ''):>8} "
                     f"{r.get('gbs', ''):>7} {r.get('pct_of_ceiling', '') or '':>6} {str(note)[:60]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
