"""What bounds z on the GPU: one chunk size at a time, each attention over the cached prefix
(`split`: layouts.base.prefix_attention, the default; `sdpa`: SDPA over the prefix joined to the
rows' keys), eager or CUDA-graph steps, TFLOP/s of the z FLOP model, and a torch.profiler table
of eager steps (CPU time vs CUDA time per op).

    python -m benchmarks.z_probe --model gpt-j-6b --chunk-tokens 2048,4096 --attention split,sdpa --steps 6
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import synthetic  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-j-6b", choices=synthetic.MODELS)
    ap.add_argument("--chunk-tokens", default="2048,4096", help="comma-separated; 0 for the core's default from free memory")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--attention", default="split,sdpa", help="comma-separated: split, sdpa")
    ap.add_argument("--graphs", action="store_true", help="also time CUDA-graph steps")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--profile-rows", type=int, default=25, help="rows of the profiler table (0: no profile)")
    args = ap.parse_args(argv)

    import memit_fast
    from memit_fast.edit_requests import normalize_requests
    from memit_fast.layouts import layout_for
    from memit_fast.targets import compute_targets
    from memit_fast.tokens import encode_requests

    model, _ = synthetic.build_model(args.model, device="cuda")
    tok = synthetic.load_tokenizer(args.tokenizer)
    hp = memit_fast.presets.for_model(model).replace(v_num_grad_steps=args.steps)
    layout = layout_for(model, hp)
    records = synthetic.load_records()
    flat = [t for g in synthetic.TEMPLATES for t in g]
    print(f"{args.model}: layout {type(layout).__name__}, layers {hp.layers}, loss layer {hp.v_loss_layer}", flush=True)
    from memit_fast.targets import _default_chunk_tokens

    for ct in [int(x) or _default_chunk_tokens(model, hp) for x in args.chunk_tokens.split(",")]:
        n = max(8, ct // 27)  # about one chunk of suffix tokens (27 per GPT-J request on CounterFact)
        reqs = synthetic.make_requests(records, n, seed=1)
        enc = encode_requests(tok, normalize_requests(reqs), flat, hp.fact_token)
        work = synthetic.z_work(model, tok, reqs, hp, synthetic.TEMPLATES, steps=args.steps)
        for attention, graphs in [(a, g) for a in args.attention.split(",") for g in ((False, True) if args.graphs else (False,))]:
            type(layout).split_prefix_attention = attention == "split"
            compute_targets(model, tok, enc[:8], hp.replace(v_num_grad_steps=5), chunk_tokens=ct, progress=False, layout=layout, cuda_graphs=graphs)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            compute_targets(model, tok, enc, hp, chunk_tokens=ct, progress=False, layout=layout, cuda_graphs=graphs)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            extra = (torch.cuda.max_memory_allocated() - base) / 2**30
            print(f"chunk {ct:5d} tokens, {n:4d} requests, {work.suffix_tokens:6d} suffix tokens: {attention:5} graphs={graphs!s:5}  "
                  f"{dt / args.steps * 1e3:7.1f} ms/step  {work.flops / dt / 1e12:6.1f} TFLOP/s  z memory {extra:5.2f} GiB "
                  f"({extra * 2**30 / work.suffix_tokens / 2**20:5.2f} MiB per suffix token)", flush=True)
    type(layout).split_prefix_attention = True
    if args.profile_rows:
        from torch.profiler import ProfilerActivity, profile

        reqs = synthetic.make_requests(records, 2048 // 27, seed=2)
        enc = encode_requests(tok, normalize_requests(reqs), flat, hp.fact_token)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            compute_targets(model, tok, enc, hp.replace(v_num_grad_steps=3), chunk_tokens=2048, progress=False, layout=layout, cuda_graphs=False)
            torch.cuda.synchronize()
        events = prof.key_averages()
        cpu = sum(e.self_cpu_time_total for e in events) / 1e3
        cuda = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events) / 1e3
        print(f"profile of 3 eager steps: self CPU {cpu:.1f} ms, self CUDA {cuda:.1f} ms, launches {sum(e.count for e in events if e.key.startswith('cuda') and 'Launch' in e.key)}")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.profile_rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
