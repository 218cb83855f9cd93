"""The results store: schema checks, append/load, the writers' conversions, and the committed records."""

import json
import math

import pytest

import results_store as rs
from plot_results import tables

CTX = {"device": "cpu", "date": "2026-11-30T00:00:00+00:00", "commit": "abc", "command": "x", "versions": {"torch": "2"}, "run_id": "run 1"}


def test_append_load_roundtrip_and_filter(tmp_path):
    path = tmp_path / "sub" / "records.jsonl"
    recs = [rs.make("kernel", "k", "time", 0.5, "s", CTX, provider="memit_fast", shape={"d": 4}),
            rs.make("solve", "s", "tflops", 3, "TFLOP/s", CTX, extrapolated=True)]
    assert rs.append(recs, path) == 2
    assert rs.append([], path) == 0
    back = rs.load(path)
    assert [r["name"] for r in back] == ["k", "s"] and back[0]["schema"] == rs.SCHEMA and back[1]["extrapolated"] is True
    assert "provider" not in back[1]  # None-valued optional fields are left out
    assert [r["name"] for r in rs.load(path, kind="solve")] == ["s"]


@pytest.mark.parametrize("change, message", [
    ({"unit": None}, "unit must be str"),
    ({"kind": "benchmark"}, "unknown kind"),
    ({"value": math.nan}, "finite number"),
    ({"value": True}, "finite number"),
    ({"extrapolated": "no"}, "extrapolated must be bool"),
    ({"speed": 3}, "unknown keys"),
    ({"shape": "d=4"}, "shape must be dict"),
])
def test_validate_rejects(change, message):
    rec = rs.make("kernel", "k", "time", 0.5, "s", CTX)
    rec.update(change)
    with pytest.raises(rs.RecordError, match=message):
        rs.validate(rec)
    rec = rs.make("kernel", "k", "time", 0.5, "s", CTX)
    del rec["commit"]
    with pytest.raises(rs.RecordError, match="lacks"):
        rs.validate(rec)


def test_nothing_is_appended_when_one_record_is_bad(tmp_path):
    path = tmp_path / "r.jsonl"
    good = rs.make("kernel", "k", "time", 0.5, "s", CTX)
    with pytest.raises(rs.RecordError):
        rs.append([good, dict(good, value="fast")], path)
    assert not path.exists()
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(rs.RecordError, match=":2:"):
        rs.load(path)


def test_pytest_summary_and_benchmark_entries():
    log = "...\n5 failed, 65 passed, 4 skipped, 134 deselected in 58.95s\nnoise\n68 passed in 1.5s\n"
    recs = rs.pytest_records(log, "gpu", CTX)
    got = {(r["name"], r["metric"]): r["value"] for r in recs}
    assert got == {("gpu", "failed"): 5, ("gpu", "passed"): 65, ("gpu", "skipped"): 4, ("gpu", "deselected"): 134, ("gpu", "time"): 58.95,
                   ("gpu (2)", "passed"): 68, ("gpu (2)", "time"): 1.5}
    entry = {"name": "test_capture[memit_fast-gpt-j]", "params": {"provider": "memit_fast", "model": "gpt-j"},
             "extra_info": {"kind": "kernel", "device": "cpu", "n": 24, "d": 64, "gbs": 1.5, "edits_per_s": 7.0}, "stats": {"median": 0.01, "rounds": 3}}
    recs = {r["metric"]: r for r in rs.pytest_benchmark_records(entry, CTX)}
    assert set(recs) == {"time", "gbs", "rate"} and recs["rate"]["unit"] == "edits/s"
    assert recs["time"]["name"] == "capture" and recs["time"]["model"] == "gpt-j" and recs["time"]["shape"] == {"n": 24, "d": 64}


def test_profile_records_and_tables():
    from profile_edits import profile_records

    phases = {"z": {"seconds": 8.0, "share": 0.8, "peak_gib": 5.0}, "solve": {"seconds": 2.0, "share": 0.2, "peak_gib": 4.0}}
    doc = {"environment": {"device": "cpu", "date": "d"}, "conditions": {"model": "gpt2-xl", "dtype": "float32", "hparams": {"layers": [1]}},
           "runs": [{"mode": "fast", "edits": 8, "measured": True, "total_s": 10.0, "edits_per_s": 0.8, "phases": phases, "peak_gib": 5.0, "z_tflops": 1.5},
                    {"mode": "reference", "edits": 8, "measured": False, "extrapolated_from": 2, "total_s": 100.0, "edits_per_s": 0.08,
                     "phases": {"z": {"seconds": 100.0, "share": 1.0, "extrapolated": True, "method": "linear"}}}],
           "ratios": [{"edits": 8, "fast_s": 10.0, "reference_s": 100.0, "ratio": 10.0, "z_ratio": 12.5, "reference_extrapolated_from": 2}],
           "events": [{"step": "fast 64 edits", "status": "skipped", "reason": "budget"}]}
    recs = profile_records(doc, dict(CTX))
    for r in recs:
        rs.validate(r)
    z = [r for r in recs if r["kind"] == "profile_phase" and r["name"] == "z" and r["metric"] == "time"]
    assert sorted((r["provider"], r["value"], r["extrapolated"]) for r in z) == [("memit_fast", 8.0, False), ("reference", 100.0, True)]
    text = tables(recs)
    assert "| fast | 8 | - | - | 8.0 s (80%) |" in text and "| 8 | 10.0 s | 100 s" in text and "10.0x | 12.5x |" in text
    assert "fast 64 edits: skipped (budget)" in text


def test_kernel_records_skip_error_rows():
    from kernels_device import kernel_records

    env = {"device": "cpu", "date": "d", "commit": "c", "torch": "2"}
    rows = [{"section": "solve", "name": " mixed", "ms": 2.0, "provider": "memit_fast", "d": 8, "n": 4, "tflops": 1.0, "rel_err_vs_fp64_dense": "1.5e-05"},
            {"section": "solve", "name": "spectrum", "ms": float("nan"), "rel_err_vs_fp64_dense": "2e-12"},
            {"section": "capture", "error": "Traceback ..."}]
    recs = kernel_records(rows, env, "cmd")
    got = {(r["name"], r["metric"]): r["value"] for r in recs}
    assert got == {("mixed", "time"): 0.002, ("mixed", "tflops"): 1.0, ("mixed", "rel_error"): 1.5e-05, ("spectrum", "rel_error"): 2e-12}
    assert recs[0]["shape"] == {"d": 8, "n": 4} and recs[0]["kind"] == "solve"


def test_committed_records_hold_the_published_figures():
    """records.jsonl loads, and the figures README.md and benchmarks/README.md quote are in it."""
    recs = rs.load()

    def one(**match):
        found = [r for r in recs if all(r.get(k) == v for k, v in match.items())]
        assert len(found) == 1, (match, len(found))
        return found[0]["value"]

    assert one(kind="profile_run", name="apply", metric="time", model="gpt-j-6b", provider="memit_fast", n_edits=1000, commit="81c4ac4") == pytest.approx(59.4, abs=0.05)
    assert one(kind="profile_ratio", name="reference / fast", n_edits=1000, commit="81c4ac4") == 40.0
    assert one(kind="stats", metric="rate", provider="memit_fast", commit="81c4ac4") == 47896
    assert one(kind="stats", metric="rate", provider="memit_fast", commit="2d62b68") == 83577  # the forward path's pass
    assert one(kind="profile_run", name="apply", metric="time", model="gpt-j-6b", provider="memit_fast", n_edits=5000, commit="2d62b68") == pytest.approx(213, abs=0.5)
    assert one(kind="eval", metric="S", provider="memit_fast", n_edits=300, commit="2b178f3") == pytest.approx(41.9, abs=0.05)
    assert one(kind="eval", metric="S", provider="memit_fast", n_edits=250, commit="e7164f7") == pytest.approx(84.6, abs=0.05)
    assert one(kind="sweep", name="layers 4..8, lambda 2000", metric="S") == 84.6
    assert one(kind="test_run", name="GPU tests (cuda or native), H200", metric="passed") == 75
    assert "| fused (one pass, all layers) | 1,043,848 | 47,896 |" in tables(recs)
