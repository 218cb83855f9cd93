"""Every benchmark result as one record in one JSON-lines file, benchmarks/results/records.jsonl.

A record is one number with what it measures and how it was obtained:

    {"kind": "kernel", "name": "syrk_lower 128x128-tma", "provider": "memit_fast", "model": null,
     "shape": {"N": 16384, "d": 16384}, "dtype": "bf16", "n_edits": null,
     "metric": "tflops", "value": 677.03, "unit": "TFLOP/s", "extrapolated": false,
     "device": "NVIDIA H200", "date": "2026-11-22T03:41:49+00:00", "commit": "2cee6e9",
     "command": "python benchmarks/kernels_device.py OUT", "versions": {"torch": "2.11.0+cu130"},
     "run_id": "kernels_device 2026-11-22T03:41:49+00:00", "params": {...}, "note": "..."}

Required: REQUIRED (value a finite number, extrapolated a bool, kind one of KINDS). Optional:
OPTIONAL; anything else goes under `params`. Records of one invocation share `run_id`, which is
how benchmarks/plot_results.py groups them into tables.

    python benchmarks/results_store.py merge DEVICE_OUT/records.jsonl       # validate, append here
    python benchmarks/results_store.py add-eval RESULT.json [--command C]   # a `memit-fast eval --out` result
    python benchmarks/results_store.py add-pytest LOG --name NAME           # pytest's summary line(s) of a test run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent / "results" / "records.jsonl"
SCHEMA = "memit_fast.record/1"

KINDS = {
    "profile_run": "one memit_fast.apply run of benchmarks/profile_edits.py (total, edits/s, peak memory, z TFLOP/s)",
    "profile_phase": "one phase of such a run (templates, statistics, z, keys and values, solve, weight update, other)",
    "profile_ratio": "reference-mode time over fast-mode time at the same number of edits",
    "stats": "the statistics pass (compute_stats): fused or one pass per layer",
    "ceiling": "a device ceiling: matrix-product rate, copy bandwidth",
    "kernel": "one kernel or its twin (covariance, capture, gram)",
    "solve": "the update solve and its pieces",
    "stage": "a core stage micro benchmark (benchmarks/bench_core.py: z, keys, statistics)",
    "eval": "a CounterFact or zsRE metric before or after editing",
    "sweep": "a hyper-parameter sweep point",
    "test_run": "a test-suite run (counts of passed, failed, skipped)",
    "trace": "causal tracing (memit_fast.trace): facts/s, fast and in the original structure; the effects of a trace run",
}
REQUIRED = ("kind", "name", "metric", "value", "unit", "extrapolated", "device", "date", "commit")
OPTIONAL = ("schema", "provider", "model", "shape", "dtype", "n_edits", "command", "versions", "run_id", "params", "note", "source")
_TYPES = {"kind": str, "name": str, "metric": str, "unit": str, "extrapolated": bool, "device": str, "date": str, "commit": str,
          "schema": str, "provider": str, "model": str, "shape": dict, "dtype": str, "n_edits": int, "command": str,
          "versions": dict, "run_id": str, "params": dict, "note": str, "source": str}


class RecordError(ValueError):
    """A record that does not follow the schema (missing or unknown key, wrong type, unknown kind)."""


def validate(record: dict) -> dict:
    """Check one record against the schema; returns it (with `schema` filled in) or raises RecordError."""
    if not isinstance(record, dict):
        raise RecordError(f"a record is a dict, got {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise RecordError(f"record {record.get('name')!r} lacks {missing}")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise RecordError(f"record {record['name']!r} has unknown keys {unknown} (put them under 'params')")
    if record["kind"] not in KINDS:
        raise RecordError(f"record {record['name']!r}: unknown kind {record['kind']!r} (one of {sorted(KINDS)})")
    value = record["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"record {record['name']!r}: value must be a finite number, got {value!r}")
    for key, typ in _TYPES.items():
        if record.get(key) is not None and not isinstance(record[key], typ) or (key in REQUIRED and record[key] is None):
            raise RecordError(f"record {record['name']!r}: {key} must be {typ.__name__}, got {record.get(key)!r}")
    return {"schema": SCHEMA, **record}


def append(records, path=DEFAULT_PATH) -> int:
    """Validate every record, then append them all (one JSON object a line) to path; returns the count."""
    checked = [validate(r) for r in records]
    if not checked:
        return 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, sort_keys=False) + "\n" for r in checked))
        f.flush()
        os.fsync(f.fileno())
    return len(checked)


def load(path=DEFAULT_PATH, **match) -> list[dict]:
    """Every record of path (validated), optionally only those whose fields equal `match` (load(kind="kernel"))."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = validate(json.loads(line))
            except (json.JSONDecodeError, RecordError) as e:
                raise RecordError(f"{path}:{i}: {e}") from None
            if all(rec.get(k) == v for k, v in match.items()):
                out.append(rec)
    return out


# ---- the fields every record of a run shares ----

def git_commit() -> str:
    """$MEMIT_FAST_COMMIT when set (a device copy's .git can name another commit than the code that
    ran), else the checkout's commit, else 'unknown'."""
    if os.environ.get("MEMIT_FAST_COMMIT"):
        return os.environ["MEMIT_FAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        commit = out.stdout.strip()
    except OSError:
        commit = ""
    return commit or "unknown"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "triton"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None and torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def device_name() -> str:
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def context(run_name: str, command: str | None = None) -> dict:
    """device, date, commit, command, versions and run_id for the records of one invocation."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"device": device_name(), "date": date, "commit": git_commit(),
            "command": command if command is not None else " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "versions": versions(), "run_id": f"{run_name} {date}"}


def make(kind: str, name: str, metric: str, value, unit: str, ctx: dict, *, extrapolated: bool = False, **fields) -> dict:
    """One record: the run's shared fields (ctx) plus these; None-valued optional fields are dropped."""
    rec = {"kind": kind, "name": name, "metric": metric, "value": value, "unit": unit, "extrapolated": extrapolated, **ctx, **fields}
    return {k: v for k, v in rec.items() if v is not None or k in REQUIRED}


# ---- adapters from other tools' outputs ----

_RATES = {"tflops": "TFLOP/s", "gbs": "GB/s"}


def pytest_benchmark_records(entry: dict, ctx: dict, default_kind: str = "stage") -> list[dict]:
    """Records of one pytest-benchmark result (an entry of its --benchmark-json, or the same fields
    of a live fixture): the median time, and every rate that extra_info holds (tflops, gbs,
    *_per_s). extra_info's kind/model/dtype/n_edits become fields, the other sizes the shape."""
    info = dict(entry.get("extra_info", {}))
    params = dict(entry.get("params") or {})
    kind = info.pop("kind", default_kind)
    for k in ("device", "torch", "triton", "commit"):  # the run's context, recorded once per record already
        info.pop(k, None)
    base = entry["name"].split("[")[0].removeprefix("test_")
    setup = params.pop("setup", None)  # bench_core's module fixture: (model, dtype)
    model = params.pop("model", None) or info.pop("model", None)
    dtype = info.pop("dtype", None) or params.pop("dtype", None)
    if isinstance(setup, (list, tuple)):
        model, dtype = model or setup[0], dtype or setup[1]
    n_edits = info.pop("n_edits", None) or info.pop("requests", None)
    provider = params.pop("provider", None) or info.pop("provider", None)
    info.pop("provider", None)
    rates = {k: info.pop(k) for k in list(info) if k in _RATES or k.endswith("_per_s")}
    shape = {k: v for k, v in info.items() if isinstance(v, int) and not isinstance(v, bool)}
    extra = {k: v for k, v in info.items() if k not in shape}
    extra.update(params)
    extra["rounds"] = entry["stats"].get("rounds")
    common = dict(provider=provider, model=model, dtype=dtype, n_edits=n_edits, shape=shape or None, params=extra or None)
    name = base + "".join(f" {k}={v}" for k, v in sorted(params.items()))
    out = [make(kind, name, "time", entry["stats"]["median"], "s", ctx, **common, note="median")]
    for k, v in rates.items():
        out.append(make(kind, name, "tflops" if k == "tflops" else "gbs" if k == "gbs" else "rate", v,
                        _RATES.get(k) or k.replace("_per_s", "/s"), ctx, **common))
    return out


def eval_records(doc: dict, ctx: dict) -> list[dict]:
    """Records of a `memit-fast eval --out` result: each metric (mean, x100) before and after editing;
    the standard error and count in params; the stage times as kind eval, metric time."""
    meta = doc.get("meta", {})
    data = Path(meta.get("data", "?")).name
    common = dict(model=str(meta.get("model")), dtype=meta.get("dtype"), n_edits=doc.get("n_records"),
                  params={"data": data, "mode": doc.get("mode"), "batch_size": meta.get("batch_size"), "seed": meta.get("seed"),
                          "fluency": meta.get("fluency"), "statistics_corpus": meta.get("statistics_corpus"), "hparams": meta.get("hparams")})
    out = []
    for stage, provider in (("before", "unedited"), ("after", "memit_fast")):
        part = doc.get(stage)
        if not part:
            continue
        for metric, v in part["metrics"].items():
            if v.get("mean") is None:
                continue
            params = dict(common["params"], se=v.get("se"), n=v.get("n"))
            out.append(make("eval", f"{doc['kind']} {data}", metric, v["mean"], "%", ctx, provider=provider,
                            **{**common, "params": params}))
    for stage, seconds in doc.get("timing_s", {}).items():
        if isinstance(seconds, (int, float)):
            out.append(make("eval", f"{doc['kind']} {data}: {stage}", "time", seconds, "s", ctx,
                            provider="unedited" if stage == "eval_before" else "memit_fast", **common))
    return out


def eval_versions(meta: dict) -> dict:
    """{"torch": "2.13.0+cpu", ...} from an eval result's "torch 2.13.0+cpu, transformers 5.23.0, python 3.11.7"."""
    return dict(part.split(" ", 1) for part in str(meta.get("versions") or "").split(", ") if " " in part)


_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def pytest_records(log: str, name: str, ctx: dict, **fields) -> list[dict]:
    """Records of pytest's summary lines ("75 passed, 4 skipped in 41.2s") in a log: one per count
    and one for the time, per summary line (a log of several runs gives several)."""
    out = []
    for i, line in enumerate(m for m in log.splitlines() if re.match(r"^=*\s*\d+ (passed|failed|skipped|errors?)\b", m)):
        part = name if i == 0 else f"{name} ({i + 1})"
        for count, what in _SUMMARY.findall(line):
            out.append(make("test_run", part, "errors" if what.startswith("error") else what, int(count), "tests", ctx, **fields))
        t = re.search(r" in ([\d.]+)s", line)
        if t:
            out.append(make("test_run", part, "time", float(t.group(1)), "s", ctx, **fields))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default=str(DEFAULT_PATH), help="the records file to append to")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="append the records of other records files")
    m.add_argument("files", nargs="+")
    e = sub.add_parser("add-eval", help="append the records of `memit-fast eval --out` JSON files")
    e.add_argument("files", nargs="+")
    e.add_argument("--command", default=None, help="the command that produced them")
    t = sub.add_parser("add-pytest", help="append the summary counts of a pytest log")
    t.add_argument("log")
    t.add_argument("--name", required=True)
    t.add_argument("--command", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "merge":
        n = sum(append(load(f), args.path) for f in args.files)
    elif args.cmd == "add-eval":
        n = 0
        for f in args.files:
            doc = json.loads(Path(f).read_text())
            meta = doc.get("meta", {})
            ctx = context(f"eval {Path(f).stem}", args.command or f"python -m memit_fast.eval ... --out {Path(f).name}")
            ctx.update(device=meta.get("device") or ctx["device"], commit=meta.get("commit") or ctx["commit"],
                       date=meta.get("date") or ctx["date"], versions=eval_versions(meta) or ctx["versions"])
            ctx["run_id"] = f"eval {Path(f).stem} {ctx['date']}"
            n += append(eval_records(doc, ctx), args.path)
    else:
        ctx = context(f"tests {args.name}", args.command or "")
        n = append(pytest_records(Path(args.log).read_text(errors="replace"), args.name, ctx), args.path)
    print(f"appended {n} records to {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
