"""End-to-end profile of memit_fast.apply: time, share and peak GPU memory per phase, fast mode
against the reference mode on the same device, for a model shape and numbers of edits.

    python -m benchmarks.profile_edits --model gpt-j-6b --edits 100,10000,1000 --reference-subset 32 --out DIR
    python -m benchmarks.profile_edits --model gpt-j-6b --edits none --reference-subset 0 --stats --out DIR
    python -m benchmarks.profile_edits --tiny ...          # small configs of the same architectures (CPU check)

Conditions (also written into the JSON): random weights from the model's transformers config
(HF initialisation, built on the device, bf16 on GPU); the published hyper-parameters
(memit_fast.presets.for_model); statistics "cached": a synthetic SPD C per layer passed as
`stats` (no statistics time in the edit runs; `--stats` measures statistics on their own);
fixed context templates (the template sampling is timed once on its own and added as the
"templates" phase); requests from CounterFact records with distinct subjects. Random weights
never reach the early-stop loss, so every request runs all v_num_grad_steps: the worst case for
z; a real model stops many requests earlier.

The reference mode (the original's structure) runs on a subset of the requests; its cost at N
edits is extrapolated: z and "other" linearly per request, keys and values from one layer
measured on up to --reference-keys-requests requests (linear in requests and layers), the
float64 dense solve measured for one layer at the real N (times the number of layers), the
weight update as measured. Every extrapolated figure is marked so in its record and the table.

Results: records (benchmarks/results_store.py; `profile_records` says which) appended to --records
at the end of the run, also when a time limit (SIGINT/SIGTERM) stops it. For the CLI:
`add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import results_store  # noqa: E402
import synthetic  # noqa: E402
from kernels_device import environment as kernel_environment  # noqa: E402
from plot_results import tables  # noqa: E402

PHASES = ["templates", "statistics", "z", "keys and values", "solve", "weight update", "other"]
STATS_TOKENS_ORIGINAL = 44_000_000  # GPT-J, 100,000 Wikipedia documents cut to 2048 tokens (docs/algorithm.md section 4)
CUDA = torch.cuda.is_available()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="gpt-j-6b", choices=synthetic.MODELS, help="model shape (transformers config, random weights)")
    parser.add_argument("--tiny", action="store_true", help="small configs of the same architecture and depth (CPU check)")
    parser.add_argument("--edits", default="100,10000,1000", help="numbers of edits for fast mode, run in this order; 'none' for no edit runs")
    parser.add_argument("--reference-subset", type=int, default=32, help="requests run in reference mode (0: no reference)")
    parser.add_argument("--reference-keys-requests", type=int, default=1000, help="requests for the one-layer reference key/value timing")
    parser.add_argument("--no-reference-solve", action="store_true", help="extrapolate the reference solve by its flop count instead of measuring it at N")
    parser.add_argument("--stats", action="store_true", help="also benchmark compute_stats: fused pass vs one pass per layer")
    parser.add_argument("--stats-tokens", type=int, default=1_000_000, help="corpus slice for the fused statistics pass")
    parser.add_argument("--stats-tokens-per-layer", type=int, default=250_000, help="corpus slice for one pass per layer")
    parser.add_argument("--stats-max-length", type=int, default=None, help="tokens per document (default: the model's context, at most 2048)")
    parser.add_argument("--stats-doc-length", type=int, default=None, help="fixed document length (default: a Wikipedia-like mix, mean ~440)")
    parser.add_argument("--data", default=None, help="CounterFact json (default .device/data/counterfact_250.json or shared/data/...)")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default .device/tokenizer)")
    parser.add_argument("--records", default=str(results_store.DEFAULT_PATH), help="records file to append the results to")
    parser.add_argument("--tag", default="", help="a label for this run (in the records' run_id)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for this whole run: later steps are skipped when predicted not to fit")
    parser.add_argument("--steps", type=int, default=None, help="v_num_grad_steps (default: the published value)")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="passed to apply (default: the core's choice from free memory)")
    parser.add_argument("--memory-cap-gib", type=float, default=None, help="passed to apply (EditConfig.memory_cap_gib; default: no cap)")
    parser.add_argument("--stats-device", choices=["cpu", "model"], default="cpu",
                        help="where the synthetic statistics live: cpu (default), as load_stats returns cached ones; model: on its device")
    parser.add_argument("--solve-method", default="auto", help="passed to apply in fast mode")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="model dtype (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--torch-profile", default=None, metavar="DIR", help="torch.profiler trace (gzip) and op table of one small fast run")
    parser.add_argument("--torch-profile-edits", type=int, default=8)
    parser.add_argument("--torch-profile-steps", type=int, default=5, help="z steps in the traced run (keeps the trace small)")
    parser.add_argument("--nvtx", action="store_true", help="NVTX ranges per phase (for nsys)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser


class Profiler:
    def __init__(self, args):
        self.args = args
        self.t_start = time.perf_counter()
        self.doc: dict = {"environment": {}, "conditions": {}, "runs": [], "ratios": [], "stats": None, "events": []}
        self.name = f"profile {args.model}{' tiny' if args.tiny else ''}{(' ' + args.tag) if args.tag else ''}"

    # ---- bookkeeping ----
    def left(self) -> float:
        return math.inf if self.args.budget is None else self.args.budget - (time.perf_counter() - self.t_start)

    def event(self, step: str, status: str, seconds: float = 0.0, **info):
        e = {"step": step, "status": status, "seconds": round(seconds, 3), "at_s": round(time.perf_counter() - self.t_start, 1), **info}
        self.doc["events"].append(e)
        print(f"[profile] {step}: {status} ({seconds:.1f} s){' ' + info.get('reason', '') if info.get('reason') else ''}", flush=True)
        if status == "error":
            print(info.get("error", ""), flush=True)

    def records(self) -> list[dict]:
        ctx = results_store.context(self.name, "python -m benchmarks.profile_edits " + " ".join(sys.argv[1:]))
        env = self.doc["environment"]
        ctx["device"] = env.get("device", ctx["device"])
        ctx["versions"] = {k: env[k] for k in ("python", "torch", "transformers", "triton", "cuda") if env.get(k)} or ctx["versions"]
        return profile_records(self.doc, ctx)

    def step(self, name: str, fn, *, predicted: float | None = None, slack: float = 1.0, min_left: float = 0.0):
        """Run fn() unless predicted (x 1/slack) not to fit the budget; record errors and go on."""
        left = self.left()
        if predicted is not None and predicted > slack * left or left < min_left:
            why = f"predicted {predicted:.0f} s" if predicted is not None else f"needs {min_left:.0f} s"
            self.event(name, "skipped", reason=f"{why}, {left:.0f} s of the budget left")
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
            self.event(name, "ok", time.perf_counter() - t0, **({"predicted_s": round(predicted, 1)} if predicted else {}))
            return out
        except KeyboardInterrupt:  # the device script's time limit (SIGINT): keep what there is, stop
            self.event(name, "interrupted", time.perf_counter() - t0, reason="time limit")
            raise
        except Exception as e:  # noqa: BLE001 - one failing step must not lose the others
            info = {"error": traceback.format_exc()[-3000:]}
            if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
                info["memory"] = memory_now()
            self.event(name, "error", time.perf_counter() - t0, **info)
            return None
        finally:
            cleanup()


def memory_now() -> dict:
    if not CUDA:
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"allocated_gib": gib(torch.cuda.memory_allocated()), "reserved_gib": gib(torch.cuda.memory_reserved()),
            "free_gib": gib(free), "total_gib": gib(total), "max_allocated_gib": gib(torch.cuda.max_memory_allocated())}


def gib(x: float) -> float:
    return round(x / 2**30, 3)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def cleanup():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def environment(model=None) -> dict:
    import transformers

    env = kernel_environment()
    env["transformers"] = transformers.__version__
    env["cuda"] = torch.version.cuda
    if model is not None:
        env["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    return env


# ---- one fast or reference run ----

def run_apply(model, tok, requests, hp, stats, *, mode: str, args, templates_s: float, templates_peak: float, partial: dict | None = None) -> dict:
    import memit_fast
    from memit_fast.profiling import PhaseTimer

    partial_out = partial
    timer = PhaseTimer(nvtx=args.nvtx)
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if CUDA else 0
    kw = dict(chunk_tokens=args.chunk_tokens, solve_method=args.solve_method, memory_cap_gib=args.memory_cap_gib) if mode == "fast" else {}
    t0 = time.perf_counter()
    orig = None
    try:
        _, orig = memit_fast.apply(model, tok, requests, hp, mode=mode, stats=stats, context_templates=synthetic.TEMPLATES,
                                   return_orig_weights=True, timer=timer, progress=not args.no_progress and len(requests) >= 1000, **kw)
        sync()
        wall = time.perf_counter() - t0
    finally:
        partial = timer.totals()
        if partial_out is not None:
            partial_out["phases"] = {k: {"seconds": round(v["seconds"], 3), "peak_gib": round(v["peak_gib"], 3)} for k, v in partial.items()}
        if orig:
            memit_fast.restore(model, orig)
        del orig
    phases = {}
    for name, v in partial.items():
        phases[name] = {"seconds": round(v["seconds"], 4), "peak_gib": round(v["peak_gib"], 3), "calls": v["calls"]}
    timed = sum(v["seconds"] for k, v in partial.items() if k != "templates")
    phases["templates"] = {"seconds": round(templates_s, 4), "peak_gib": round(templates_peak, 3), "calls": 1,
                           "note": "sampling measured once on its own (the runs use fixed templates)"}
    phases["other"] = {"seconds": round(max(wall - timed - partial.get("templates", {}).get("seconds", 0.0), 0.0), 4),
                       "note": "tokenisation, request checks, backup of the original weights"}
    total = wall - partial.get("templates", {}).get("seconds", 0.0) + templates_s
    for v in phases.values():
        v["share"] = round(v["seconds"] / total, 4) if total else None
    peak = max((v.get("peak_gib", 0.0) for v in phases.values()), default=0.0)
    return {"mode": mode, "edits": len(requests), "measured": True, "total_s": round(total, 3), "apply_wall_s": round(wall, 3),
            "edits_per_s": round(len(requests) / total, 3), "phases": phases, "peak_gib": round(peak, 3),
            "baseline_gib": gib(base), "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()) if CUDA else 0.0}


def z_flops(model, tok, requests, hp, n: int) -> dict:
    """The z FLOP model (synthetic.z_work) on a sample of the requests, scaled to n."""
    sample = requests[:: max(1, len(requests) // 300)]
    w = synthetic.z_work(model, tok, sample, hp, synthetic.TEMPLATES)
    scale = n / len(sample)
    return {"flops": w.flops * scale, "suffix_tokens_per_step": round(w.suffix_tokens * scale), "head_positions_per_step": round(w.head_positions * scale)}


# ---- the profile ----

def run(args) -> int:
    prof = Profiler(args)
    interrupted = False
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` sends TERM unless told otherwise
    try:
        _profile(prof, args)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, old)
        ratios(prof)
        prof.doc["wall_s"] = round(time.perf_counter() - prof.t_start, 1)
        records = prof.records()
        results_store.append(records, args.records)
        print("\n" + tables(records), flush=True)
        print(f"[profile] appended {len(records)} records to {args.records}", flush=True)
    errors = [e for e in prof.doc["events"] if e["status"] == "error"]
    return 2 if interrupted else (1 if errors else 0)


def _profile(prof: Profiler, args) -> None:
    import memit_fast
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if CUDA else "cpu"))
    if device.type == "cpu" and args.tiny:
        torch.set_num_threads(1)  # a CPU check on a shared machine: no spinning OpenMP workers
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tok = synthetic.load_tokenizer(args.tokenizer, fallback_ok=args.tiny)
    records = synthetic.load_records(args.data, fallback_ok=args.tiny)
    edits = [] if args.edits.strip().lower() in ("", "none", "0") else [int(x) for x in args.edits.split(",")]

    built = prof.step("build model", lambda: synthetic.build_model(args.model, tiny=args.tiny, device=device, dtype=dtype, seed=args.seed))
    if built is None:
        return
    model, build_s = built
    hp = memit_fast.presets.for_model(model)
    if args.steps:
        hp = hp.replace(v_num_grad_steps=args.steps)
    cfg = model.config
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prof.doc["environment"] = environment(model)
    prof.doc["conditions"] = {
        "model": args.model, "tiny": args.tiny, "config": {k: v for k, v in cfg.to_dict().items() if k in (
            "model_type", "n_embd", "hidden_size", "n_layer", "num_hidden_layers", "n_inner", "intermediate_size", "n_head",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "n_positions", "max_position_embeddings", "rotary_dim")},
        "weights": "random (HF initialisation on the device)", "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()), "model_gib": gib(model_bytes), "model_build_s": round(build_s, 2),
        "hparams": {k: getattr(hp, k) for k in ("layers", "v_loss_layer", "v_num_grad_steps", "v_lr", "mom2_update_weight", "clamp_norm_factor", "v_weight_decay", "kl_factor")},
        "early_stop": "never reached with random weights: every request runs all v_num_grad_steps (worst case for z)",
        "statistics": f"cached: synthetic SPD C (float32, d_ff x d_ff) per layer passed as stats, on the {args.stats_device}"
                      f"{' (as load_stats returns cached statistics)' if args.stats_device == 'cpu' else ''}; no statistics time in edit runs",
        "templates": synthetic.TEMPLATES, "tokenizer": getattr(tok, "name_or_path", "") or "fallback BPE (no tokenizer found)",
        "tokenizer_vocab": len(tok), "requests": "CounterFact prompts and targets, distinct subjects (records' own, then prefixed by another subject's first word)",
        "chunk_tokens": args.chunk_tokens or "core default (from free memory)", "solve_method_fast": args.solve_method,
        "memory_cap_gib": args.memory_cap_gib,
        "z_attention": synthetic.z_attention(model),
    }

    stats = None
    if edits or args.reference_subset:
        def make_stats():
            t0 = time.perf_counter()
            s = synthetic.synthetic_stats(model, hp, seed=args.seed)
            if args.stats_device == "cpu":
                s = {layer: type(v)(v.mom2.cpu(), v.count) for layer, v in s.items()}
            sync()
            prof.doc["conditions"]["stats_gib"] = gib(sum(v.mom2.numel() * v.mom2.element_size() for v in s.values()))
            prof.doc["conditions"]["stats_build_s"] = round(time.perf_counter() - t0, 2)
            return s
        stats = prof.step("synthetic statistics", make_stats)
        if stats is None:
            return
        all_reqs = synthetic.make_requests(records, max(edits + [args.reference_subset, args.reference_keys_requests, 8]), seed=args.seed)
        prof.doc["conditions"]["request_lengths"] = synthetic.request_lengths(tok, all_reqs[: max(edits + [args.reference_subset, 1])])

        # Warm-up: CUDA/cuBLAS/cuSOLVER handles, Triton compiles, allocator; not recorded.
        warm = synthetic.make_requests(records, 8, seed=args.seed + 1)
        prof.step("warm-up (fast, 8 edits)", lambda: run_apply(model, tok, warm, hp.replace(v_num_grad_steps=2), stats, mode="fast",
                                                                   args=args, templates_s=0.0, templates_peak=0.0) and None)
        tmpl = prof.step("template sampling", lambda: time_templates(model, tok, args.seed))
        templates_s, templates_peak = tmpl if tmpl else (0.0, 0.0)
        prof.doc["conditions"]["templates_sampling_s"] = round(templates_s, 3)

    fast_runs: dict[int, dict] = {}

    def fast(n):
        reqs = all_reqs[:n]
        flops = z_flops(model, tok, reqs, hp, n)
        partial: dict = {}
        try:
            r = run_apply(model, tok, reqs, hp, stats, mode="fast", args=args, templates_s=templates_s, templates_peak=templates_peak, partial=partial)
        except BaseException as e:  # keep the phases that finished (a time limit, an OOM) in the results
            prof.doc["runs"].append({"mode": "fast", "edits": n, "measured": False, "failed": type(e).__name__, "total_s": None,
                                     "phases": partial.get("phases", {}), "memory": memory_now(), "z_flop_model": flops})
            raise
        r["z_flop_model"] = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in flops.items()}
        z_s = r["phases"].get("z", {}).get("seconds")
        if z_s:
            r["z_tflops"] = round(flops["flops"] / z_s / 1e12, 2)
        r["request_lengths"] = synthetic.request_lengths(tok, reqs)
        prof.doc["runs"].append(r)
        fast_runs[n] = r
        return r

    def predict(n):
        if not fast_runs:
            return None
        m = max(fast_runs)
        return fast_runs[m]["total_s"] * n / m

    # Order: the first fast run (100 by default: seconds), then the reference subset (bounded), then the rest.
    ref_done = False
    for i, n in enumerate(edits):
        # the largest N is the headline: tried unless predicted over twice the time left (the
        # prediction scales the largest run so far linearly); the others only if predicted to fit
        prof.step(f"fast {n} edits", lambda n=n: fast(n), predicted=predict(n), slack=2.0 if n == max(edits) else 1.0)
        if i == 0 and args.reference_subset and not ref_done:
            reference(prof, model, tok, all_reqs, hp, stats, args, edits, templates_s, templates_peak)
            ref_done = True
    if args.reference_subset and not ref_done:
        reference(prof, model, tok, all_reqs, hp, stats, args, edits, templates_s, templates_peak)
    ratios(prof)
    if args.torch_profile and edits:
        prof.step("torch.profiler trace", lambda: torch_profile(model, tok, hp, records, stats, args), min_left=30)
    stats = None
    cleanup()
    if args.stats:
        prof.step("statistics benchmark", lambda: stats_bench(prof, model, tok, hp, args), min_left=30)


def time_templates(model, tok, seed) -> tuple[float, float]:
    """Seconds and peak GiB of the original's template sampling (5 x 10 tokens, top-k 5) on this model."""
    from memit_fast.templates import generate_context_templates

    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    generate_context_templates(model, tok, seed=seed)
    sync()
    return time.perf_counter() - t0, gib(torch.cuda.max_memory_allocated()) if CUDA else 0.0


# ---- reference ----

def reference(prof: Profiler, model, tok, all_reqs, hp, stats, args, edits, templates_s, templates_peak) -> None:
    """The reference mode on a subset, the two one-layer measurements, and its extrapolation to each N."""
    from memit_fast.edit_requests import normalize_requests
    from memit_fast.model_access import hidden_size
    from memit_fast.reference import reference_keys_and_values
    from memit_fast.update import layer_delta

    s = min(args.reference_subset, len(all_reqs))
    pool = all_reqs[: max(edits + [s])]
    subset = pool[:: max(1, len(pool) // s)][:s]  # spread over the requests used at the largest N
    prof.step("warm-up (reference, 1 request)", lambda: run_apply(model, tok, subset[:1], hp.replace(v_num_grad_steps=2), stats, mode="reference",
                                                                  args=args, templates_s=0.0, templates_peak=0.0) and None)
    sub = prof.step(f"reference {s} requests", lambda: run_apply(model, tok, subset, hp, stats, mode="reference", args=args,
                                                                 templates_s=templates_s, templates_peak=templates_peak))
    if sub is None:
        return
    sub["subset_of"] = max(edits) if edits else s
    prof.doc["runs"].append(sub)
    layer = hp.layers[0]
    n_layers = len(hp.layers)

    # keys and values: one layer on up to M requests
    m = min(args.reference_keys_requests, len(all_reqs), max(edits + [s]))

    def keys_once():
        reqs = normalize_requests(all_reqs[:m])
        sync()
        t0 = time.perf_counter()
        reference_keys_and_values(model, tok, reqs, hp, layer, synthetic.TEMPLATES)
        sync()
        return time.perf_counter() - t0

    keys_s = prof.step(f"reference keys and values, one layer, {m} requests", keys_once)

    # the float64 dense solve of one layer at each N
    d_ff = stats[layer].mom2.shape[0]
    d_model = hidden_size(model)
    solve_s: dict[int, dict] = {}

    def solve_once(n):
        need = 8 * (4 * d_ff * d_ff + 3 * d_ff * n + 2 * d_model * n)
        if CUDA and need > 0.9 * torch.cuda.mem_get_info()[0]:
            raise MemoryError(f"the dense solve at n={n} needs about {need / 2**30:.1f} GiB")
        g = torch.Generator(device=model.device).manual_seed(n)
        keys = torch.randn(n, d_ff, device=model.device, generator=g).mul_(math.sqrt(float(stats[layer].mom2.diagonal().mean())))
        resid = torch.randn(n, d_model, device=model.device, generator=g)
        layer_delta(stats[layer].mom2, keys[:4], resid[:4], hp.mom2_update_weight, "dense")  # warm-up (handles, workspaces)
        sync()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        layer_delta(stats[layer].mom2, keys, resid, hp.mom2_update_weight, "dense")
        sync()
        out = {"seconds": time.perf_counter() - t0, "peak_gib": gib(torch.cuda.max_memory_allocated()) if CUDA else 0.0}
        solve_s[n] = out
        return out

    if not args.no_reference_solve:
        for n in sorted(set(edits)):
            prof.step(f"reference dense solve, one layer, n={n}", lambda n=n: solve_once(n), min_left=20)

    from memit_fast.solve import solve_flops

    for n in edits:
        ph = sub["phases"]
        out = {}
        per = lambda name: ph.get(name, {}).get("seconds", 0.0) / s  # noqa: E731
        out["templates"] = dict(ph["templates"], extrapolated=False)
        out["statistics"] = dict(ph.get("statistics", {"seconds": 0.0}), extrapolated=False)
        out["z"] = {"seconds": per("z") * n, "peak_gib": ph.get("z", {}).get("peak_gib"), "extrapolated": True,
                    "method": f"linear: {s} requests measured one at a time"}
        if keys_s is not None:
            out["keys and values"] = {"seconds": keys_s / m * n * n_layers, "extrapolated": n != m or n_layers > 1,
                                      "method": f"one layer measured on {m} requests, x{n / m:g} requests x{n_layers} layers"}
        else:
            out["keys and values"] = {"seconds": per("keys and values") * n, "extrapolated": True, "method": f"linear from {s} requests"}
        if n in solve_s:
            out["solve"] = {"seconds": solve_s[n]["seconds"] * n_layers, "peak_gib": solve_s[n]["peak_gib"], "extrapolated": n_layers > 1,
                            "method": f"one layer measured at n={n}, x{n_layers} layers"}
        else:
            known = max(solve_s) if solve_s else None
            base_n, base_t = (known, solve_s[known]["seconds"] * n_layers) if known else (s, ph.get("solve", {}).get("seconds", 0.0))
            f = solve_flops(d_ff, n, "dense", m=d_model) / solve_flops(d_ff, base_n, "dense", m=d_model)
            out["solve"] = {"seconds": base_t * f, "extrapolated": True, "method": f"dense-solve flop count scaled from n={base_n}"}
        out["weight update"] = dict(ph.get("weight update", {"seconds": 0.0}), extrapolated=False)
        out["other"] = {"seconds": per("other") * n, "extrapolated": True, "method": f"linear from {s} requests"}
        total = sum(v["seconds"] for v in out.values())
        for v in out.values():
            v["seconds"] = round(v["seconds"], 3)
            v["share"] = round(v["seconds"] / total, 4) if total else None
        prof.doc["runs"].append({"mode": "reference", "edits": n, "measured": False, "extrapolated_from": s, "total_s": round(total, 1),
                                 "edits_per_s": round(n / total, 4), "phases": out, "peak_gib": sub["peak_gib"],
                                 "note": f"extrapolated from {s} requests (see each phase's method)"})


def ratios(prof: Profiler) -> None:
    fast = {r["edits"]: r for r in prof.doc["runs"] if r["mode"] == "fast"}
    ref = {r["edits"]: r for r in prof.doc["runs"] if r["mode"] == "reference" and not r["measured"]}
    out = []
    for n in sorted(set(fast) & set(ref)):
        f, r = fast[n], ref[n]
        fz, rz = f["phases"].get("z", {}).get("seconds"), r["phases"].get("z", {}).get("seconds")
        out.append({"edits": n, "fast_s": f["total_s"], "reference_s": r["total_s"], "ratio": round(r["total_s"] / f["total_s"], 1),
                    "z_ratio": round(rz / fz, 1) if fz and rz else None, "reference_extrapolated_from": r["extrapolated_from"]})
    prof.doc["ratios"] = out



def profile_records(doc: dict, ctx: dict) -> list[dict]:
    """The profile as records (benchmarks/results_store.py), sharing ctx (device, date, commit, command,
    versions, run_id); model and dtype from the conditions:

    - profile_run, name "apply", provider memit_fast (fast) or reference, n_edits: time [s],
      rate [edits/s], peak_memory [GiB]; params: the conditions (hparams, chunk_tokens, request
      lengths, z FLOP model, ...); extrapolated for the reference at N from a subset;
    - profile_phase, name = the phase: time [s] (note: its extrapolation method), share [1],
      peak_memory [GiB]; for "z" also tflops [TFLOP/s] (the matmul model of synthetic.z_work);
    - profile_ratio, name "reference / fast" and "reference / fast: z": ratio [x];
    - stats, name = the pass, provider memit_fast (fused) or reference (one pass per layer):
      rate and rate_without_tokenise [tokens/s], time_44M and time_44M_without_tokenise [s,
      extrapolated], tflops [TFLOP/s], peak_memory [GiB];
    - profile_run, name "steps not completed": count [steps], the events in params.
    """
    cond, env = doc.get("conditions", {}), doc.get("environment", {})
    ctx = dict(ctx, date=env.get("date", ctx["date"]), commit=str(env.get("commit") or ctx["commit"]))
    common = dict(model=cond.get("model"), dtype=cond.get("dtype"))
    keep = ("tiny", "hparams", "chunk_tokens", "memory_cap_gib", "z_attention", "solve_method_fast", "stats_gib", "model_gib", "templates_sampling_s", "parameters",
            "request_lengths", "weights", "early_stop", "statistics")
    conditions = {k: cond[k] for k in keep if k in cond}
    if env.get("attn_implementation"):
        conditions["attn_implementation"] = env["attn_implementation"]
    make, out = results_store.make, []
    for r in doc.get("runs", []):
        provider = "memit_fast" if r["mode"] == "fast" else "reference"
        extrapolated = not r.get("measured", True) and "extrapolated_from" in r
        run = dict(common, provider=provider, n_edits=r["edits"])
        info = {k: r[k] for k in ("extrapolated_from", "subset_of", "failed", "apply_wall_s", "baseline_gib", "peak_reserved_gib",
                                  "z_flop_model", "request_lengths", "memory", "note") if k in r}
        label = "measured" if r.get("measured", True) else ("extrapolated" if extrapolated else r.get("failed", "partial"))
        params = dict(conditions, **info, status=label)
        for metric, key, unit in (("time", "total_s", "s"), ("rate", "edits_per_s", "edits/s"), ("peak_memory", "peak_gib", "GiB")):
            if r.get(key) is not None:
                out.append(make("profile_run", "apply", metric, r[key], unit, ctx, extrapolated=extrapolated, params=params, **run))
        for phase, v in r.get("phases", {}).items():
            ph = dict(run, note=v.get("method") or v.get("note"), params={"status": label, "calls": v.get("calls")} if v.get("calls") else {"status": label})
            ext = bool(v.get("extrapolated", False)) or (extrapolated and "extrapolated" not in v)
            for metric, key, unit in (("time", "seconds", "s"), ("share", "share", "1"), ("peak_memory", "peak_gib", "GiB")):
                if v.get(key) is not None:
                    out.append(make("profile_phase", phase, metric, v[key], unit, ctx, extrapolated=ext, **ph))
        if r.get("z_tflops") is not None:
            out.append(make("profile_phase", "z", "tflops", r["z_tflops"], "TFLOP/s", ctx, params={"status": label},
                            note="matrix-product work of the fast z (synthetic.z_work) over the z phase's time", **run))
    for q in doc.get("ratios", []):
        note = f"reference extrapolated from {q['reference_extrapolated_from']} requests"
        for name, key in (("reference / fast", "ratio"), ("reference / fast: z", "z_ratio")):
            if q.get(key) is not None:
                out.append(make("profile_ratio", name, "ratio", q[key], "x", ctx, extrapolated=True, n_edits=q["edits"], note=note,
                                params={"fast_s": q["fast_s"], "reference_s": q["reference_s"]}, **common))
    st = doc.get("stats") or {}
    for r in st.get("runs", []):
        shape = {"tokens": r["tokens"], "documents": r["documents"], "max_length": st["max_length"], "d_ff": st["d_ff"]}
        params = {"layers": st["layers"], "doc_length": st["doc_length"], "seconds": r["seconds"], "tokenise_s": r["tokenise_s"],
                  "flops_per_token": r["flops_per_token"], "target_tokens": st["target_tokens"], "fused_speedup": st.get("fused_speedup")}
        kw = dict(common, provider="memit_fast" if r["fused"] else "reference", shape=shape, params=params)
        for metric, key, unit, ext in (("rate", "tokens_per_s", "tokens/s", False),
                                       ("rate_without_tokenise", "tokens_per_s_without_tokenise", "tokens/s", False),
                                       ("time_44M", "extrapolated_s_44M", "s", True),
                                       ("time_44M_without_tokenise", "extrapolated_s_44M_without_tokenise", "s", True),
                                       ("tflops", "tflops_without_tokenise", "TFLOP/s", False), ("peak_memory", "peak_gib", "GiB", False)):
            out.append(make("stats", r["mode"], metric, r[key], unit, ctx, extrapolated=ext, **kw))
    bad = [{k: (v.strip().splitlines()[-1][:300] if k == "error" else v) for k, v in e.items()} for e in doc.get("events", []) if e["status"] != "ok"]
    if bad:
        out.append(make("profile_run", "steps not completed", "count", len(bad), "steps", ctx, params={"events": bad}, **common))
    return out


# ---- statistics ----

def stats_bench(prof: Profiler, model, tok, hp, args) -> dict:
    """compute_stats on random-token documents: one fused pass for all layers vs one pass per layer."""
    from memit_fast.model_access import get_module, in_features
    from memit_fast.stats import _context_cap, compute_stats

    cfg_cap = max(int(getattr(model.config, k, 0) or 0) for k in ("n_positions", "max_position_embeddings", "n_ctx"))
    max_length = args.stats_max_length or min(cfg_cap or 2048, 2048)
    d_ff = in_features(get_module(model, hp.rewrite_module_tmp.format(hp.layers[0])))
    block = synthetic.block_matmul_params(model, hp)
    res: dict = {"max_length": max_length, "core_default_max_length": _context_cap(model), "doc_length": args.stats_doc_length or "mix (log-normal, mean ~440)",
                 "layers": hp.layers, "d_ff": d_ff, "target_tokens": STATS_TOKENS_ORIGINAL, "runs": []}
    prof.doc["stats"] = res

    def docs(n_tokens, seed):
        return synthetic.random_documents(tok, n_tokens, max_length=max_length, fixed_length=args.stats_doc_length, seed=seed)

    warm = docs(4 * max_length if args.tiny else 20_000, seed=99)
    compute_stats(model, tok, hp, corpus=warm, n_samples=len(warm), max_length=max_length, use_cache=False, progress=False)
    compute_stats(model, tok, hp, layers=hp.layers[:1], corpus=warm[:4], n_samples=4, max_length=max_length, use_cache=False, progress=False)
    for fused, n_tokens in ((True, args.stats_tokens), (False, args.stats_tokens_per_layer)):
        texts = docs(n_tokens, seed=1 if fused else 2)
        t0 = time.perf_counter()
        encoded = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]  # what compute_stats does first
        tok_s = time.perf_counter() - t0
        n_tok = sum(map(len, encoded))
        del encoded
        sync()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = compute_stats(model, tok, hp, corpus=texts, n_samples=len(texts), max_length=max_length, use_cache=False,
                            one_pass_per_layer=not fused, progress=False)
        sync()
        wall = time.perf_counter() - t0
        count = out[hp.layers[0]].count
        layer_passes = (hp.layers[-1] + 1) if fused else sum(layer + 1 for layer in hp.layers)
        flops_per_token = 2 * block * layer_passes + len(hp.layers) * d_ff * (d_ff + 1)
        gpu_s = max(wall - tok_s, 1e-9)
        row = {"mode": "fused (one pass, all layers)" if fused else "one pass per layer (the original's structure)", "fused": fused,
               "documents": len(texts), "tokens": count, "tokenised_tokens": n_tok, "seconds": round(wall, 3), "tokenise_s": round(tok_s, 3),
               "tokens_per_s": round(count / wall), "tokens_per_s_without_tokenise": round(count / gpu_s),
               "extrapolated_s_44M": round(STATS_TOKENS_ORIGINAL / count * wall, 1),
               "extrapolated_s_44M_without_tokenise": round(STATS_TOKENS_ORIGINAL / count * gpu_s, 1),
               "flops_per_token": float(f"{flops_per_token:.4g}"), "tflops_without_tokenise": round(flops_per_token * count / gpu_s / 1e12, 1),
               "peak_gib": gib(torch.cuda.max_memory_allocated()) if CUDA else 0.0}
        res["runs"].append(row)
        del out, texts
        cleanup()
    if len(res["runs"]) == 2:
        res["fused_speedup"] = round(res["runs"][1]["extrapolated_s_44M"] / res["runs"][0]["extrapolated_s_44M"], 2)
    return res


# ---- torch.profiler ----

def torch_profile(model, tok, hp, records, stats, args) -> None:
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile, record_function

    import memit_fast

    out = Path(args.torch_profile)
    out.mkdir(parents=True, exist_ok=True)
    reqs = synthetic.make_requests(records, args.torch_profile_edits, seed=args.seed + 2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    hp = hp.replace(v_num_grad_steps=min(hp.v_num_grad_steps, args.torch_profile_steps))
    with profile(activities=activities, record_shapes=False) as p:
        with record_function(f"memit_fast.apply {len(reqs)} edits, {hp.v_num_grad_steps} z steps"):
            _, orig = memit_fast.apply(model, tok, reqs, hp, stats=stats, context_templates=synthetic.TEMPLATES,
                                       progress=False, return_orig_weights=True)
        sync()
    memit_fast.restore(model, orig)
    name = f"trace_{args.model}{'_tiny' if args.tiny else ''}"
    raw = out / f"{name}.json"
    p.export_chrome_trace(str(raw))
    with open(raw, "rb") as f_in, gzip.open(str(raw) + ".gz", "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
    raw.unlink()
    sort = "cuda_time_total" if CUDA else "cpu_time_total"
    table = p.key_averages().table(sort_by=sort, row_limit=40)
    print(f"[profile] torch.profiler, {len(reqs)} edits, {hp.v_num_grad_steps} z steps, top ops by {sort}:\n{table}", flush=True)
    (out / f"{name}_ops.txt").write_text(table)


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    # the z chunk plan (chunks, budget, measured peak, measured/estimated) in the run's log
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("memit_fast.targets").setLevel(logging.INFO)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
