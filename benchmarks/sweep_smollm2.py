"""How the SmolLM2-135M preset was chosen: CounterFact ES/PS/NS after editing N records at once,
for several critical-layer ranges and lambdas (statistics computed once per layer range).

    python -m benchmarks.sweep_smollm2 --data counterfact_250.json --corpus wikitext.txt --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import memit_fast
from memit_fast.eval import counterfact_metrics, evaluate_counterfact

GRID = [  # (layers, lambda)
    ([4, 5, 6, 7, 8], 1000),
    ([4, 5, 6, 7, 8], 2000),
    ([4, 5, 6, 7, 8], 5000),
    ([4, 5, 6, 7, 8], 15000),
    ([2, 3, 4, 5, 6], 2000),
    ([6, 7, 8, 9, 10], 2000),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--corpus", required=True, help="statistics corpus (text file, one document per line, or 'model')")
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--edits", type=int, default=250)
    p.add_argument("--cache-dir")
    p.add_argument("--out", required=True)
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
    with open(args.out, "w") as f:
        json.dump({"edits": len(records), "corpus": args.corpus, "n_samples": args.n_samples, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
