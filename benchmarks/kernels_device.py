"""Ceilings of the device, then each memit_fast kernel at real sizes against them and its twin.

    python benchmarks/kernels_device.py OUT.json [--tiny] [--only ceilings,covariance,capture,solve]

Ceilings: a bf16 8192^3 matrix product on random data (TFLOP/s), a device-to-device copy
(GB/s, bytes read + written), fp64 and fp32 products for the solves. Covariance: every tile
config at N = 16384 tokens x d = 16384 / 14336 / 6400 bf16, useful flops N d (d + 1);
masked rows (row index, in place) vs compaction + dense; the accumulator's tokens/s.
Capture: 10,000 rows of (8, 2048, d) bf16 to fp32. Solves: six GPT-J layers (d 16384,
n 10,000) by cholesky / woodbury (cached factor) in fp64 and fp32, for A and for Delta W
(m = 4096 right-hand sides), against the dense twin.
Prints a table (last) and writes every row plus device, versions, date and commit to OUT.json.
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
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402

from memit_fast import native, solve  # noqa: E402
from memit_fast.kernels import capture, covariance  # noqa: E402

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
        acc = covariance.CovarianceAccumulator(d, DEV, torch.bfloat16, backend="triton")
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
        ms = bench(lambda: capture.gather_rows(h, index, out), reps=20)
        record("capture", "gather_rows bf16->fp32", ms, bytes_=moved, ceiling=("gbs", ceil.get("copy_gbs")), provider="memit_fast", **shape)
        ms = bench(lambda: capture.gather_rows_reference(h, index, out), reps=20)
        record("capture", "twin h[b, s] + copy_", ms, bytes_=moved, ceiling=("gbs", ceil.get("copy_gbs")), provider="reference", **shape)


# ---- solves ----

def spd_cov(d: int) -> torch.Tensor:
    """X^T X / m + 0.05 I with X (m = 2d, d) bf16 random: eigenvalues in about [0.14, 2.9]."""
    x = rand(2 * d, d)
    c = (x.mT @ x).double() / (2 * d)
    return c.add_(torch.eye(d, dtype=torch.float64, device=DEV), alpha=0.05)


def solve_section(ceil: dict, tiny: bool) -> None:
    d, m, layers = (160, 24, 6) if tiny else (16384, 4096, 6)  # m: GPT-J's d_model
    fp64_peak = ("tflops", ceil.get("fp64_tflops"))
    cov = spd_cov(d)
    factor = solve.factor_scaled_cov(cov, LAM)
    ms = bench(lambda: solve.factor_scaled_cov(cov, LAM), reps=2, warmup=0)
    record("solve", "factor lam*C fp64, one layer (cached with the stats)", ms, flops=d**3 / 3, ceiling=fp64_peak,
           provider="memit_fast", d=d)
    for n in ([40, 200] if tiny else [10_000, 1000]):
        keys = [rand(d, n, dtype=torch.float32) for _ in range(layers)]
        resid = [rand(m, n, dtype=torch.float32) for _ in range(layers)]
        shape = {"d": d, "n": n, "layers": layers}
        ref = solve.solve_update_keys_reference(cov, keys[0], LAM)
        ref_delta = resid[0].double() @ ref.mT
        ms = bench(lambda: solve.solve_update_keys_reference(cov, keys[0], LAM), reps=2, warmup=1)
        record("solve", "dense twin fp64 (A), one layer x6", ms * layers, flops=layers * solve.solve_flops(d, n, "dense"),
               ceiling=fp64_peak, provider="reference", **shape)
        for form in ("A", "dW"):
            for dtype in (torch.float64, torch.float32):
                f = factor if dtype == torch.float64 else factor.float()
                for method in ("cholesky", "woodbury"):
                    kw = {"method": method, "dtype": dtype, **({"factor": f} if method == "woodbury" else {})}
                    if form == "A":
                        one = lambda i: solve.solve_update_keys(cov, keys[i], LAM, **kw)  # noqa: E731
                        want, mm = ref, None
                    else:
                        one = lambda i: solve.solve_delta_weights(cov, keys[i], resid[i], LAM, **kw)  # noqa: E731
                        want, mm = ref_delta, (m if m < n else None)
                    name = f"{method} {form} {str(dtype)[6:]}, {layers} layers"
                    try:
                        err = float((one(0).double() - want).norm() / want.norm())
                        ms = bench(lambda: [one(i) for i in range(layers)], reps=2, warmup=1)
                        record("solve", name, ms, flops=layers * solve.solve_flops(d, n, method, factored=True, m=mm),
                               ceiling=fp64_peak, provider="memit_fast", rel_err_vs_fp64_dense=f"{err:.2e}",
                               native=native.available(), m=m, **shape)
                    except Exception as e:  # noqa: BLE001
                        record("solve", name, float("nan"), error=repr(e)[:300], **shape)
        del keys, resid, ref, ref_delta


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or os.environ.get("MEMIT_FAST_COMMIT", "unknown"),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default="ceilings,covariance,capture,solve")
    args = ap.parse_args()
    torch.manual_seed(0)
    env = environment()
    print(json.dumps(env), flush=True)
    sections = args.only.split(",")
    ceil: dict = {}
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
            args.out.write_text(json.dumps({"environment": env, "ceilings": ceil, "rows": ROWS}, indent=1))
    finally:  # also when stopped by a time limit (SIGINT)
        args.out.write_text(json.dumps({"environment": env, "ceilings": ceil, "rows": ROWS}, indent=1))
        print("\n" + table(ROWS))


def table(rows: list[dict]) -> str:
    lines = [f"{'section':<10} {'name':<46} {'shape':<24} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} {'%ceil':>6} note"]
    for r in rows:
        if "name" not in r:
            lines.append(f"{r['section']:<10} ERROR {r.get('error', '')[-200:]!r}")
            continue
        shape = ",".join(f"{k}={r[k]}" for k in ("N", "B", "S", "d", "n", "layers") if k in r)
        note = r.get("error") or r.get("rel_err_vs_fp64_dense") or r.get("tokens_per_s") or ""
        lines.append(f"{r['section']:<10} {r['name'][:46]:<46} {shape[:24]:<24} {r['ms']:>9.3f} {r.get('tflops', ''):>8} "
                     f"{r.get('gbs', ''):>7} {r.get('pct_of_ceiling', '') or '':>6} {str(note)[:60]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
