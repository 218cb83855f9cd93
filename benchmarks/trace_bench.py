"""Speed of causal tracing (memit_fast.trace) at full model shapes with random weights, and the
records of a `memit-fast trace` run.

    python -m benchmarks.trace_bench --model gpt-j-6b --facts 100 --data .device/data/known_1000.json \
        --tokenizer .device/tokenizer --records OUT/records.jsonl
    python -m benchmarks.trace_bench --from-trace OUT/trace/trace.json --records OUT/records.jsonl

Fast mode: facts/s over the first --facts known facts (each traced on the model's own
prediction: 3 kinds x layers x tokens restorations, --samples noise samples each, every one run
from its first changed block and token over the corrupted run's cached keys and values). In the
same run, the original notebook's structure (one forward of 1 clean + samples noisy rows per restoration) is timed on
--reference-forwards restorations of the first facts and extrapolated to whole facts (every
kind, layer and token of the fast run's facts, plus the clean and corrupted runs): those records
say extrapolated. --tiny: the same on a tiny model of the same architecture (CPU check).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import results_store, synthetic  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def speed(args) -> list[dict]:
    from memit_fast.model_access import model_device
    from memit_fast.presets import for_model
    from memit_fast.trace import KINDS, _noise, _prepare, _reference_run, _window, causal_trace, noise_std_of, read_facts

    tok = synthetic.load_tokenizer(args.tokenizer, fallback_ok=args.tiny)
    if args.tiny:  # the tiny shapes with the fallback tokenizer's vocabulary: a quick CPU check
        from transformers import AutoModelForCausalLM

        config = synthetic.make_config(args.model, tiny=True)
        config.vocab_size = len(tok)
        torch.manual_seed(0)
        model, build_s = AutoModelForCausalLM.from_config(config).eval(), 0.0
    else:
        model, build_s = synthetic.build_model(args.model)
    hp = for_model(model)
    facts = read_facts(json.loads(Path(args.data).read_text()))[: args.facts]
    ctx = results_store.context("trace_bench")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    common = dict(model=args.model + (" (tiny)" if args.tiny else ""), dtype=dtype, provider="memit_fast")
    settings = dict(samples=args.samples, window=10, answer="model", progress=False)
    prepared, _ = _prepare(tok, facts)
    std = 3.0 * noise_std_of(model, prepared)  # over all the facts, as one causal_trace call would
    causal_trace(model, tok, facts[:1], hp, noise_std=std, **settings)  # warm-up
    _sync()
    # blocks of 16 facts until --max-seconds: facts/s over the blocks done
    traces, seconds = [], 0.0
    for i in range(0, len(facts), 16):
        if args.max_seconds is not None and seconds > args.max_seconds:
            break
        block = causal_trace(model, tok, facts[i:i + 16], hp, noise_std=std, **settings)
        traces += block.traces
        seconds += block.seconds
    n = len(traces)
    if not n:
        raise SystemExit("no fact was traced")
    fast = n / seconds
    L = block.n_layers
    tokens = sum(len(t.tokens) for t in traces) / n
    print(f"fast: {n} facts in {seconds:.2f} s = {fast:.3g} facts/s ({args.model}, {dtype}, {L} layers, "
          f"{tokens:.1f} tokens a fact, {args.samples} samples; model built in {build_s:.1f} s)")
    records = [results_store.make("trace", f"causal trace fast {args.model}", "facts_per_s", fast, "facts/s", ctx, n_edits=n,
                                  params={"facts": n, "seconds": seconds, "samples": args.samples, "layers": L,
                                          "mean_tokens": tokens}, **common)]
    # the original structure: time some restorations of the first facts, extrapolate to whole facts
    prepared = prepared[:4]
    device = model_device(model)
    templates = {"hidden": hp.layer_module_tmp, "mlp": hp.mlp_module_tmp, "attn": hp.attn_module_tmp}
    jobs = []
    rng = random.Random(0)
    for p in prepared:
        for kind in KINDS:
            for layer in range(L):
                for t in range(len(p.ids)):
                    jobs.append((p, kind, layer, t))
    jobs = rng.sample(jobs, min(args.reference_forwards, len(jobs)))
    d = model.get_input_embeddings().weight.shape[1]
    _reference_run(model, torch.tensor([prepared[0].ids], device=device), prepared[0].subject,
                   _noise(prepared[0], args.samples, d, std, 0).to(device), [], 0)  # warm-up
    _sync()
    t0 = time.perf_counter()
    for p, kind, layer, t in jobs:
        names = [templates[kind].format(layer)] if kind == "hidden" else [templates[kind].format(j) for j in range(*_window(layer, 10, L))]
        _reference_run(model, torch.tensor([p.ids], device=device), p.subject, _noise(p, args.samples, d, std, 0).to(device),
                       [(name, t) for name in names], 0)
    _sync()
    per_forward = (time.perf_counter() - t0) / len(jobs)
    forwards_per_fact = 3 * L * tokens + 2  # every kind, layer and token; the clean and corrupted runs
    reference = 1 / (per_forward * forwards_per_fact)
    print(f"reference (one restoration per forward): {per_forward * 1e3:.2f} ms a forward over {len(jobs)} forwards, "
          f"{forwards_per_fact:.0f} forwards a fact -> {reference:.3g} facts/s (extrapolated); fast is {fast / reference:.1f}x")
    note = f"{len(jobs)} restorations timed, {per_forward * 1e3:.2f} ms each, x {forwards_per_fact:.0f} forwards per fact"
    records.append(results_store.make("trace", f"causal trace reference {args.model}", "facts_per_s", reference, "facts/s", ctx,
                                      extrapolated=True, note=note, params={"forwards_timed": len(jobs), "s_per_forward": per_forward},
                                      **(common | {"provider": "original structure"})))
    records.append(results_store.make("trace", f"causal trace fast/reference {args.model}", "speedup", fast / reference, "x", ctx,
                                      extrapolated=True, note="the reference side is extrapolated", **common))
    return records


def from_trace(path: str, command: str | None = None, commit: str | None = None) -> list[dict]:
    """Records of a `memit-fast trace --out DIR` run: facts/s, the effects, the suggested layers."""
    doc = json.loads(Path(path).read_text())
    s = doc["summary"]
    ctx = results_store.context("trace", command=command or f"memit-fast trace (see {Path(path).parent.name})")
    ctx["commit"] = commit or ctx["commit"]
    params = {k: s.get(k) for k in ("facts_skipped", "noise_std", "suggested_layers", "preset_layers")} | {"settings": s["settings"]}
    name = f"causal trace {Path(path).parent.name}"
    out = [results_store.make("trace", name, "facts_per_s", s["facts_traced"] / max(s["seconds"], 1e-9), "facts/s", ctx,
                              n_edits=s["facts_traced"], params=params),
           results_store.make("trace", name, "average_total_effect", s["average_total_effect"], "probability", ctx, params=params)]
    aie = s["average_indirect_effect"]["mlp"][s["token_groups"].index("last subject token")]
    out.append(results_store.make("trace", name, "max_mlp_aie_last_subject_token", max(aie), "probability", ctx, params=params))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt-j-6b", choices=synthetic.MODELS)
    p.add_argument("--tiny", action="store_true", help="the tiny model of the same architecture (CPU check)")
    p.add_argument("--facts", type=int, default=100)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--data", default=".device/data/known_1000.json")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--max-seconds", type=float, default=None, help="start no block of 16 facts after this (facts/s over the blocks done)")
    p.add_argument("--reference-forwards", type=int, default=60, help="restorations timed in the original structure")
    p.add_argument("--from-trace", metavar="TRACE_JSON", help="record a `memit-fast trace` run instead")
    p.add_argument("--command", default=None, help="with --from-trace: the command of that run")
    p.add_argument("--commit", default=None, help="with --from-trace: the commit of that run (default: this checkout's)")
    p.add_argument("--records", default=None, help="append the records to this JSON-lines file")
    args = p.parse_args(argv)
    records = from_trace(args.from_trace, args.command, args.commit) if args.from_trace else speed(args)
    if args.records:
        results_store.append(records, args.records)
    for r in records:
        print(f"{r['name']}: {r['metric']} = {r['value']:.4g} {r['unit']}" + (" (extrapolated)" if r["extrapolated"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
