"""Pictures of a causal trace (docs/tracing.md, "Reading the figures"): per fact, the probability
of the answer after each restoration (token x layer, one panel per kind); over all facts, the
average indirect effect by token group. Needs matplotlib (pip install 'memit_fast[plots]').

    python -m memit_fast.trace_plot OUT/trace.json      # redraw the figures of a saved trace
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import MemitError

TITLES = {"hidden": "block output restored", "mlp": "MLP output restored (window)", "attn": "attention output restored (window)"}
CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MemitError("the trace figures need matplotlib: pip install 'memit_fast[plots]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raise MemitError now when matplotlib is missing (before any model work)."""
    _pyplot()


def _panels(plt, n: int, rows: int, cols: int):
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1.5, 0.9 + 0.32 * rows + 0.05 * cols), squeeze=False, constrained_layout=True)
    return fig, axes[0]


def plot_fact(fact: dict, path, window: int | None = None) -> None:
    """One fact's trace (a FactTrace.to_dict()): p(answer) per (token, layer), one panel per kind;
    subject tokens are starred."""
    import numpy as np

    plt = _pyplot()
    kinds = list(fact["scores"])
    a, b = fact["subject_tokens"]
    labels = [repr(t)[1:-1] + (" *" if a <= i < b else "") for i, t in enumerate(fact["tokens"])]
    T, L = len(labels), len(fact["scores"][kinds[0]][0])
    fig, axes = _panels(plt, len(kinds), T, L)
    for ax, kind in zip(axes, kinds):
        im = ax.imshow(np.array(fact["scores"][kind]), cmap=CMAPS[kind], aspect="auto", vmin=min(fact["p_corrupted"], 0.0))
        ax.set_yticks(range(T), labels, fontsize=8)
        ax.set_xticks(range(0, L, max(1, L // 10)))
        ax.set_xlabel("layer" + (f" (centre of a {window}-layer window)" if window and kind != "hidden" else ""))
        ax.set_title(TITLES[kind], fontsize=10)
        fig.colorbar(im, ax=ax, label=f"p({fact['answer_token']!r})")
    fig.suptitle(f"{fact['prompt']}  ->  {fact['answer_token']!r}   clean p={fact['p_clean']:.3f}, corrupted p={fact['p_corrupted']:.3f}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_average(summary: dict, path, title: str = "") -> None:
    """The average indirect effect (token group x layer) of each kind, from TraceResult.summary()."""
    import numpy as np

    plt = _pyplot()
    aie = summary["average_indirect_effect"]
    groups = summary["token_groups"]
    kinds = list(aie)
    L = len(aie[kinds[0]][0])
    window = summary["settings"].get("window")
    fig, axes = _panels(plt, len(kinds), len(groups) + 4, L)
    for ax, kind in zip(axes, kinds):
        im = ax.imshow(np.array(aie[kind]), cmap=CMAPS[kind], aspect="auto")
        ax.set_yticks(range(len(groups)), groups, fontsize=8)
        ax.set_xticks(range(0, L, max(1, L // 10)))
        ax.set_xlabel("layer" + (f" (centre of a {window}-layer window)" if window and kind != "hidden" else ""))
        ax.set_title(TITLES[kind], fontsize=10)
        fig.colorbar(im, ax=ax, label="average indirect effect")
    n = summary["facts_traced"]
    fig.suptitle(title or f"average indirect effect over {n} facts (average total effect {summary['average_total_effect']:.3f})", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trace(doc: dict, out, fact_plots: int = 10) -> list[Path]:
    """average.png and facts/NNNN.png for the first `fact_plots` facts of a TraceResult.to_dict()
    into the directory `out`; returns the paths written."""
    out = Path(out)
    written = [out / "average.png"]
    plot_average(doc["summary"], written[0])
    if fact_plots and doc["facts"]:
        (out / "facts").mkdir(exist_ok=True)
        for fact in doc["facts"][:fact_plots]:
            written.append(out / "facts" / f"{fact['index']:04d}.png")
            plot_fact(fact, written[-1], doc["summary"]["settings"].get("window"))
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m memit_fast.trace_plot OUT/trace.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    for p in plot_trace(json.loads(path.read_text()), path.parent):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
