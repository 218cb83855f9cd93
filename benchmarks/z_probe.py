"""What bounds z on the GPU: one chunk size at a time, each prefix cache (`per-row`: every row's
prefix, the default; `shared`: the context templates' keys and values held once per chunk and
each row's own prefix, layouts/shared_prefix.py) and attention over it (`triton`: the kernels of
kernels/prefix_attention.py, the library's default on a GPU; `split`: their twin
layouts.base.prefix_attention; `sdpa`: SDPA over the prefix joined to the rows' keys, per-row
cache only), eager or CUDA-graph steps, eager or compiled attention (`--compile`,
layouts/fused.py), TFLOP/s of the z FLOP model, z's memory (peak
above the model) and the prefix cache's bytes per chunk, and a torch.profiler table of eager
steps (CPU time vs CUDA time per op).

    python -m benchmarks.z_probe --model gpt-j-6b --chunk-tokens 0,4096 --prefix shared,per-row --steps 6 --profile-rows 0

--chunk-tokens 0 runs compute_targets' default chunking (from free memory, the cached prefix
counted) over about one default chunk of requests; --tiny runs a tiny model on the CPU (a check).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import synthetic  # noqa: E402


def _cache_bytes(cache) -> int:
    """Bytes of a runner's prefix cache (PrefixCache or SharedPrefixCache) as kept for the steps."""
    if cache is None:
        return 0
    dicts = [cache.template, cache.own] if hasattr(cache, "template") else [cache.kv]
    return sum(t.numel() * t.element_size() for d in dicts for kv in d.values() for t in kv)


def _record_caches(layout, seen: list) -> None:
    """Wrap the layout's runner builders so each chunk's cache size is appended to `seen`."""
    for name in ("suffix_runner", "template_suffix_runner", "shared_suffix_runner"):
        build = getattr(type(layout), name)

        def wrapped(*a, build=build, **k):
            runner = build(layout, *a, **k)
            seen.append(_cache_bytes(runner.cache))
            return runner

        setattr(layout, name, wrapped)


def _kernel_resources() -> list[str]:
    """Registers, spills, shared memory and warps of each compiled prefix-attention kernel (Triton's
    per-device caches; CUDA only): whether a configuration spills, which limits the kernels."""
    from memit_fast.kernels import prefix_attention as pa

    lines = []
    for name in ("_prefix_attention_fwd", "_prefix_attention_bwd"):
        try:  # Triton's internals: a version that keeps them elsewhere gets a line saying so
            for caches in getattr(getattr(pa, name), "device_caches", {}).values():
                for key, compiled in caches[0].items():
                    if hasattr(compiled, "_init_handles"):
                        compiled._init_handles()  # fills n_regs and n_spills
                    meta = compiled.metadata
                    lines.append(f"{name}: {getattr(compiled, 'n_regs', '?')} registers, {getattr(compiled, 'n_spills', '?')} spilled, "
                                 f"{getattr(meta, 'shared', '?')} B shared, {getattr(meta, 'num_warps', '?')} warps; {str(key)[-160:]}")
        except Exception as e:  # noqa: BLE001 - a diagnostic, after the measurements
            lines.append(f"{name}: resources not readable ({type(e).__name__}: {e})")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-j-6b", choices=synthetic.MODELS)
    ap.add_argument("--chunk-tokens", default="0,4096", help="comma-separated; 0 for compute_targets' default chunking")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prefix", default="shared,per-row", help="comma-separated: shared, per-row")
    ap.add_argument("--attention", default="triton,split", help="comma-separated: triton, split, sdpa (sdpa: per-row prefix only)")
    ap.add_argument("--graphs", action="store_true", help="also time CUDA-graph steps")
    ap.add_argument("--compile", default="off,on", help="comma-separated: off (eager attention), on (memit_fast.layouts.fused)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the script, times nothing real)")
    ap.add_argument("--profile-rows", type=int, default=25, help="rows of the profiler table (0: no profile)")
    ap.add_argument("--profile-chunk-tokens", type=int, default=2048, help="the profile's chunk (0: the default chunking, over about one default chunk of requests)")
    args = ap.parse_args(argv)

    import memit_fast
    from memit_fast import targets
    from memit_fast.edit_requests import normalize_requests
    from memit_fast.layouts import layout_for
    from memit_fast.targets import compute_targets
    from memit_fast.tokens import encode_requests

    cuda = not args.tiny
    model, _ = synthetic.build_model(args.model, tiny=args.tiny, device="cuda" if cuda else "cpu")
    tok = synthetic.load_tokenizer(args.tokenizer, fallback_ok=args.tiny)
    hp = memit_fast.presets.for_model(model).replace(v_num_grad_steps=args.steps)
    layout = layout_for(model, hp)
    defaults = type(layout).shared_prefix, type(layout).split_prefix_attention
    records = synthetic.load_records(fallback_ok=args.tiny)
    flat = [t for g in synthetic.TEMPLATES for t in g]
    print(f"{args.model}: layout {type(layout).__name__}, layers {hp.layers}, loss layer {hp.v_loss_layer}", flush=True)
    sizes = []
    for x in args.chunk_tokens.split(","):
        if int(x):
            sizes.append((int(x), int(x)))
            continue
        # about one default chunk of the shared cache: its padded prefix tokens per suffix token
        pool = [targets.build_rows(e) for e in encode_requests(tok, normalize_requests(synthetic.make_requests(records, 400, seed=1)), flat, hp.fact_token)]
        pool = [r for r in pool if r.kl_in_bare] or pool
        n_rows = len(pool[0].ids) - pool[0].kl_in_bare
        templates = targets._template_tokens(pool, n_rows)
        prefix = sum(n_rows * targets._cached_prefix(r, n_rows, templates) for r in pool)
        suffix = sum(n_rows * max(len(ids) - s for ids, s in zip(r.ids, r.lookup)) for r in pool)
        sizes.append((None, targets.default_chunk_tokens(model, layout, hp, prefix / suffix)))
    for asked, ct in sizes:
        n = max(8, ct // 27)  # about one chunk of suffix tokens (27 per GPT-J request on CounterFact)
        reqs = synthetic.make_requests(records, n, seed=1)
        enc = encode_requests(tok, normalize_requests(reqs), flat, hp.fact_token)
        work = synthetic.z_work(model, tok, reqs, hp, synthetic.TEMPLATES, steps=args.steps)
        runs = [(p, a, g, c) for p in args.prefix.split(",") for a in args.attention.split(",") for g in ((False, True) if args.graphs else (False,))
                for c in args.compile.split(",")]
        for prefix, attention, graphs, compiled in runs:
            if prefix == "shared" and attention != "split" or attention == "triton" and compiled == "on":
                continue
            os.environ["MEMIT_FAST_COMPILE"] = "1" if compiled == "on" else "0"
            os.environ["MEMIT_FAST_ATTENTION_KERNEL"] = "1" if attention == "triton" else "0"
            type(layout).shared_prefix = prefix == "shared"
            type(layout).split_prefix_attention = attention != "sdpa"
            # warm-up over the same requests (every shape: Triton compiles once per tile configuration)
            compute_targets(model, tok, enc, hp.replace(v_num_grad_steps=2), chunk_tokens=asked, progress=False, layout=layout, cuda_graphs=graphs)
            caches: list[int] = []
            _record_caches(layout, caches)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            compute_targets(model, tok, enc, hp, chunk_tokens=asked, progress=False, layout=layout, cuda_graphs=graphs)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            for name in ("suffix_runner", "template_suffix_runner", "shared_suffix_runner"):
                delattr(layout, name)
            extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
            label = f"chunk {'default' if asked is None else asked:>7} ({ct:5d} tokens)"
            print(f"{label}, {n:4d} requests, {work.suffix_tokens:6d} suffix tokens, {len(caches)} chunk(s): {prefix:7} {attention:10} graphs={graphs!s:5} compile={compiled:3}  "
                  f"{dt / args.steps * 1e3:7.1f} ms/step  {work.flops / dt / 1e12:6.1f} TFLOP/s  z memory {extra:5.2f} GiB "
                  f"({extra * 2**30 / work.suffix_tokens / 2**20:5.2f} MiB per suffix token), prefix cache {max(caches) / 2**30:5.2f} GiB per chunk",
                  flush=True)
    for line in _kernel_resources() if cuda else ():
        print(line, flush=True)
    type(layout).shared_prefix, type(layout).split_prefix_attention = defaults  # the profile: the library's own settings
    profiles = [(a, c) for a in args.attention.split(",") if a in ("triton", "split") for c in args.compile.split(",")
                if not (a == "triton" and c == "on")]
    for attention, compiled in profiles if args.profile_rows and cuda else ():
        from torch.profiler import ProfilerActivity, profile

        os.environ["MEMIT_FAST_COMPILE"] = "1" if compiled == "on" else "0"
        os.environ["MEMIT_FAST_ATTENTION_KERNEL"] = "1" if attention == "triton" else "0"
        chunk = args.profile_chunk_tokens or None
        reqs = synthetic.make_requests(records, (chunk or sizes[-1][1]) // 27, seed=2)
        enc = encode_requests(tok, normalize_requests(reqs), flat, hp.fact_token)
        compute_targets(model, tok, enc, hp.replace(v_num_grad_steps=2), chunk_tokens=chunk, progress=False, layout=layout)  # compiled before the profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            compute_targets(model, tok, enc, hp.replace(v_num_grad_steps=3), chunk_tokens=chunk, progress=False, layout=layout, cuda_graphs=False)
            torch.cuda.synchronize()
        events = prof.key_averages()
        cpu = sum(e.self_cpu_time_total for e in events) / 1e3
        cuda_ms = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events) / 1e3
        print(f"profile of 3 steps ({len(enc)} requests, chunk {chunk or 'default'}), attention {attention}, compile {compiled}: self CPU {cpu:.1f} ms, self CUDA {cuda_ms:.1f} ms, launches {sum(e.count for e in events if e.key.startswith('cuda') and 'Launch' in e.key)}")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.profile_rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
