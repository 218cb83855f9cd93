"""Metrics from per-record results, and the before/after report (Markdown and JSON).

Each metric is a mean over records of a per-record value, reported x100 with its standard
error (sample std / sqrt(n)), as the original `summarize.py` (which reports the std instead).

CounterFact (nll_*: mean per-token NLL from `counterfact.evaluate_counterfact`; a record's value
is the mean over its prompts of that set):

    ES = [nll_true > nll_new] on the rewrite prompt     (P(new) > P(true))
    PS = [nll_true > nll_new] on the paraphrase prompts
    NS = [nll_true < nll_new] on the neighbourhood prompts
    EM, PM = exp(-nll_new) - exp(-nll_true);  NM = exp(-nll_true) - exp(-nll_new)
    ES_acc, PS_acc = every token of target_new is the argmax;  NS_acc = the same for target_true
    S  = harmonic mean of ES, PS, NS;  GE = mean of the records' weighted n-gram entropies

zsRE: efficacy, paraphrase, specificity = mean over the answer's tokens of the argmax hits;
S = harmonic mean of the three.
"""

from __future__ import annotations

import json
import math
from typing import Callable, Sequence

CF_LABELS = {
    "S": "Score S (hmean ES, PS, NS)",
    "ES": "Efficacy ES: P(new) > P(true)",
    "PS": "Generalisation PS (paraphrases)",
    "NS": "Specificity NS (neighbours keep true)",
    "EM": "Efficacy magnitude EM: P(new) - P(true)",
    "PM": "Paraphrase magnitude PM",
    "NM": "Neighbourhood magnitude NM: P(true) - P(new)",
    "ES_acc": "Rewrite accuracy (new is argmax)",
    "PS_acc": "Paraphrase accuracy (new is argmax)",
    "NS_acc": "Neighbourhood accuracy (true is argmax)",
    "GE": "Fluency GE (n-gram entropy x100)",
}
ZSRE_LABELS = {
    "S": "Score S (hmean of the three)",
    "efficacy": "Efficacy (token accuracy)",
    "paraphrase": "Paraphrase (token accuracy)",
    "specificity": "Specificity (token accuracy)",
}


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def metric(values: Sequence[float], scale: float = 100.0) -> dict:
    """{"mean", "se", "n"} of scale * values; se is None below two values."""
    n = len(values)
    m = mean(values)
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    return {"mean": scale * m, "se": None if se is None else scale * se, "n": n}


def harmonic_mean(xs: Sequence[float]) -> float:
    """n / sum(1/x); 0 when any x is 0 (the limit)."""
    return 0.0 if any(x <= 0 for x in xs) else len(xs) / sum(1.0 / x for x in xs)


def _per_record(results, fn: Callable[[dict], list[float]]) -> list[float]:
    return [mean(fn(r)) for r in results]


def counterfact_metrics(results: Sequence[dict]) -> dict:
    """Metrics (x100, with standard errors) from `evaluate_counterfact` results."""

    def gt(name, a, b):
        return lambda r: [float(x > y) for x, y in zip(r[name][a], r[name][b])]

    def pdiff(name, a, b):
        return lambda r: [math.exp(-x) - math.exp(-y) for x, y in zip(r[name][a], r[name][b])]

    def acc(name, key):
        return lambda r: [float(x) for x in r[name][key]]

    out = {
        "ES": metric(_per_record(results, gt("rewrite", "nll_true", "nll_new"))),
        "PS": metric(_per_record(results, gt("paraphrase", "nll_true", "nll_new"))),
        "NS": metric(_per_record(results, gt("neighborhood", "nll_new", "nll_true"))),
        "EM": metric(_per_record(results, pdiff("rewrite", "nll_new", "nll_true"))),
        "PM": metric(_per_record(results, pdiff("paraphrase", "nll_new", "nll_true"))),
        "NM": metric(_per_record(results, pdiff("neighborhood", "nll_true", "nll_new"))),
        "ES_acc": metric(_per_record(results, acc("rewrite", "new_argmax"))),
        "PS_acc": metric(_per_record(results, acc("paraphrase", "new_argmax"))),
        "NS_acc": metric(_per_record(results, acc("neighborhood", "true_argmax"))),
    }
    if all("ngram_entropy" in r for r in results):
        out["GE"] = metric([r["ngram_entropy"] for r in results])
    out = {"S": _score(out, ("ES", "PS", "NS"))} | out
    return out


def zsre_metrics(results: Sequence[dict]) -> dict:
    """Metrics (x100, with standard errors) from `evaluate_zsre` results."""
    out = {
        name: metric(_per_record(results, lambda r, name=name: [float(x) for x in r[name]]))
        for name in ("efficacy", "paraphrase", "specificity")
    }
    return {"S": _score(out, tuple(out))} | out


def _score(metrics: dict, names) -> dict:
    hm = harmonic_mean([metrics[k]["mean"] for k in names])
    return {"mean": hm, "se": None, "n": metrics[names[0]]["n"]}


def _cell(m: dict | None) -> str:
    if m is None:
        return "-"
    return f"{m['mean']:.1f}" if m["se"] is None else f"{m['mean']:.1f} ± {m['se']:.1f}"


def markdown_table(labels: dict, before: dict | None, after: dict | None) -> str:
    """A Markdown table: one row per metric, columns unedited / edited (mean ± s.e., x100)."""
    lines = ["| metric | unedited | edited |", "| --- | ---: | ---: |"]
    for key, label in labels.items():
        b = (before or {}).get(key)
        a = (after or {}).get(key)
        if b is None and a is None:
            continue
        lines.append(f"| {label} | {_cell(b)} | {_cell(a)} |")
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    """The whole report of a `run.run_evaluation` result: conditions, table, timings."""
    labels = CF_LABELS if result["kind"] == "counterfact" else ZSRE_LABELS
    before = (result.get("before") or {}).get("metrics")
    after = (result.get("after") or {}).get("metrics")
    meta = result.get("meta", {})
    lines = [f"## {result['kind']}: {result['n_records']} records, {result['mode']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", markdown_table(labels, before, after), "", "Times (s):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in result["timing_s"].items() if isinstance(v, (int, float))]
    return "\n".join(lines) + "\n"


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
