"""The `memit-fast` command: demo, stats, edit, eval, info.

Benchmarks run from a checkout: `python -m benchmarks.profile_edits` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

DEMO_FACTS = [
    {
        "request": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}},
        "paraphrase": "The Eiffel Tower, which towers over the river Seine, is in the city of",
        "neighbour": "The Louvre is located in the city of",
    },
    {
        "request": {"prompt": "The capital of {} is", "subject": "Japan", "target_new": {"str": "Kyoto"}},
        "paraphrase": "Japan's capital city is",
        "neighbour": "The capital of France is",
    },
    {
        "request": {"prompt": "{} is famous for the theory of", "subject": "Albert Einstein", "target_new": {"str": "evolution"}},
        "paraphrase": "Albert Einstein is best known for his theory of",
        "neighbour": "Isaac Newton is famous for the theory of",
    },
]


def _load_model(args):
    import torch

    from .default_model import load_default_model

    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    if getattr(args, "model", None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype or "auto").to(device).eval()
        return model, AutoTokenizer.from_pretrained(args.model)
    return load_default_model(device=args.device, dtype=dtype)


def _hparams(args, model):
    from .hparams import MEMITHyperParams
    from .presets import for_model

    hp = MEMITHyperParams.from_json(args.hparams) if getattr(args, "hparams", None) else for_model(model)
    if getattr(args, "n_samples", None):
        hp = hp.replace(mom2_n_samples=args.n_samples)
    return hp


def _top(model, tok, prompt: str, k: int = 1) -> list[tuple[str, float]]:
    import torch

    from .model_access import model_device

    with torch.no_grad():
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(model_device(model))
        probs = model(input_ids=ids).logits[0, -1].float().softmax(-1)
    p, i = probs.topk(k)
    return [(tok.decode(int(t)), float(q)) for t, q in zip(i, p)]


def cmd_demo(args) -> int:
    from .api import apply, restore

    model, tok = _load_model(args)
    hp = _hparams(args, model)
    facts = DEMO_FACTS
    rows = []
    for fact in facts:
        req = fact["request"]
        for kind, prompt in (("prompt", req["prompt"].replace("{}", req["subject"])), ("paraphrase", fact["paraphrase"]), ("neighbour", fact["neighbour"])):
            rows.append((req["target_new"]["str"], kind, prompt, _top(model, tok, prompt)[0]))
    start = time.perf_counter()
    _, orig = apply(model, tok, [f["request"] for f in facts], hp, corpus=args.corpus, return_orig_weights=True, progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(f"\nEdited {len(facts)} facts into {model.config.model_type} layers {hp.layers} in {seconds:.1f} s "
          f"(statistics included when not cached).\n")
    print(f"{'new target':12s} {'prompt kind':11s} {'before':>18s} {'after':>18s}  prompt")
    for target, kind, prompt, (before, p_before) in rows:
        after, p_after = _top(model, tok, prompt)[0]
        print(f"{target:12s} {kind:11s} {before!r:>11s} {p_before:5.2f} {after!r:>11s} {p_after:5.2f}  {prompt}")
    if args.restore:
        restore(model, orig)
    return 0


def cmd_stats(args) -> int:
    from .stats import compute_stats, default_cache_dir

    model, tok = _load_model(args)
    hp = _hparams(args, model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    start = time.perf_counter()
    stats = compute_stats(model, tok, hp, layers, corpus=args.corpus, max_length=args.max_length, cache_dir=args.cache_dir, progress=not args.quiet)
    print(f"statistics for layers {sorted(stats)} in {time.perf_counter() - start:.1f} s, cache: {args.cache_dir or default_cache_dir()}")
    for layer, s in stats.items():
        print(f"layer {layer}: {s.count} tokens, C {tuple(s.mom2.shape)} {s.mom2.dtype}, trace {float(s.mom2.diagonal().sum()):.4g}")
    return 0


def cmd_edit(args) -> int:
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from .api import apply

    with open(args.requests) as f:
        requests = json.load(f)
    if args.limit:
        requests = requests[: args.limit]
    model, tok = _load_model(args)
    hp = _hparams(args, model)
    start = time.perf_counter()
    _, orig = apply(model, tok, requests, hp, mode=args.mode, corpus=args.corpus, cache_dir=args.cache_dir, return_orig_weights=True, progress=not args.quiet)
    print(f"edited {len(requests)} facts into layers {hp.layers} in {time.perf_counter() - start:.1f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.save == "model":
        model.save_pretrained(out)
        tok.save_pretrained(out)
    else:
        params = dict(model.named_parameters())
        deltas = {name: (params[name].detach().float().cpu() - w.float()).contiguous() for name, w in orig.items()}
        save_file(deltas, out / "deltas.safetensors", metadata={"hparams": json.dumps(hp.to_dict()), "n_requests": str(len(requests))})
    print(f"saved the {'edited model' if args.save == 'model' else 'weight deltas'} to {out}")
    return 0


def cmd_info(args) -> int:
    from .__main__ import main as info

    info()
    return 0


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", help="HF model directory (default: SmolLM2-135M, the default model)")
        p.add_argument("--hparams", help="MEMIT hyper-parameters JSON in the original format (default: preset)")
        p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--corpus", help="statistics corpus: a text file (one document per line), 'model' (sampled), or a dataset name")
    p.add_argument("--n-samples", type=int, help="statistics documents (default: the hparams' mom2_n_samples)")
    p.add_argument("--cache-dir", help="statistics cache (default: $MEMIT_FAST_CACHE or ~/.cache/memit_fast)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="memit-fast", description="Mass-edit facts in a transformer LM with MEMIT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="edit a few well-known facts of the default model and show before/after")
    _common(p)
    p.add_argument("--restore", action="store_true", help="restore the weights at the end")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("stats", help="compute (or load) the covariance statistics of the critical layers")
    _common(p)
    p.add_argument("--layers", help="comma-separated layers (default: the hparams' layers)")
    p.add_argument("--max-length", type=int, help="tokens per document (default: min(context, 1024))")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("edit", help="apply requests from a JSON file and save the edited model or the deltas")
    _common(p)
    p.add_argument("--requests", required=True, help="JSON list of requests or CounterFact records")
    p.add_argument("--limit", type=int, help="only the first N requests")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--save", choices=["deltas", "model"], default="deltas")
    p.add_argument("--mode", choices=["fast", "reference"], default="fast")
    p.set_defaults(func=cmd_edit)

    from .eval import cli as eval_cli

    p = sub.add_parser("eval", help="edit the first N CounterFact or zsRE records and report the metrics before and after")
    eval_cli.add_arguments(p)
    p.set_defaults(func=eval_cli.run)

    p = sub.add_parser("info", help="versions, device, native module status")
    p.set_defaults(func=cmd_info)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
