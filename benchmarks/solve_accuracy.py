"""Accuracy of the solve's precisions on covariances with realistic spectra, emulated on the CPU.

    python benchmarks/solve_accuracy.py [--d 2048] [--decades 4,7]

GPT-J's shape scaled by d / 16384 (n = 0.61 d edits, m = d / 4 residual columns, lam 15000).
C is the second moment of T = 4 d keys drawn from a distribution whose covariance has
eigenvalues log-uniform over the given decades plus a mean (MEMIT's post-GELU keys are far from
centred), and also of GELU(W x + b) keys (d_model = d / 4, as in the MLP). Delta W = R K^T G^-1
against float64 (dense) for:
  mixed     K K^T, K R^T by fp16x3 (the real split of kernels/gram.py, products summed in fp32
            by the CPU's sgemm), factor and solve in float64 (solve.py "mixed")
  fp32      everything in float32 (dtype=torch.float32)
  C in fp32 float64 solve, but C summed in float32 over chunks of 2048 tokens: the rounding the
            statistics already carry (memit_fast folds to float64 every 2^18 tokens)
Prints each relative error and error / cond(G). About a minute at d = 2048 on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the split kernel runs on the CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from memit_fast.kernels.gram import split_fp16x3  # noqa: E402

LAM = 15000.0


def fp16x3(pieces):
    x1, x2, inv = split_fp16x3(pieces)
    return (x1.float().mT @ x2.float()) * inv[:, None] * inv[None, :]


def scenario(name, keys_fn, d, n, m, T):
    tokens = keys_fn(T)  # (T, d) float64
    C = tokens.mT @ tokens / T
    K = keys_fn(n).mT.float().contiguous()  # (d, n) float32 keys, as memit_fast passes them
    R = (torch.randn(m, n, dtype=torch.float64) * 0.1).float()
    K64, R64 = K.double(), R.double()
    G = LAM * C + K64 @ K64.mT
    ev = torch.linalg.eigvalsh(G)
    cond = float(ev[-1] / ev[0])
    ref = torch.linalg.solve(G, K64 @ R64.mT).mT

    def err(g, b):
        try:
            x = torch.cholesky_solve(b, torch.linalg.cholesky(g)).mT
        except torch.linalg.LinAlgError:
            return float("nan")
        return float((x.double() - ref).norm() / ref.norm())

    S = fp16x3([K.mT, R.mT]).double()
    C32 = sum((c.float().mT @ c.float()).double() for c in tokens.split(2048)) / T
    rows = {
        "mixed": err(LAM * C + S[:d, :d], S[d:, :d].mT),
        "fp32": err((LAM * C).float() + K @ K.mT, K @ R.mT),
        "C in fp32": err(LAM * C32 + K64 @ K64.mT, K64 @ R64.mT),
    }
    print(f"{name:<28} cond(G) {cond:8.1e}  " + "  ".join(f"{k} {v:.1e} ({v / cond:.1e} cond)" for k, v in rows.items()), flush=True)
    return cond, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--decades", default="4,7")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    d = args.d
    n, m, T = int(0.61 * d), d // 4, 4 * d
    print(f"d {d}, n {n}, m {m}, C from {T} keys, lam {LAM}")
    for decades in [float(x) for x in args.decades.split(",")]:
        Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
        sq = Q * (10.0 ** (-decades * torch.arange(d, dtype=torch.float64) / (d - 1))).sqrt()
        mu = Q[:, 0] * 3.0
        scenario(f"log-uniform, {decades:g} decades", lambda c: (sq @ torch.randn(d, c, dtype=torch.float64)).mT + mu, d, n, m, T)
    dm = d // 4
    W = torch.randn(d, dm, dtype=torch.float64) * 1.5 / math.sqrt(dm)
    b = torch.randn(d, dtype=torch.float64) * 0.5 - 1.0
    scenario("GELU(W x + b), d_model d/4", lambda c: torch.nn.functional.gelu(torch.randn(c, dm, dtype=torch.float64) @ W.mT + b),
             d, n, m, T)
    x = torch.randn(3 * d, d, dtype=torch.float64)
    sq = torch.linalg.cholesky(x.mT @ x / (3 * d) + 0.05 * torch.eye(d, dtype=torch.float64))
    scenario("X^T X / 3d + 0.05 I (tests)", lambda c: (sq @ torch.randn(d, c, dtype=torch.float64)).mT, d, n, m, T)


if __name__ == "__main__":
    main()
