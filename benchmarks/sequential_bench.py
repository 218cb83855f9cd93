"""Time per edit batch of a sequential session (memit_fast.Editor), MEMIT against AlphaEdit, at
full model shapes with random weights (benchmarks/synthetic.py): does a batch get slower as
edits pile up before it, and how does it compare with one-shot MEMIT? And `records`: a
`memit-fast eval --sequential` result as records.

    python -m benchmarks.sequential_bench time --model gpt-j-6b --per-batch 1000 --batches 10 --methods memit --one-shot --records OUT/records.jsonl
    python -m benchmarks.sequential_bench time --model gpt-j-6b --tiny --per-batch 4 --batches 3 --one-shot   # CPU check
    python -m benchmarks.sequential_bench records OUT/eval_cf/results.json --path OUT/records.jsonl

The synthetic statistics of the layers differ only by a scale (synthetic.synthetic_stats), so
their eigenvectors are the same: the null-space basis is computed once (one torch.linalg.eigh in
float64, timed; with --eigh-float32 also in float32, timed and compared) and written to the
projection cache for every layer, which the Editor then reads (its first batch's "statistics"
phase is that read); the threshold is the eigenvalue quantile that leaves r = --null-fraction *
d_ff directions (real statistics: SmolLM2 at AlphaEdit's 2e-2 leaves 67-81%). Each batch's time
is the whole Editor.edit (z, keys, solve, write, AlphaEdit's key accumulation), with its phases.
--one-shot: before the batches, `memit_fast.apply` of the first batch's N requests at once (after
an untimed warm-up apply of a few requests), timed the same way: the one-shot MEMIT baseline per
edit against which each batch's seconds per edit are compared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_store  # noqa: E402
import synthetic  # noqa: E402


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def prefill_projection(stats: dict, hparams, model, threshold_fraction: float, cache_dir: Path) -> tuple[float, float, int, torch.Tensor]:
    """One eigh of the first layer's statistics; its lowest threshold_fraction eigenvectors written
    as the cached basis of every layer. Returns (threshold, eigh seconds, r, basis)."""
    from memit_fast.cache import model_fingerprint
    from memit_fast.sequential import _write_basis, projection_path

    first = stats[hparams.layers[0]].mom2
    _sync()
    t0 = time.perf_counter()
    values, vectors = torch.linalg.eigh(first.to(torch.float64))
    _sync()
    seconds = time.perf_counter() - t0
    r = int(threshold_fraction * first.shape[0])
    threshold = float(values[r - 1] + values[r]) / 2  # between the r-th and (r+1)-th eigenvalue of the first layer
    basis = vectors[:, :r].contiguous()
    fp = model_fingerprint(model, hparams)
    for layer in hparams.layers:
        path, key = projection_path(cache_dir, fp, hparams.rewrite_module_tmp.format(layer), stats[layer].mom2, threshold)
        _write_basis(path, key, basis)
    return threshold, seconds, r, basis


def eigh_float32(cov: torch.Tensor, threshold: float, basis: torch.Tensor) -> dict:
    """torch.linalg.eigh of cov in float32, timed, against the float64 basis (d, r): the rank at the
    same threshold and how far the float32 null space leaves the float64 one,
    |U32 - U64 U64^T U32|_F / sqrt(r) (0: the same space; 1: orthogonal)."""
    _sync()
    t0 = time.perf_counter()
    values, vectors = torch.linalg.eigh(cov.to(torch.float32))
    _sync()
    seconds = time.perf_counter() - t0
    u32 = vectors[:, values < threshold].to(torch.float64)
    off = (u32 - basis @ (basis.mT @ u32)).norm() / max(u32.shape[1], 1) ** 0.5
    return {"seconds": seconds, "r": u32.shape[1], "off": float(off)}


def one_shot(model, tok, hp, stats, requests, args) -> tuple[float, dict]:
    """`memit_fast.apply` of `requests` at once, timed (and its phases), after an untimed warm-up
    apply of a few of them; the weights restored after each. Returns (seconds, phases)."""
    import memit_fast
    from memit_fast.profiling import PhaseTimer

    kw = dict(stats=stats, context_templates=synthetic.TEMPLATES, progress=False, solve_method=args.solve_method)
    _, orig = memit_fast.apply(model, tok, requests[: min(8, len(requests))], hp, **kw)
    memit_fast.restore(model, orig)
    timer = PhaseTimer()
    _sync()
    t0 = time.perf_counter()
    _, orig = memit_fast.apply(model, tok, requests, hp, timer=timer, **kw)
    _sync()
    seconds = time.perf_counter() - t0
    memit_fast.restore(model, orig)
    return seconds, {name: round(v["seconds"], 4) for name, v in timer.totals().items()}


def _without_z(row: dict) -> float:
    """A batch's seconds less its z phase (z depends on the requests, the rest on the sizes)."""
    return row["seconds"] - row["phases"].get("z", 0.0)


def time_batches(args) -> int:
    from memit_fast.presets import for_model

    t_start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, build_s = synthetic.build_model(args.model, tiny=args.tiny, device=device)
    tok = synthetic.load_tokenizer(args.tokenizer, fallback_ok=args.tiny)
    hp = for_model(model)
    stats = synthetic.synthetic_stats(model, hp)
    requests = synthetic.make_requests(synthetic.load_records(args.data, fallback_ok=args.tiny), args.per_batch * args.batches)
    cache = Path(tempfile.mkdtemp(prefix="seq_bench_cache_"))
    methods = args.methods.split(",")
    d_ff = stats[hp.layers[0]].mom2.shape[0]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    ctx = results_store.context("sequential_bench", " ".join(["python -m benchmarks.sequential_bench"] + sys.argv[1:]))
    shape = {"d_ff": d_ff, "layers": len(hp.layers), "per_batch": args.per_batch}
    records = []
    print(f"{args.model}{' (tiny)' if args.tiny else ''} on {device}: built in {build_s:.1f} s; d_ff {d_ff}, layers {hp.layers}, {dtype}", flush=True)
    threshold = None
    if "alphaedit" in methods:
        threshold, eigh_s, r, basis = prefill_projection(stats, hp, model, args.null_fraction, cache)
        shape["r"] = r
        records.append(results_store.make("solve", f"sequential: null-space eigh ({args.model})", "time", eigh_s, "s", ctx,
                                          model=args.model, shape={"d": d_ff}, dtype="float64", params={"function": "torch.linalg.eigh"}))
        print(f"null space r = {r} ({args.null_fraction:.0%}) at threshold {threshold:.3g}; eigh of one {d_ff}x{d_ff} float64: {eigh_s:.2f} s "
              f"({len(hp.layers)} layers: {eigh_s * len(hp.layers):.1f} s without the cache)", flush=True)
        if args.eigh_float32:
            f32 = eigh_float32(stats[hp.layers[0]].mom2, threshold, basis)
            records.append(results_store.make("solve", f"sequential: null-space eigh ({args.model})", "time", f32["seconds"], "s", ctx,
                                              model=args.model, shape={"d": d_ff}, dtype="float32",
                                              params={"function": "torch.linalg.eigh", "r": f32["r"], "subspace_off": f32["off"]}))
            print(f"eigh in float32: {f32['seconds']:.2f} s, r = {f32['r']} at the same threshold, |U32 - P64 U32|_F / sqrt(r) = {f32['off']:.2e}", flush=True)
        del basis
    print(f"N = {args.per_batch} edits per batch, {args.batches} batches per method", flush=True)
    baseline = None
    table: dict[str, list[dict]] = {}
    try:
        if args.one_shot:
            seconds, phases = one_shot(model, tok, hp, stats, requests[: args.per_batch], args)
            baseline = seconds / args.per_batch
            print(f"one-shot MEMIT of the first batch's {args.per_batch} requests: {seconds:.2f} s, {1e3 * baseline:.2f} ms per edit ("
                  + ", ".join(f"{n} {v:.2f}" for n, v in phases.items()) + ")", flush=True)
            records.append(results_store.make("profile_run", f"one-shot MEMIT ({args.model}{', tiny' if args.tiny else ''})", "seconds_per_edit", baseline, "s", ctx,
                                              provider="memit_fast", model=args.model, shape=shape, dtype=dtype, n_edits=args.per_batch,
                                              params={"seconds": seconds, "phases": phases, "when": "before the batches, after a warm-up apply"}))
        stopped = _run_methods(args, methods, model, tok, hp, stats, requests, cache, threshold, shape, ctx, records, table, t_start)
    except KeyboardInterrupt:  # a time limit's SIGINT: report the batches measured
        stopped = "interrupted by SIGINT"
    _report(args, table, records, ctx, shape, stopped, baseline)
    shutil.rmtree(cache, ignore_errors=True)  # the cached bases: d_ff x r float64 per layer
    if device.startswith("cuda"):
        print(f"peak GPU memory allocated by torch: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    return 0


def _run_methods(args, methods, model, tok, hp, stats, requests, cache, threshold, shape, ctx, records, table, t_start) -> str | None:
    """The batches of each method; rows into `table`, records into `records`; returns why it
    stopped early (the budget), else None."""
    import memit_fast
    from memit_fast.profiling import PhaseTimer

    stopped = None
    for method in methods:
        timer = PhaseTimer()
        ed = memit_fast.Editor(model, tok, hp, method, stats=stats, context_templates=synthetic.TEMPLATES, progress=False, cache_dir=cache,
                               timer=timer, solve_method=args.solve_method, **({"nullspace_threshold": threshold} if method == "alphaedit" else {}))
        rows = table.setdefault(method, [])
        try:
            for k in range(args.batches):
                left = args.budget - (time.perf_counter() - t_start)
                if rows and left < 1.1 * rows[-1]["seconds"]:
                    stopped = f"{method}: stopped before batch {k + 1} ({left:.0f} s of the budget left)"
                    break
                timer.records.clear()
                batch = ed.edit(requests[k * args.per_batch : (k + 1) * args.per_batch])
                phases = {name: round(v["seconds"], 4) for name, v in timer.totals().items()}
                rows.append({"batch": k + 1, "edits_before": ed.n_edits - len(batch.requests), "seconds": batch.seconds, "phases": phases})
                print(f"  {method} batch {k + 1}: {batch.seconds:.2f} s ({ed.n_edits - len(batch.requests)} edits before it; "
                      + ", ".join(f"{n} {s:.2f}" for n, s in phases.items()) + ")", flush=True)
                records.append(results_store.make(
                    "profile_run", f"sequential {method} ({args.model}{', tiny' if args.tiny else ''})", "seconds_per_batch", batch.seconds, "s", ctx,
                    provider="memit_fast", model=args.model, shape=shape, dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                    n_edits=ed.n_edits, params={"batch": k + 1, "edits_before": ed.n_edits - len(batch.requests), "phases": phases, "method": method},
                ))  # fmt: skip
        finally:
            memit_fast.restore(model, ed.base)
        if stopped:
            return stopped
    return None


def _report(args, table, records, ctx, shape, stopped, baseline) -> None:
    """The table of seconds per batch (and per edit against one-shot MEMIT), the growth ratios,
    and the records appended."""
    table = {m: rows for m, rows in table.items() if rows}
    if not table:
        print("no batch was measured")
    n = args.per_batch
    print("\nseconds per batch, whole edit / without z (batch 1 includes the first-use work; growth = mean of the last 3 / mean of batches 2-4)"
          + (f"; x one-shot: seconds per edit / one-shot MEMIT's {1e3 * baseline:.2f} ms per edit" if baseline else "") + ":")
    methods = list(table)
    cols = ["", " without z"] + ([" x one-shot"] if baseline else [])
    print("| batch | edits before | " + " | ".join(f"{m}{c}" for m in methods for c in cols) + " |")
    print("| ---: | ---: |" + " ---: |" * len(cols) * len(methods))
    for k in range(max((len(v) for v in table.values()), default=0)):
        cells = []
        for m in methods:
            if k < len(table[m]):
                row = table[m][k]
                cells += [f"{row['seconds']:.2f}", f"{_without_z(row):.2f}"] + ([f"{row['seconds'] / n / baseline:.3f}"] if baseline else [])
            else:
                cells += ["-"] * len(cols)
        print(f"| {k + 1} | {k * n} | " + " | ".join(cells) + " |")
    for m, rows in table.items():
        if len(rows) >= 5:
            for what, get in (("whole edit", lambda r: r["seconds"]), ("without z", _without_z)):
                early = sum(get(r) for r in rows[1:4]) / 3
                late = sum(get(r) for r in rows[-3:]) / 3
                print(f"{m}, {what}: growth {late / early:.3f} (batches 2-4 {early:.3f} s, last 3 {late:.3f} s)")
                records.append(results_store.make("profile_ratio", f"sequential {m} ({args.model}): last 3 batches / batches 2-4, {what}", "ratio", late / early, "x", ctx,
                                                  model=args.model, shape=shape, params={"method": m, "batches": len(rows)}))
        if baseline:
            ratios = [r["seconds"] / n / baseline for r in rows]
            print(f"{m}: seconds per edit / one-shot MEMIT's: batch 1 {ratios[0]:.3f}, batches 2-{len(rows)} {min(ratios[1:], default=float('nan')):.3f} to {max(ratios[1:], default=float('nan')):.3f}")
            for i, ratio in enumerate(ratios, 1):
                records.append(results_store.make("profile_ratio", f"sequential {m} ({args.model}): seconds per edit / one-shot MEMIT's", "ratio", ratio, "x", ctx,
                                                  model=args.model, shape=shape, n_edits=i * n, params={"method": m, "batch": i}))
    if stopped:
        print(stopped)
    if args.records:
        results_store.append(records, args.records)
        print(f"{len(records)} records appended to {args.records}")


def eval_to_records(args) -> int:
    """The metrics of a `memit-fast eval --sequential` result after every batch, as records (kind eval)."""
    n = 0
    for f in args.files:
        doc = json.loads(Path(f).read_text())
        if "methods" not in doc:
            print(f"error: {f} is not a --sequential result", file=sys.stderr)
            return 2
        meta = doc.get("meta", {})
        ctx = results_store.context(f"eval sequential {Path(f).parent.name}", args.command or meta.get("command") or f"python -m memit_fast.eval --sequential ... ({f})")
        ctx.update(device=meta.get("device") or ctx["device"], commit=meta.get("commit") or ctx["commit"], date=meta.get("date") or ctx["date"])
        data = Path(meta.get("data", "?")).name
        common = {"model": str(meta.get("model")), "dtype": meta.get("dtype")}
        out = []
        for method, m in doc["methods"].items():
            for p in m["curve"]:
                for part in ("so_far", "first_batch"):
                    for metric, v in p[part].items():
                        out.append(results_store.make("eval", f"{doc['kind']} {data} sequential E={doc['edit_batch']}: {part}", metric, v["mean"], "%", ctx,
                                                      provider=method, n_edits=p["n_edits"], params={"batch": p["batch"], "se": v["se"], "n": v["n"],
                                                      "nullspace_threshold": m["nullspace_threshold"], "l2": m["l2"]}, **common))  # fmt: skip
                if p["GE"]:
                    out.append(results_store.make("eval", f"{doc['kind']} {data} sequential E={doc['edit_batch']}: fluency", "GE", p["GE"]["mean"], "%", ctx,
                                                  provider=method, n_edits=p["n_edits"], params={"batch": p["batch"], "se": p["GE"]["se"]}, **common))
                out.append(results_store.make("eval", f"{doc['kind']} {data} sequential E={doc['edit_batch']}: edit", "time", p["edit_s"], "s", ctx,
                                              provider=method, n_edits=p["n_edits"], params={"batch": p["batch"]}, **common))
        n += results_store.append(out, args.path)
    print(f"appended {n} records to {args.path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time", help="time per batch of MEMIT and AlphaEdit at a model's shapes")
    t.add_argument("--model", default="gpt-j-6b", choices=synthetic.MODELS)
    t.add_argument("--tiny", action="store_true", help="the tiny model of the same architecture (CPU check)")
    t.add_argument("--device", default=None)
    t.add_argument("--per-batch", type=int, default=30, metavar="N", help="edits per batch")
    t.add_argument("--batches", type=int, default=10)
    t.add_argument("--methods", default="memit,alphaedit")
    t.add_argument("--null-fraction", type=float, default=0.75, help="r / d_ff of the null space")
    t.add_argument("--solve-method", default="auto")
    t.add_argument("--tokenizer", default=None)
    t.add_argument("--data", default=None)
    t.add_argument("--one-shot", action="store_true", help="also time one-shot MEMIT of the first batch's requests (the baseline per edit)")
    t.add_argument("--eigh-float32", action="store_true", help="with alphaedit: also time the eigh in float32 and compare its null space")
    t.add_argument("--budget", type=float, default=1e9, help="seconds: no batch is started that would not end inside it")
    t.add_argument("--records", default=None, help="records.jsonl to append to")
    r = sub.add_parser("records", help="records of `memit-fast eval --sequential` results")
    r.add_argument("files", nargs="+")
    r.add_argument("--path", default=str(results_store.DEFAULT_PATH))
    r.add_argument("--command", default=None)
    args = ap.parse_args(argv)
    return time_batches(args) if args.cmd == "time" else eval_to_records(args)


if __name__ == "__main__":
    sys.exit(main())
