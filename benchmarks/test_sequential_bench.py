"""sequential_bench: the float32 eigh comparison and the report against the one-shot baseline."""

import argparse

import pytest
import torch

import sequential_bench as sb

CTX = {"device": "cpu", "date": "2026-11-30T00:00:00+00:00", "commit": "abc", "command": "x", "versions": {"torch": "2"}, "run_id": "run 1"}


def test_eigh_float32_finds_the_same_null_space():
    x = torch.randn(256, 64, dtype=torch.float64)
    cov = x.mT @ x / 256
    values, vectors = torch.linalg.eigh(cov)
    threshold = float(values[31] + values[32]) / 2
    out = sb.eigh_float32(cov, threshold, vectors[:, :32].contiguous())
    assert out["r"] == 32 and out["off"] < 1e-4 and out["seconds"] >= 0
    rotated = sb.eigh_float32(cov, threshold, vectors[:, 32:].contiguous())  # the complement: orthogonal
    assert abs(rotated["off"] - 1) < 1e-4


def test_report_compares_each_batch_with_the_one_shot_baseline(capsys):
    args = argparse.Namespace(per_batch=10, model="gpt-j-6b", records=None)
    rows = [{"batch": k + 1, "edits_before": 10 * k, "seconds": s, "phases": {"z": s - 1}} for k, s in enumerate([3.0, 2.0, 2.2])]
    records = []
    sb._report(args, {"memit": rows}, records, CTX, {"d_ff": 8}, None, baseline=0.2)
    ratios = [r["value"] for r in records if r["name"].endswith("one-shot MEMIT's")]
    assert ratios == pytest.approx([1.5, 1.0, 1.1])
    out = capsys.readouterr().out
    assert "| 2 | 10 | 2.00 | 1.00 | 1.000 |" in out and "batch 1 1.500, batches 2-3 1.000 to 1.100" in out
