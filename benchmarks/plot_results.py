"""Every table (Markdown) and plot (PNG) of the benchmark results, from the records.

    python benchmarks/plot_results.py                                  # benchmarks/results/records.jsonl -> results.md, results.png
    python benchmarks/plot_results.py --records DEVICE_OUT/records.jsonl --out DIR [--no-plot]

Records (benchmarks/results_store.py) are grouped by run_id, one section per run in the order of
the file; each kind has its table. The plot (matplotlib; tables need no matplotlib): time vs
number of edits per phase for every profile run, fast solid, reference dashed, extrapolated
points hollow.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_store  # noqa: E402

PHASES = ["templates", "statistics", "z", "keys and values", "solve", "weight update", "other"]


def _s(x) -> str:
    if x is None:
        return "-"
    if x >= 3600:
        return f"{x / 3600:.2f} h"
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.1f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} us"


def _n(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1000:
        return f"{int(x):,}"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def groups(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r.get("run_id") or f"{r['kind']} {r['device']} {r['date']}", []).append(r)
    return out


def _value(recs, **match):
    for r in recs:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


VALUE = "value"


def _phase(recs, phase: str, metric: str, status: str):
    """The profile_phase record of this phase and metric that belongs to the run with this status (measured / extrapolated / ...)."""
    for r in recs:
        if r["kind"] == "profile_phase" and r["name"] == phase and r["metric"] == metric and r.get("params", {}).get("status") == status:
            return r
    return None


def _shape(r) -> str:
    return ", ".join(f"{k}={v}" for k, v in (r.get("shape") or {}).items())


def _header(run_id: str, recs: list[dict]) -> list[str]:
    r = recs[0]
    versions = ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())
    shared = [r.get(k) for k in ("model", "dtype") if len({x.get(k) for x in recs}) == 1]  # said once when every record agrees
    what = ", ".join(x for x in shared if x)
    return [f"### {run_id}", "", f"{what + '; ' if what else ''}{r['device']}; commit {r['commit']}; {r['date']}"
            f"{'; ' + versions if versions else ''}.{' Command: `' + r['command'] + '`.' if r.get('command') else ''}", ""]


def profile_tables(recs: list[dict]) -> list[str]:
    out = []
    runs = sorted({(r["provider"], r["n_edits"], r["extrapolated"]) for r in recs if r["kind"] == "profile_run" and r["name"] == "apply"},
                  key=lambda k: (k[0] != "memit_fast", k[1], k[2]))
    if runs:
        first = _value(recs, kind="profile_run", name="apply")["params"]
        hp = first.get("hparams", {})
        out += [f"Layers {hp.get('layers')}, {hp.get('v_num_grad_steps')} z steps, lambda {hp.get('mom2_update_weight')}; "
                f"{first.get('weights', '')}; statistics: {first.get('statistics', '')}; z chunk: {first.get('chunk_tokens')}; "
                f"z attention: {first.get('z_attention', 'eager')}; "
                f"request lengths {first.get('request_lengths', {})}.", ""]
        out.append("| mode | edits | " + " | ".join(PHASES) + " | total | edits/s | peak GiB |")
        out.append("|---|---:|" + "---:|" * (len(PHASES) + 3))
        for provider, n, ext in runs:
            sel = [r for r in recs if r.get("provider") == provider and r.get("n_edits") == n]
            run = {r["metric"]: r for r in sel if r["kind"] == "profile_run" and r["extrapolated"] == ext}
            status = run["time"]["params"].get("status") if "time" in run else "?"
            cells = []
            for ph in PHASES:
                t, share = _phase(sel, ph, "time", status), _phase(sel, ph, "share", status)
                cells.append("-" if t is None else f"{_s(t['value'])}{f' ({100 * share[VALUE]:.0f}%)' if share else ''}{'*' if t['extrapolated'] else ''}")
            ext_from = run["time"]["params"].get("extrapolated_from") if "time" in run else None
            mode = ("fast" if provider == "memit_fast" else "reference") + (f", extrapolated from {ext_from}" if ext_from and ext else
                                                                            "" if status == "measured" else f", {status}")
            get = lambda m: run[m]["value"] if m in run else None  # noqa: E731
            out.append(f"| {mode} | {n:,} | " + " | ".join(cells) + f" | {_s(get('time'))} | {_n(get('rate'))} | {_n(get('peak_memory'))} |")
        out += ["", "`*` extrapolated (the record's note says how). Share of the run's total in brackets.", ""]
        measured = [k for k in runs if not k[2]]
        if measured:
            out.append("Peak GPU memory per phase (GiB, allocator high-water mark inside the phase, model and statistics included):")
            out += ["", "| mode | edits | " + " | ".join(PHASES[:-1]) + " | z TFLOP/s |", "|---|---:|" + "---:|" * len(PHASES)]
            for provider, n, _ in measured:
                sel = [r for r in recs if r.get("provider") == provider and r.get("n_edits") == n and not r["extrapolated"]]
                cells = [_n((_phase(sel, ph, "peak_memory", "measured") or {}).get(VALUE)) for ph in PHASES[:-1]]
                z = _phase(sel, "z", "tflops", "measured")
                out.append(f"| {'fast' if provider == 'memit_fast' else 'reference'} | {n:,} | " + " | ".join(cells) + f" | {_n(z and z['value'])} |")
            out.append("")
    ratios = sorted({r["n_edits"] for r in recs if r["kind"] == "profile_ratio" and r["name"] == "reference / fast"})
    if ratios:
        out += ["| edits | fast | reference | reference / fast | z: reference / fast |", "|---:|---:|---:|---:|---:|"]
        for n in ratios:
            total = _value(recs, kind="profile_ratio", n_edits=n, name="reference / fast")
            z = _value(recs, kind="profile_ratio", n_edits=n, name="reference / fast: z")
            out.append(f"| {n:,} | {_s(total['params']['fast_s'])} | {_s(total['params']['reference_s'])} ({total.get('note', '')}) | "
                       f"{total['value']}x | {z['value'] if z else '-'}x |")
        out.append("")
    # the statistics passes of profile_edits (distributed_bench's stats records have their own shape)
    stats = [r for r in recs if r["kind"] == "stats" and "doc_length" in (r.get("params") or {})]
    passes = list(dict.fromkeys(r["name"] for r in stats))
    if passes:
        p0 = stats[0]
        out += [f"Statistics (compute_stats; layers {p0['params']['layers']}, documents {p0['params']['doc_length']}, cut at "
                f"{p0['shape']['max_length']} tokens, d_ff {p0['shape']['d_ff']}), extrapolated linearly to "
                f"{p0['params']['target_tokens'] / 1e6:.0f}M tokens:", "",
                "| pass | tokens measured | tokens/s | tokens/s without tokenisation | 44M tokens | 44M without tokenisation | TFLOP/s | peak GiB |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name in passes:
            v = {r["metric"]: r for r in stats if r["name"] == name}
            out.append(f"| {name} | {v['rate']['shape']['tokens']:,} | {_n(v['rate']['value'])} | {_n(v['rate_without_tokenise']['value'])} | "
                       f"{_s(v['time_44M']['value'])} | {_s(v['time_44M_without_tokenise']['value'])} | {_n(v['tflops']['value'])} | "
                       f"{_n(v['peak_memory']['value'])} |")
        out.append("")
    bad = _value(recs, kind="profile_run", name="steps not completed")
    if bad:
        out += ["Steps not completed: " + "; ".join(f"{e['step']}: {e['status']}{' (' + e['reason'] + ')' if e.get('reason') else ''}"
                                                    f"{' ' + e['error'] if e.get('error') else ''}" for e in bad["params"]["events"]), ""]
    return out


def measured_table(recs: list[dict], kinds: tuple[str, ...]) -> list[str]:
    """ceiling / kernel / solve / stage records: one row per (kind, name, provider, model, dtype, shape)."""
    rows: dict[tuple, dict] = {}
    for r in recs:
        if r["kind"] in kinds:
            key = (r["kind"], r["name"], r.get("provider"), r.get("model"), r.get("dtype"), _shape(r))
            rows.setdefault(key, {})[r["metric"] + (" " + r["unit"] if r["metric"] == "rate" else "")] = r["value"]
    if not rows:
        return []
    rates = sorted({m for v in rows.values() for m in v if m.startswith("rate ")})
    out = ["| kind | name | provider | model | dtype | shape | time | TFLOP/s | GB/s | % of ceiling | rel. error |" +
           "".join(f" {m.removeprefix('rate ')} |" for m in rates),
           "|---|---|---|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(rates)]
    for (kind, name, provider, model, dtype, shape), v in rows.items():
        err = v.get("rel_error")
        out.append(f"| {kind} | {name} | {provider or '-'} | {model or '-'} | {dtype or '-'} | {shape or '-'} | {_s(v.get('time'))} | "
                   f"{_n(v.get('tflops'))} | {_n(v.get('gbs'))} | {_n(v.get('pct_of_ceiling'))} | {f'{err:.2e}' if err is not None else '-'} |" +
                   "".join(f" {_n(v.get(m))} |" for m in rates))
    return out + [""]


def eval_table(recs: list[dict]) -> list[str]:
    out = []
    for name in dict.fromkeys(r["name"] for r in recs if r["kind"] == "eval" and r["unit"] == "%"):
        sel = [r for r in recs if r["kind"] == "eval" and r["name"] == name]
        first = sel[0]
        out += [f"{name}: {first.get('n_edits')} records, {first['params'].get('mode')}; statistics corpus "
                f"{first['params'].get('statistics_corpus')}.", "", "| metric | unedited | edited |", "|---|---:|---:|"]
        for metric in dict.fromkeys(r["metric"] for r in sel if r["unit"] == "%"):
            cells = []
            for provider in ("unedited", "memit_fast"):
                r = _value(sel, metric=metric, provider=provider, unit="%")
                se = r and r["params"].get("se")
                cells.append("-" if r is None else f"{r['value']:.1f}" + (f" ± {se:.1f}" if se is not None else ""))
            out.append(f"| {metric} | " + " | ".join(cells) + " |")
        times = [r for r in recs if r["kind"] == "eval" and r["name"].startswith(name + ":") and r["metric"] == "time"]
        if times:
            out += ["", "Times: " + ", ".join(f"{r['name'].split(': ')[-1]} {_s(r['value'])}" for r in times) + "."]
        out.append("")
    return out


def sweep_table(recs: list[dict]) -> list[str]:
    sel = [r for r in recs if r["kind"] == "sweep"]
    if not sel:
        return []
    metrics = list(dict.fromkeys(r["metric"] for r in sel))
    out = [f"Sweep, {sel[0].get('n_edits')} edits, statistics from {sel[0]['params'].get('corpus')} ({sel[0]['params'].get('n_samples')} samples):",
           "", "| config | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name in dict.fromkeys(r["name"] for r in sel):
        v = {r["metric"]: r["value"] for r in sel if r["name"] == name}
        out.append(f"| {name} | " + " | ".join(_s(v.get(m)) if m == "time" else _n(v.get(m)) for m in metrics) + " |")
    return out + [""]


def test_table(recs: list[dict]) -> list[str]:
    sel = [r for r in recs if r["kind"] == "test_run"]
    if not sel:
        return []
    out = ["| test run | passed | failed | skipped | errors | time |", "|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["name"] for r in sel):
        v = {r["metric"]: r["value"] for r in sel if r["name"] == name}
        out.append(f"| {name} | " + " | ".join(str(v.get(m, 0)) for m in ("passed", "failed", "skipped", "errors")) + f" | {_s(v.get('time'))} |")
    return out + [""]


def tables(records: list[dict]) -> str:
    """Markdown: one section per run (run_id), each with the tables of its kinds."""
    out = []
    for run_id, recs in groups(records).items():
        out += _header(run_id, recs)
        out += profile_tables(recs)
        out += measured_table(recs, ("ceiling", "kernel", "solve", "stage"))
        out += eval_table(recs)
        out += sweep_table(recs)
        out += test_table(recs)
    return "\n".join(out)


def plot(records: list[dict], path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = [(run_id, recs) for run_id, recs in groups(records).items()
              if any(r["kind"] == "profile_run" and r["metric"] == "time" and r["name"] == "apply" for r in recs)]
    if not panels:
        raise SystemExit("no profile runs to plot")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.4 * rows + 0.8), squeeze=False)
    colours = dict(zip(PHASES + ["total"], ["#999999", "#8c564b", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#bcbd22", "black"]))
    shown = set()
    for ax, (run_id, recs) in zip(axes.flat, panels):
        ticks = set()
        for provider, style in (("memit_fast", "-"), ("reference", "--")):
            # fast: measured runs; reference: its extrapolations to each N (the measured subset is one point of them)
            totals = sorted((r for r in recs if r["kind"] == "profile_run" and r["name"] == "apply" and r["metric"] == "time"
                             and r.get("provider") == provider and (provider == "memit_fast") != r["extrapolated"]), key=lambda r: r["n_edits"])
            if not totals:
                continue
            ticks |= {r["n_edits"] for r in totals}
            for ph in PHASES + ["total"]:
                pts = []
                for t in totals:
                    if ph == "total":
                        pts.append((t["n_edits"], t["value"]))
                        continue
                    r = _phase([x for x in recs if x.get("provider") == provider and x.get("n_edits") == t["n_edits"]], ph, "time",
                               t["params"]["status"])
                    if r and r["value"] > 0:
                        pts.append((t["n_edits"], r["value"]))
                if not pts or (ph != "total" and max(y for _, y in pts) < 1e-3):
                    continue
                shown.add(ph)
                ax.plot(*zip(*pts), style, marker="o", color=colours[ph], mfc="none" if provider == "reference" else colours[ph],
                        lw=2.5 if ph == "total" else 1.3)
        first = recs[0]
        ax.set(xscale="log", yscale="log", xlabel="edits", ylabel="seconds")
        ax.set_xticks(sorted(ticks), [f"{t:,}" for t in sorted(ticks)])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{first.get('model')}, {first.get('dtype')}, {first['device']}, {first['commit'][:10]}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colours[p], lw=2.5 if p == "total" else 1.5, label=p) for p in PHASES + ["total"] if p in shown]
    handles += [Line2D([], [], color="k", ls="-", marker="o", label="fast (measured)"),
                Line2D([], [], color="k", ls="--", marker="o", mfc="none", label="reference (extrapolated from a subset)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / (4.4 * rows + 0.8) + 0.02, 1, 1))
    fig.savefig(path, dpi=120)


def _default_conditions(r: dict) -> bool:
    """A profile run at the preset's z steps, without a memory cap or an asked chunk size: the runs
    that compare across commits."""
    command = r.get("command") or ""
    return not any(flag in command for flag in ("--steps", "--memory-cap-gib", "--chunk-tokens"))


def plot_over_commits(records: list[dict], path) -> None:
    """Before/after: per model, the measured fast runs' total time (solid) and z (dashed) against
    the number of edits, one colour per commit in date order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, dict[str, list]] = {}
    for r in records:
        if (r["kind"] == "profile_run" and r["name"] == "apply" and r["metric"] == "time" and r.get("provider") == "memit_fast"
                and not r["extrapolated"] and _default_conditions(r)):
            runs.setdefault(r.get("model") or "?", {}).setdefault(r["commit"][:7], []).append(r)
    if not runs:
        raise SystemExit("no profile runs to plot")
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.6), squeeze=False)
    for ax, (model, by_commit) in zip(axes.flat, sorted(runs.items())):
        for i, (commit, totals) in enumerate(sorted(by_commit.items(), key=lambda kv: min(r["date"] for r in kv[1]))):
            totals = sorted({t["n_edits"]: t for t in totals}.values(), key=lambda t: t["n_edits"])
            colour = plt.get_cmap("viridis")(i / max(len(by_commit) - 1, 1))
            ax.plot([t["n_edits"] for t in totals], [t["value"] for t in totals], "-o", color=colour, lw=2,
                    label=f"{commit} ({min(t['date'] for t in totals)[:10]})")
            z = [(t["n_edits"], _phase([x for x in records if x["run_id"] == t["run_id"] and x.get("n_edits") == t["n_edits"]
                                         and x.get("provider") == "memit_fast"], "z", "time", t["params"]["status"])) for t in totals]
            z = [(n, r["value"]) for n, r in z if r]
            if z:
                ax.plot(*zip(*z), "--", color=colour, lw=1)
        ax.set(xscale="log", yscale="log", xlabel="edits", ylabel="seconds (solid: total, dashed: z)", title=f"{model}, fast mode, by commit")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", nargs="+", default=[str(results_store.DEFAULT_PATH)], help="records files")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="directory for results.md, results.png and results_over_commits.png")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    records = [r for f in args.records for r in results_store.load(f)]
    if not records:
        print("no records", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = tables(records)
    (out / "results.md").write_text("# Benchmark results\n\nGenerated by `python benchmarks/plot_results.py` from "
                                    "`records.jsonl`; do not edit by hand.\n\n" + text + "\n")
    print(text)
    if not args.no_plot:
        try:
            plot(records, out / "results.png")
            plot_over_commits(records, out / "results_over_commits.png")
        except ImportError:
            print("matplotlib is not installed: tables only", file=sys.stderr)
            return 0
        print(f"wrote {out / 'results.md'}, {out / 'results.png'} and {out / 'results_over_commits.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
