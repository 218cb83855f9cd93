"""Sequential editing curves: batches edited one after another with `memit_fast.Editor`, the
metrics measured after every batch (docs/sequential.md).

For n records in batches of E and each method: after batch k, the k*E records edited so far and
the first batch's E records (a subset of them: how much of the first edits survives) are scored,
and the fluency GE is measured on the generation prompts of a fixed set of records (CounterFact).
The unedited model is evaluated once; after each method the model is restored and checked bit
for bit against the original weights.

    python -m memit_fast.eval --sequential --edit-batch 10 --method alphaedit,memit --data cf.json --out DIR
    python -m memit_fast.eval.sequential DIR/results.json [MORE.json ...] --out curves.png
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

from .report import CF_LABELS, ZSRE_LABELS, _cell
from .run import _timed, check_restored, evaluate, summarize, to_requests

CURVE_METRICS = {"counterfact": ("ES", "PS", "NS", "GE"), "zsre": ("efficacy", "paraphrase", "specificity", "S")}


def run_sequential(
    model,
    tok,
    records: Sequence[dict],
    *,
    kind: str,
    methods: Sequence[str],
    edit_batch: int,
    hparams=None,
    batch_size: int = 64,
    fluency: bool = True,
    fluency_records: int = 10,
    gen_length: int = 100,
    seed: int = 0,
    editor_options: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """{"kind", "n_records", "mode", "edit_batch", "case_ids", "before": {"metrics"}, "methods":
    {method: {"curve": [point per batch], "edit_s": [...], "final": metrics}}, "timing_s"}; a point
    is {"batch", "n_edits", "edit_s", "so_far": metrics, "first_batch": metrics, "GE": metric or None,
    "unedited_so_far": the unedited model's metrics over the same records as so_far}.
    A KeyboardInterrupt (Ctrl-C, SIGINT) ends the run with the batches measured so far and
    result["interrupted"] saying where.
    editor_options: keyword arguments of memit_fast.Editor (nullspace_threshold, l2, stats, corpus, ...)."""
    from ..editor import Editor
    from ..api import restore

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    records = list(records)
    n = len(records)
    ids = [r.get("case_id", i) for i, r in enumerate(records)] if kind == "counterfact" else list(range(n))
    requests = to_requests(kind, records, ids)
    batches = [range(i, min(i + edit_batch, n)) for i in range(0, n, edit_batch)]
    flu = records[: min(fluency_records, n)] if fluency and kind == "counterfact" else []
    ev = dict(batch_size=batch_size, seed=seed, gen_length=gen_length)
    timing: dict = {}

    def ge():
        if not flu:
            return None
        res = evaluate(model, tok, kind, flu, ids[: len(flu)], fluency=True, **ev)
        return summarize(kind, res).get("GE")

    log(f"[eval] {kind}: {n} records, unedited")
    before, timing["eval_before"] = _timed(model, lambda: evaluate(model, tok, kind, records, ids, fluency=False, **ev))
    before_ge = ge()
    result = {
        "kind": kind, "n_records": n, "mode": f"sequential batches of {edit_batch}", "edit_batch": edit_batch, "case_ids": ids,
        "before": {"metrics": summarize(kind, before) | ({"GE": before_ge} if before_ge else {}),
                   "first_batch": summarize(kind, before[: len(batches[0])])},
        "methods": {}, "timing_s": timing,
    }  # fmt: skip
    for method in methods:
        ed = Editor(model, tok, hparams, method, **(editor_options or {}))
        original = {name: t.clone() for name, t in ed.base.items()}
        curve = []
        t_method = time.perf_counter()
        try:
            for k, b in enumerate(batches):
                log(f"[eval] {method}: editing batch {k + 1}/{len(batches)} ({len(b)} requests, {ed.n_edits} edits before it)")
                batch = ed.edit([requests[i] for i in b])
                end = b.stop
                res, dt = _timed(model, lambda: evaluate(model, tok, kind, records[:end], ids[:end], fluency=False, **ev))
                point = {"batch": k + 1, "n_edits": ed.n_edits, "edit_s": batch.seconds, "eval_s": dt,
                         "so_far": summarize(kind, res), "first_batch": summarize(kind, res[: len(batches[0])]), "GE": ge(),
                         "unedited_so_far": summarize(kind, before[:end])}
                curve.append(point)
                log(f"[eval] {method} after {ed.n_edits} edits: " + ", ".join(
                    f"{m} {point['so_far'][m]['mean']:.1f}" for m in CURVE_METRICS[kind] if m in point["so_far"])
                    + (f", GE {point['GE']['mean']:.1f}" if point["GE"] else "") + f" (edit {batch.seconds:.1f} s)")
        except KeyboardInterrupt:  # Ctrl-C or a time limit's SIGINT: keep the batches measured so far
            result["interrupted"] = f"{method}: interrupted after {len(curve)} of {len(batches)} batches"
            log(f"[eval] {result['interrupted']}")
        finally:
            restore(model, original)
            check_restored(model, original)
        if not curve:
            break
        final = curve[-1]["so_far"] | ({"GE": curve[-1]["GE"]} if curve[-1]["GE"] else {})
        result["methods"][method] = {
            "curve": curve, "final": final, "edit_s": [p["edit_s"] for p in curve],
            "nullspace_threshold": ed.nullspace_threshold if method == "alphaedit" else None,
            "l2": ed.l2 if method == "alphaedit" else None,
        }  # fmt: skip
        timing[f"{method}_total"] = time.perf_counter() - t_method
        if "interrupted" in result:
            break
    return result


def markdown_sequential(result: dict) -> str:
    """The report: conditions, the final table (unedited and each method), and each method's curve."""
    kind = result["kind"]
    labels = CF_LABELS if kind == "counterfact" else ZSRE_LABELS
    methods = result["methods"]
    lines = [f"## {kind}: {result['n_records']} records, {result['mode']}, methods {', '.join(methods)}", ""]
    lines += [f"- {k}: {v}" for k, v in result.get("meta", {}).items()]
    if "interrupted" in result:
        lines += [f"- INTERRUPTED: {result['interrupted']}"]
    lines += ["", "After the last batch (all records edited so far; GE on the fluency records):", ""]
    lines += ["| metric | unedited | " + " | ".join(methods) + " |", "| --- | ---: |" + " ---: |" * len(methods)]
    for key, label in labels.items():
        row = [result["before"]["metrics"].get(key)] + [m["final"].get(key) for m in methods.values()]
        if any(c is not None for c in row):
            lines.append(f"| {label} | " + " | ".join(_cell(c) for c in row) + " |")
    first = [result["before"]["first_batch"]] + [m["curve"][-1]["first_batch"] for m in methods.values()]
    for key in CURVE_METRICS[kind]:
        if key in first[0]:
            lines.append(f"| first batch: {key} | " + " | ".join(_cell(f.get(key)) for f in first) + " |")
    for name, m in methods.items():
        extra = f" (nullspace_threshold {m['nullspace_threshold']:g}, l2 {m['l2']:g})" if m["nullspace_threshold"] is not None else ""
        keys = [k for k in CURVE_METRICS[kind] if k != "GE"]
        groups = [("", "so_far"), ("first batch ", "first_batch")] + ([("unedited ", "unedited_so_far")] if all("unedited_so_far" in p for p in m["curve"]) else [])
        lines += ["", f"### {name}{extra}", "",
                  "| batch | edits | edit s | " + " | ".join(f"{tag}{k}" for tag, _ in groups for k in keys) + " | GE |",
                  "| ---: " * (4 + len(groups) * len(keys)) + "|"]
        for p in m["curve"]:
            cells = [p[part][k] for _, part in groups for k in keys]
            ge = f"{p['GE']['mean']:.1f}" if p["GE"] else "-"
            lines.append(f"| {p['batch']} | {p['n_edits']} | {p['edit_s']:.2f} | " + " | ".join(f"{c['mean']:.1f}" for c in cells) + f" | {ge} |")
    lines += ["", "Times (s):", ""] + [f"- {k}: {v:.2f}" for k, v in result["timing_s"].items()]
    return "\n".join(lines) + "\n"


def plot_curves(results: Sequence[dict], path: str) -> None:
    """One PNG: a panel per metric (CounterFact ES, PS, NS, GE; zsRE efficacy, paraphrase,
    specificity, S) against the number of edits, one colour per method (and data set when there
    are several results), solid: the records edited so far, dashed: the first batch, grey dotted:
    the unedited model on the records edited so far (the population of "so far" grows). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the curves need matplotlib, which is not installed: pip install matplotlib (or memit_fast[plots])") from None
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    fig, axes = plt.subplots(len(kinds), 4, figsize=(16, 3.6 * len(kinds)), squeeze=False)
    for row, kind in enumerate(kinds):
        for col, key in enumerate(CURVE_METRICS[kind]):
            ax = axes[row][col]
            for i, r in enumerate(x for x in results if x["kind"] == kind):
                for j, (method, m) in enumerate(r["methods"].items()):
                    color = f"C{(i * 2 + j) % 10}"
                    tag = method if len(results) == 1 else f"{method} ({r['n_records']} {kind}, E={r['edit_batch']})"
                    xs = [0] + [p["n_edits"] for p in m["curve"]]
                    if key == "GE":
                        before = r["before"]["metrics"].get("GE")
                        ys = [before["mean"] if before else None] + [p["GE"]["mean"] if p["GE"] else None for p in m["curve"]]
                        ax.plot(xs, ys, "o-", color=color, label=tag, ms=3)
                        continue
                    ax.plot(xs, [r["before"]["metrics"][key]["mean"]] + [p["so_far"][key]["mean"] for p in m["curve"]], "o-", color=color, label=f"{tag}: edited so far", ms=3)
                    ax.plot(xs, [r["before"]["first_batch"][key]["mean"]] + [p["first_batch"][key]["mean"] for p in m["curve"]], "--", color=color, label=f"{tag}: first batch")
                    if j == 0 and all("unedited_so_far" in p for p in m["curve"]):
                        ax.plot(xs[1:], [p["unedited_so_far"][key]["mean"] for p in m["curve"]], ":", color="gray", label="unedited, the same records")
            ax.set_title(f"{kind}: {key}")
            ax.set_xlabel("edits made")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_results(results: Sequence[dict]) -> list[dict]:
    """Results of the same records and batches (one method each, e.g. run in separate processes)
    joined into one result with all their methods; others are kept apart."""
    out: dict[tuple, dict] = {}
    for r in results:
        key = (r["kind"], r["n_records"], r["edit_batch"], tuple(r["case_ids"]))
        if key in out:
            out[key]["methods"] = out[key]["methods"] | r["methods"]
            out[key]["timing_s"] = out[key]["timing_s"] | {k: v for k, v in r["timing_s"].items() if k != "eval_before"}
            if "interrupted" in r:
                out[key]["interrupted"] = "; ".join(filter(None, (out[key].get("interrupted"), r["interrupted"])))
        else:
            out[key] = dict(r, methods=dict(r["methods"]), timing_s=dict(r["timing_s"]))
    return list(out.values())


def main(argv=None) -> int:
    """python -m memit_fast.eval.sequential RESULTS.json... --out FILE.png [--report FILE.md]: the
    curves of saved results (results of one method each over the same records are joined)."""
    import json

    p = argparse.ArgumentParser(prog="python -m memit_fast.eval.sequential", description=main.__doc__)
    p.add_argument("results", nargs="+", help="results.json of `memit-fast eval --sequential`")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--report", default=None, help="also write the joined results' Markdown report here")
    args = p.parse_args(argv)
    results = []
    for path in args.results:
        with open(path) as f:
            r = json.load(f)
        if "methods" not in r:
            print(f"error: {path} is not a --sequential result (no 'methods')", file=sys.stderr)
            return 2
        results.append(r)
    results = merge_results(results)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write("\n".join(markdown_sequential(r) for r in results))
    try:
        plot_curves(results, args.out)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
