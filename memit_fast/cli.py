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


def _next_token(model, tok, prompt: str, target: str) -> tuple[str, float, float]:
    """(top-1 next token, its probability, probability of the first token of " " + target)."""
    import torch

    from .model_access import model_device
    from .tokens import encode_target

    with torch.no_grad():
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(model_device(model))
        probs = model(input_ids=ids).logits[0, -1].float().softmax(-1)
    p, i = probs.max(-1)
    return tok.decode(int(i)), float(p), float(probs[encode_target(tok, " " + target)[0]])


def cmd_demo(args) -> int:
    from .api import apply, restore

    model, tok = _load_model(args)
    hp = _hparams(args, model)
    facts, rows = DEMO_FACTS, []
    for fact in facts:
        req = fact["request"]
        target = req["target_new"]["str"]
        for kind, prompt in (("prompt", req["prompt"].replace("{}", req["subject"])), ("paraphrase", fact["paraphrase"]), ("neighbour", fact["neighbour"])):
            rows.append((target, kind, prompt, _next_token(model, tok, prompt, target)))
    start = time.perf_counter()
    _, orig = apply(model, tok, [f["request"] for f in facts], hp, corpus=args.corpus, return_orig_weights=True, progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(f"\nEdited {len(facts)} facts into {model.config.model_type} layers {hp.layers} in {seconds:.1f} s "
          f"(statistics included when not cached).\n")
    print(f"{'new target':11s} {'prompt kind':11s} {'top-1 before':>19s} {'top-1 after':>19s} {'P(new) before -> after':>23s}  prompt")
    for target, kind, prompt, (before, p_before, new_before) in rows:
        after, p_after, new_after = _next_token(model, tok, prompt, target)
        print(f"{target:11s} {kind:11s} {before!r:>13s} {p_before:5.2f} {after!r:>13s} {p_after:5.2f} {new_before:10.3f} -> {new_after:5.3f}  {prompt}")
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
