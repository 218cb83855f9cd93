"""Tables and a plot from the profiler's JSON files (benchmarks/profile_edits.py).

    python benchmarks/plot_results.py DEVICE_OUT/profile_*.json --out benchmarks/results

writes results.md (every table) and results.png (time vs number of edits per phase, fast vs
reference, log-log; extrapolated reference points hollow). Needs matplotlib for the PNG only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCHEMA = "memit_fast.profile/1"
PHASES = ["templates", "statistics", "z", "keys and values", "solve", "weight update", "other"]


def load(paths) -> list[dict]:
    docs = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("profile_*.json")) if p.is_dir() else [p]
        for f in files:
            doc = json.loads(f.read_text())
            if doc.get("schema") == SCHEMA:
                doc["_file"] = f.name
                docs.append(doc)
    return docs


def _s(x) -> str:
    if x is None:
        return "-"
    if x >= 3600:
        return f"{x / 3600:.2f} h"
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.1f} s"
    return f"{x * 1000:.0f} ms"


def markdown(docs: list[dict]) -> str:
    out = []
    for doc in docs:
        c, env = doc.get("conditions", {}), doc.get("environment", {})
        hp = c.get("hparams", {})
        out.append(f"### {c.get('model', '?')}{' (tiny config)' if c.get('tiny') else ''}: {env.get('device', '?')}, "
                   f"{c.get('dtype', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, commit {str(env.get('commit', '?'))[:10]}")
        out.append("")
        runs = [r for r in doc.get("runs", []) if r.get("phases")]
        if c and runs:
            chunk = c.get("chunk_tokens")
            out.append(f"{'z chunks capped at ' + str(chunk) + ' suffix tokens. ' if isinstance(chunk, int) else ''}Random weights; layers {hp.get('layers')}, {hp.get('v_num_grad_steps')} z steps for every request (no early stop: "
                       f"random weights), lambda {hp.get('mom2_update_weight')}; statistics cached (synthetic C, {c.get('stats_gib', '?')} GiB); "
                       f"model {c.get('model_gib', '?')} GiB; request lengths {c.get('request_lengths', {})}; templates: 6 fixed "
                       f"(sampling timed on its own: {_s(c.get('templates_sampling_s'))}).")
            out.append("")
        if runs:
            out.append("| mode | edits | " + " | ".join(PHASES) + " | total | edits/s | peak GiB |")
            out.append("|---|---:|" + "---:|" * (len(PHASES) + 3))
            for r in sorted(runs, key=lambda r: (r["mode"] != "fast", r["edits"], r.get("measured", True) is False)):
                cells = []
                for ph in PHASES:
                    v = r["phases"].get(ph)
                    if not v:
                        cells.append("-")
                        continue
                    share = f" ({100 * v['share']:.0f}%)" if v.get("share") is not None else ""
                    cells.append(f"{_s(v['seconds'])}{share}{'*' if v.get('extrapolated') else ''}")
                mode = r["mode"] + ("" if r.get("measured", True) else (f", extrapolated from {r['extrapolated_from']}" if r.get("extrapolated_from") else f", {r.get('failed', 'partial')}"))
                out.append(f"| {mode} | {r['edits']:,} | " + " | ".join(cells) +
                           f" | {_s(r.get('total_s'))} | {r.get('edits_per_s', '-')} | {r.get('peak_gib', '-')} |")
            out.append("")
            out.append("`*` extrapolated (method in the JSON). Share of the run's total in brackets.")
            out.append("")
            measured = [r for r in runs if r.get("measured", True)]
            if measured:
                out.append("Peak GPU memory per phase (GiB, torch allocator high-water mark inside the phase, model and statistics included):")
                out.append("")
                out.append("| mode | edits | " + " | ".join(p for p in PHASES if p != "other") + " | z TFLOP/s (matmul model) |")
                out.append("|---|---:|" + "---:|" * (len(PHASES)))
                for r in measured:
                    cells = [str(r["phases"].get(p, {}).get("peak_gib", "-")) for p in PHASES if p != "other"]
                    out.append(f"| {r['mode']} | {r['edits']:,} | " + " | ".join(cells) + f" | {r.get('z_tflops', '-')} |")
                out.append("")
        if doc.get("ratios"):
            out.append("| edits | fast | reference | reference / fast | z: reference / fast |")
            out.append("|---:|---:|---:|---:|---:|")
            for q in doc["ratios"]:
                out.append(f"| {q['edits']:,} | {_s(q['fast_s'])} | {_s(q['reference_s'])} (from {q['reference_extrapolated_from']} requests) | "
                           f"{q['ratio']}x | {q.get('z_ratio', '-')}x |")
            out.append("")
        st = doc.get("stats")
        if st and st.get("runs"):
            out.append(f"Statistics (compute_stats, random-token documents, {st['doc_length']}, cut at {st['max_length']} tokens; "
                       f"layers {st['layers']}, d_ff {st['d_ff']}), extrapolated linearly to {st['target_tokens'] / 1e6:.0f}M tokens:")
            out.append("")
            out.append("| pass | tokens measured | tokens/s | tokens/s without tokenisation | 44M tokens | 44M without tokenisation | TFLOP/s | peak GiB |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            for r in st["runs"]:
                out.append(f"| {r['mode']} | {r['tokens']:,} | {r['tokens_per_s']:,} | {r['tokens_per_s_without_tokenise']:,} | "
                           f"{_s(r['extrapolated_s_44M'])} | {_s(r['extrapolated_s_44M_without_tokenise'])} | {r['tflops_without_tokenise']} | {r['peak_gib']} |")
            out.append("")
        bad = [e for e in doc.get("events", []) if e["status"] != "ok"]
        if bad:
            out.append("Steps not completed: " + "; ".join(f"{e['step']}: {e['status']}"
                                                          f"{' (' + e['reason'] + ')' if e.get('reason') else ''}"
                                                          f"{' ' + e['error'].strip().splitlines()[-1][:160] if e.get('error') else ''}" for e in bad))
            out.append("")
    return "\n".join(out)


def plot(docs: list[dict], path) -> None:
    import math

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    docs = [d for d in docs if any(r.get("phases") and r.get("total_s") for r in d.get("runs", []))]
    if not docs:
        raise SystemExit("no runs to plot")
    cols = min(3, len(docs))
    rows = math.ceil(len(docs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.4 * rows + 0.8), squeeze=False)
    colours = dict(zip(PHASES + ["total"], ["#999999", "#8c564b", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#bcbd22", "black"]))
    shown = set()
    for ax, doc in zip(axes.flat, docs):
        for mode, style in (("fast", "-"), ("reference", "--")):
            runs = sorted((r for r in doc["runs"] if r["mode"] == mode and r.get("total_s") and (mode == "fast" or not r.get("measured", True))),
                          key=lambda r: r["edits"])
            if not runs:
                continue
            xs = [r["edits"] for r in runs]
            for ph in PHASES + ["total"]:
                ys = [r["total_s"] if ph == "total" else r["phases"].get(ph, {}).get("seconds") for r in runs]
                pts = [(x, y) for x, y in zip(xs, ys) if y]
                if not pts or (ph != "total" and max(y for _, y in pts) < 1e-3):
                    continue
                shown.add(ph)
                ax.plot(*zip(*pts), style, marker="o", color=colours[ph], mfc="none" if mode == "reference" else colours[ph],
                        lw=2.5 if ph == "total" else 1.3)
        env, c = doc.get("environment", {}), doc.get("conditions", {})
        ax.set(xscale="log", yscale="log", xlabel="edits", ylabel="seconds")
        ticks = sorted({r["edits"] for r in doc["runs"] if r.get("total_s") and (r["mode"] == "fast" or not r.get("measured", True))})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{c.get('model')}{' (tiny)' if c.get('tiny') else ''}, {c.get('dtype')}, {env.get('device', '')}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(docs):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colours[p], lw=2.5 if p == "total" else 1.5, label=p) for p in PHASES + ["total"] if p in shown]
    handles += [Line2D([], [], color="k", ls="-", marker="o", label="fast (measured)"),
                Line2D([], [], color="k", ls="--", marker="o", mfc="none", label="reference (extrapolated from a subset)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / (4.4 * rows + 0.8) + 0.02, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", help="profile_*.json files or directories holding them")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    docs = load(args.inputs)
    if not docs:
        print("no profiler JSON found", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(docs) + "\n")
    print(markdown(docs))
    if not args.no_plot:
        plot(docs, out / "results.png")
        print(f"wrote {out / 'results.md'} and {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
