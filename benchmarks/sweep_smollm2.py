"""How the SmolLM2-135M preset was chosen: CounterFact ES/PS/NS after editing N records at once,
for several critical-layer ranges and lambdas (statistics computed once per layer range).

    python -m benchmarks.sweep_smollm2 --data counterfact_250.json --corpus wikitext.txt [--records FILE]

Appends records (benchmarks/results_store.py, `sweep_records`) to FILE (default
benchmarks/results/records.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import memit_fast
from memit_fast.eval import counterfact_metrics, evaluate_counterfact

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_store  # noqa: E402

GRID = [  # (layers, lambda)
    ([4, 5, 6, 7, 8], 1000),
    ([4, 5, 6, 7, 8], 2000),
    ([4, 5, 6, 7, 8], 5000),
    ([4, 5, 6, 7, 8], 15000),
    ([2, 3, 4, 5, 6], 2000),
    ([6, 7, 8, 9, 10], 2000),
]


def sweep_records(doc: dict, ctx: dict) -> list[dict]:
    """Records of a sweep: kind sweep, one name per grid point ("layers 4..8, lambda 2000"; "unedited"),
    each CounterFact metric [%] and the edit time [s]; layers, lambda, corpus and sample count in params."""
    out = []
    for row in doc["rows"]:
        layers = row.get("layers")
        name = f"layers {layers[0]}..{layers[-1]}, lambda {row['lambda']}" if layers else row.get("config", "unedited")
        kw = dict(provider="memit_fast" if layers else "unedited", model=doc.get("model", "SmolLM2-135M"), n_edits=doc["edits"],
                  params={"layers": layers, "lambda": row.get("lambda"), "corpus": doc["corpus"], "n_samples": doc["n_samples"]})
        for metric, value in row.items():
            if metric in ("layers", "lambda", "config"):
                continue
            out.append(results_store.make("sweep", name, "time" if metric == "edit_s" else metric, value, "s" if metric == "edit_s" else "%",
                                          ctx, **kw))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--corpus", required=True, help="statistics corpus (text file, one document per line, or 'model')")
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--edits", type=int, default=250)
    p.add_argument("--cache-dir")
    p.add_argument("--records", default=str(results_store.DEFAULT_PATH))
    args = p.parse_args(argv)
    records = json.load(open(args.data))[: args.edits]
    model, tok = memit_fast.load_default_model()
    base = memit_fast.presets.for_model(model).replace(mom2_n_samples=args.n_samples)
    metrics = lambda: {k: round(v["mean"], 1) for k, v in counterfact_metrics(evaluate_counterfact(model, tok, records, fluency=False, batch_size=256)).items()}  # noqa: E731
    rows = [{"config": "unedited", **metrics()}]
    print(rows[-1], flush=True)
    for layers, lam in GRID:
        hp = base.replace(layers=layers, mom2_update_weight=lam)
        start = time.perf_counter()
        _, orig = memit_fast.apply(model, tok, records, hp, corpus=args.corpus, cache_dir=args.cache_dir, return_orig_weights=True, progress=False)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        rows.append({"layers": layers, "lambda": lam, "edit_s": round(time.perf_counter() - start, 1), **metrics()})
        memit_fast.restore(model, orig)
        print(rows[-1], flush=True)
    doc = {"edits": len(records), "corpus": args.corpus, "n_samples": args.n_samples, "rows": rows}
    ctx = results_store.context("sweep_smollm2", "python -m benchmarks.sweep_smollm2 " + " ".join(sys.argv[1:]))
    n = results_store.append(sweep_records(doc, ctx), args.records)
    print(f"appended {n} records to {args.records}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
