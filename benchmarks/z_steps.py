"""How many z steps requests take on a trained model (the default model unless --model): the mean
and the histogram of the Adam steps before each request's stop rule, all records at once.
Random-weight benchmarks never stop early; this is what a real model does.

    python -m benchmarks.z_steps --data ../shared/data/counterfact_250.json --records OUT.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import results_store  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="CounterFact records (original format)")
    ap.add_argument("--limit", type=int, default=None, help="first N records (default: all)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--records", default=str(results_store.DEFAULT_PATH))
    args = ap.parse_args(argv)

    import memit_fast
    from memit_fast.edit_requests import normalize_requests
    from memit_fast.targets import compute_targets
    from memit_fast.templates import flatten, generate_context_templates
    from memit_fast.tokens import encode_requests

    model, tok = memit_fast.load_default_model(device=args.device)
    hp = memit_fast.presets.for_model(model)
    records = json.loads(Path(args.data).read_text())[: args.limit]
    reqs = normalize_requests(records)
    model.requires_grad_(False)
    templates = generate_context_templates(model, tok, seed=0)
    enc = encode_requests(tok, reqs, flatten(templates), hp.fact_token)
    steps = torch.zeros(len(enc), dtype=torch.long)
    t0 = time.perf_counter()
    compute_targets(model, tok, enc, hp, progress=False, steps_out=steps)
    seconds = time.perf_counter() - t0
    hist = dict(sorted(Counter(steps.tolist()).items()))
    mean = float(steps.double().mean())
    print(f"{len(enc)} requests, {hp.v_num_grad_steps} steps at most: mean {mean:.2f} Adam steps; z took {seconds:.1f} s")
    print("steps: requests  " + "  ".join(f"{k}: {v}" for k, v in hist.items()))
    ctx = results_store.context("z steps default model", "python -m benchmarks.z_steps " + " ".join(sys.argv[1:] if argv is None else argv))
    common = dict(provider="memit_fast", model="SmolLM2-135M (default)", dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                  n_edits=len(enc), params={"histogram": hist, "max_steps": hp.v_num_grad_steps, "data": Path(args.data).name, "z_seconds": round(seconds, 2)})
    results_store.append([results_store.make("profile_run", "z steps", "mean", round(mean, 3), "steps", ctx, **common)], args.records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
