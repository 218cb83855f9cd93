"""Several GPUs (memit_fast.distributed): 1 vs N GPUs, and a model split over the GPUs of one process.

    torchrun --nproc-per-node N -m benchmarks.distributed_bench dp --records OUT/records.jsonl
    python -m benchmarks.distributed_bench split --model neox-20b --gpus 2 --records OUT/records.jsonl
    python -m benchmarks.distributed_bench summary --records OUT/records.jsonl

dp (data parallel, one rank per GPU): GPT-J shapes with random weights (the same on every rank:
rank 0's are broadcast), then (a) the statistics pass over --stats-tokens tokens of random
documents (compute_stats, no cache) and (b) --edits edits (apply, fast mode, the given synthetic
statistics, fixed context templates). Per rank: wall time of each phase, time in collectives
(waits for slower ranks included), peak GPU memory. Rank 0 appends the records.
split: one process, the blocks of a model (NeoX-20B or Llama-3-70B shapes) in order over --gpus
GPUs by memit_fast.distributed.balanced_device_map, random bf16 weights made directly on their
GPUs (synthetic.build_on_devices, never on the CPU); the statistics pass over --stats-tokens
tokens of random documents (up to the last edited layer), then --edits edits with those
statistics. Per phase: wall time, peak memory per GPU; for the edits the time per edit, and
under 1,000 edits a record of 1,000 edits' time marked extrapolated.
summary: the tables of the records of these runs (1 vs N: speed-up and scaling efficiency).
--tiny: tiny shapes on the CPU (gloo), to prove the script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import results_store, synthetic  # noqa: E402

SPLIT_MODELS = {
    "neox-20b": ("GPTNeoXConfig", dict(hidden_size=6144, intermediate_size=24576, num_hidden_layers=44, num_attention_heads=64,
                                       vocab_size=50432, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                                       hidden_act="gelu_fast", layer_norm_eps=1e-5)),
    "llama-3-70b": ("LlamaConfig", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                                        rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
SPLIT_TINY = {"neox-20b": dict(hidden_size=64, intermediate_size=256, num_attention_heads=4),
              "llama-3-70b": dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2)}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib(reset: bool = True) -> float:
    if not torch.cuda.is_available():
        return 0.0
    value = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(value, 2)


def _phase(fn):
    """(fn's result, this rank's {seconds, comm_s, peak_gib}); the ranks start together."""
    from memit_fast import distributed

    if distributed.active():
        torch.distributed.barrier()
    _sync()
    _peak_gib()
    distributed.comm_seconds(reset=True)
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, {"seconds": round(time.perf_counter() - t0, 3), "comm_s": round(distributed.comm_seconds(reset=True), 3), "peak_gib": _peak_gib()}


def _gather(obj) -> list:
    from memit_fast import distributed

    if not distributed.active():
        return [obj]
    out = [None] * distributed.world()
    torch.distributed.all_gather_object(out, obj)
    return out


def _profiled(fn, rows: int, tables: list):
    """fn under torch.profiler; appends the table of the `rows` ops of most device time (self) to `tables`."""

    def run():
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            out = fn()
        tables.append((prof, "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total", rows))
        return out

    return run


def cmd_dp(args) -> int:
    import memit_fast
    from memit_fast import distributed
    from memit_fast.profiling import PhaseTimer

    distributed.init_from_env()
    n, rank = distributed.world(), distributed.rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tok = synthetic.load_tokenizer(args.tokenizer, fallback_ok=args.tiny)
    model, build_s = synthetic.build_model(args.model, tiny=args.tiny, device=device)
    if distributed.active():  # every rank edits the same weights: rank 0's
        for p in model.parameters():
            torch.distributed.broadcast(p.data, 0)
    hp = memit_fast.presets.for_model(model)
    if args.z_steps:
        hp = hp.replace(v_num_grad_steps=args.z_steps)
    if args.prefix_cache:
        from memit_fast.layouts import layout_for

        family = type(layout_for(model, hp))
        family.shared_prefix, family.prefix_from_templates = args.prefix_cache == "shared", args.prefix_cache == "templates"
    ctx = results_store.context(f"distributed_bench dp {args.model} {n}", " ".join(["torchrun --nproc-per-node", str(n), "-m benchmarks.distributed_bench", *sys.argv[1:]]))
    label = f"{args.model}{' (tiny)' if args.tiny else ''}"
    # runs that are not the library's edit say so in their records' name
    variant = "".join([f", z {args.z_steps} step(s)" if args.z_steps else "", f", prefix cache {args.prefix_cache}" if args.prefix_cache else ""])
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")

    def emit(phase: str, info: dict) -> None:
        """Every rank's `info` to rank 0, which appends the phase's record (one per phase: a stage
        cut by its time limit keeps the phases done) and prints them."""
        per_rank = _gather(info)
        if rank != 0:
            return
        statistics = phase == "statistics"
        params = {"gpus": n, "per_rank": per_rank, "build_s": round(build_s, 2), "model_tiny": args.tiny, "z_attention": synthetic.z_attention(model),
                  "z_steps": hp.v_num_grad_steps, "profiled_rank0": bool(args.profile_rows), "prefix_cache": args.prefix_cache or "default"}
        kind, name = ("stats", f"distributed statistics {label}") if statistics else ("profile_run", f"distributed edits {label}{variant}")
        rec = results_store.make(kind, name, "seconds", max(r["seconds"] for r in per_rank), "s", ctx, model=args.model,
                                 n_edits=None if statistics else args.edits, shape={"tokens": per_rank[0]["tokens"]} if statistics else None,
                                 dtype=dtype, params=params, note=f"{n} rank(s), one GPU each; the slowest rank's wall time")  # fmt: skip
        if args.records:
            results_store.append([rec], args.records)
        print(json.dumps({"gpus": n, phase: per_rank}), flush=True)

    if args.stats_tokens:
        docs = synthetic.random_documents(tok, args.stats_tokens, max_length=1024, seed=1)
        stats, info = _phase(lambda: memit_fast.compute_stats(model, tok, hp, corpus=docs, use_cache=False, progress=False))
        info["tokens"] = next(iter(stats.values())).count
        del stats
        emit("statistics", info)
    if args.edits:
        requests = synthetic.make_requests(synthetic.load_records(fallback_ok=args.tiny), args.edits)
        given = synthetic.synthetic_stats(model, hp)
        for s in given.values():
            if distributed.active():
                torch.distributed.broadcast(s.mom2, 0)
        timer = PhaseTimer()
        edit = lambda: memit_fast.apply(model, tok, requests, hp, stats=given, context_templates=synthetic.TEMPLATES,  # noqa: E731
                                        progress=False, return_orig_weights=False, timer=timer)  # fmt: skip
        tables = []
        _, info = _phase(_profiled(edit, args.profile_rows, tables) if args.profile_rows and rank == 0 else edit)
        info["phases"] = {k: round(v["seconds"], 3) for k, v in timer.totals().items()}
        for prof, key, rows in tables:  # printed after the timing
            print(f"profile of the edits, rank {rank} of {n} (its time includes the profiler's overhead):\n"
                  f"{prof.key_averages().table(sort_by=key, row_limit=rows)}", flush=True)
        emit("edits", info)
    distributed.shutdown()
    return 0


def _gpu_peaks() -> list[float]:
    """Peak GiB allocated on each GPU since the last call (the peaks are reset)."""
    out = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        out.append(round(torch.cuda.max_memory_allocated(i) / 2**30, 2))
        torch.cuda.reset_peak_memory_stats(i)
    return out


def _sync_all():
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.synchronize(i)


def _capacity(config, n_layers: int, gpus: list) -> list[float] | None:
    """Each GPU's memory for balanced_device_map, the first's less the statistics of the edited
    layers (which sit there) at their peak: per layer the float64 sum and float32 buffer, the
    float32 means, and one layer's float64 temporaries while its mean is taken. None off CUDA."""
    if not torch.cuda.is_available():
        return None
    d_ff = config.intermediate_size
    total = [torch.cuda.get_device_properties(g).total_memory for g in gpus]
    return [total[0] - d_ff**2 * (16 * n_layers + 24)] + total[1:]


def split_config(name: str, tiny: bool = False):
    import transformers

    cls_name, kw = SPLIT_MODELS[name]
    return getattr(transformers, cls_name)(**dict(kw, **(SPLIT_TINY[name] if tiny else {})))


def cmd_split(args) -> int:
    """One process, `--model`'s layers over --gpus GPUs: the statistics pass, then --edits edits
    with those statistics; a record per phase as soon as it ends (a stage cut by its time limit
    keeps the phases done)."""
    import memit_fast
    from memit_fast.distributed import balanced_device_map
    from memit_fast.profiling import PhaseTimer

    gpus = list(range(args.gpus)) if torch.cuda.is_available() else ["cpu"] * args.gpus
    tok = synthetic.load_tokenizer(args.tokenizer, fallback_ok=args.tiny)
    config = split_config(args.model, args.tiny)
    hp = memit_fast.presets.for_config(config)
    if args.layers:
        hp = hp.replace(layers=hp.layers[-args.layers:])
    device_map = balanced_device_map(config, gpus, hparams=hp, capacity=_capacity(config, len(hp.layers), gpus))
    model, build_s = synthetic.build_on_devices(config, device_map, dtype=torch.float32 if args.tiny else torch.bfloat16)
    hp = memit_fast.presets.for_model(model).replace(layers=hp.layers)
    prefix = hp.layer_module_tmp.split("{}")[0]
    blocks = {str(d): [int(k[len(prefix):]) for k, v in device_map.items() if v == d and k.startswith(prefix)] for d in dict.fromkeys(device_map.values())}
    params = {"gpus": args.gpus, "build_s": round(build_s, 2), "model_tiny": args.tiny, "z_attention": synthetic.z_attention(model), "layers": hp.layers, "v_loss_layer": hp.v_loss_layer,
              "blocks_per_gpu": {d: f"{b[0]}..{b[-1]}" for d, b in blocks.items() if b}, "weights_gib_per_gpu": _gpu_peaks(),
              "layer_devices": {str(layer): str(model.get_submodule(hp.rewrite_module_tmp.format(layer)).weight.device) for layer in hp.layers}}
    print(json.dumps({"model": args.model, "built": params}), flush=True)
    ctx = results_store.context(f"distributed_bench split {args.model}", " ".join(["python -m benchmarks.distributed_bench", *sys.argv[1:]]))
    label = f"{args.model}{' (tiny)' if args.tiny else ''}"
    # runs that are not the library's edit say so in their records' name
    variant = "".join([f", z {args.z_steps} step(s)" if args.z_steps else "", f", prefix cache {args.prefix_cache}" if args.prefix_cache else ""])
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    note = f"one process, blocks over {args.gpus} GPUs in order (one GPU works at a time); random weights"

    def emit(records: list[dict], phase: str, info: dict) -> None:
        if args.records:
            results_store.append(records, args.records)
        print(json.dumps({"model": args.model, phase: info}), flush=True)

    def timed(fn):
        _sync_all()
        _gpu_peaks()
        t0 = time.perf_counter()
        out = fn()
        _sync_all()
        return out, {"seconds": round(time.perf_counter() - t0, 3), "peak_gib_per_gpu": _gpu_peaks()}

    stats = None
    if args.stats_tokens:
        docs = synthetic.random_documents(tok, args.stats_tokens, max_length=1024, seed=1)
        stats, info = timed(lambda: memit_fast.compute_stats(model, tok, hp, corpus=docs, use_cache=False, progress=False,
                                                             batch_tokens=args.batch_tokens))  # fmt: skip
        info["tokens"] = next(iter(stats.values())).count
        info["stats_devices"] = sorted({str(v.mom2.device) for v in stats.values()})
        rec = results_store.make("stats", f"split statistics {label}", "seconds", info["seconds"], "s", ctx, model=args.model, dtype=dtype,
                                 shape={"tokens": info["tokens"], "layers": len(hp.layers)}, params=params | {"phase": info}, note=note)  # fmt: skip
        emit([rec], "statistics", info)
    if args.edits:
        given = stats or synthetic.synthetic_stats(model, hp)
        requests = synthetic.make_requests(synthetic.load_records(fallback_ok=args.tiny), args.edits)
        timer = PhaseTimer()
        _, info = timed(lambda: memit_fast.apply(model, tok, requests, hp, stats=given, context_templates=synthetic.TEMPLATES,
                                                 progress=False, return_orig_weights=False, timer=timer))  # fmt: skip
        info["phases"] = {k: round(v["seconds"], 3) for k, v in timer.totals().items()}
        info["per_edit_s"] = round(info["seconds"] / args.edits, 4)
        info["memory_gib_per_gpu"] = [round(torch.cuda.memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        recs = [results_store.make("profile_run", f"split edits {label}", "seconds", info["seconds"], "s", ctx, model=args.model, dtype=dtype,
                                   n_edits=args.edits, params=params | {"phase": info}, note=note + f"; {args.edits} edits measured")]  # fmt: skip
        if args.edits < 1000:
            recs.append(results_store.make("profile_run", f"split edits {label}", "seconds", round(info["per_edit_s"] * 1000, 1), "s", ctx,
                                           extrapolated=True, model=args.model, dtype=dtype, n_edits=1000, params=params | {"from_edits": args.edits},
                                           note=f"NOT measured: {args.edits} edits' time x 1000/{args.edits} (assumes time linear in the edits)"))  # fmt: skip
        emit(recs, "edits", info)
    return 0


def cmd_summary(args) -> int:
    """The tables of the dp and split records in --records, and scaling records (appended)."""
    recs = [r for r in results_store.load(args.records) if r.get("run_id", "").startswith("distributed_bench")]
    if not recs:
        print("no distributed_bench records")
        return 1
    dp = [r for r in recs if r["name"].startswith("distributed")]
    split = [r for r in recs if r["name"].startswith("split")]
    extra = _dp_table(dp) if dp else []
    if split:
        _split_table(split)
    if extra and args.append_scaling:
        results_store.append(extra, args.records)
    return 0


def _dp_table(recs: list[dict]) -> list[dict]:
    """Print 1 vs N ranks; returns the scaling-efficiency records."""
    print(f"{'run':44s} {'GPUs':>4s} {'seconds':>8s} {'speed-up':>8s} {'effic.':>6s} {'comm s':>7s} {'peak GiB per GPU':>18s}  phases of rank 0 (s)")
    base = {(r["name"], r.get("n_edits")): r["value"] for r in recs if r.get("params", {}).get("gpus") == 1}
    extra = []
    for r in sorted(recs, key=lambda r: (r["name"], r.get("params", {}).get("gpus", 1))):
        p = r.get("params", {})
        n, ranks = p.get("gpus", 1), p.get("per_rank", [{}])
        key = (r["name"], r.get("n_edits"))
        speed = eff = ""
        if n > 1 and key in base:
            s = base[key] / r["value"]
            speed, eff = f"{s:.2f}x", f"{s / n:.0%}"
            extra.append(results_store.make(r["kind"], r["name"], "scaling_efficiency", round(s / n, 4), "fraction",
                                            {k: r[k] for k in ("device", "date", "commit", "command", "versions", "run_id")},
                                            model=r.get("model"), n_edits=r.get("n_edits"), params={"gpus": n, "speedup": round(s, 4)}))
        comm = max(x.get("comm_s", 0) for x in ranks)
        peaks = ",".join(str(x.get("peak_gib", "")) for x in ranks)
        text = " ".join(f"{k}={v:.1f}" for k, v in ranks[0].get("phases", {}).items())
        print(f"{r['name'][:44]:44s} {n:4d} {r['value']:8.2f} {speed:>8s} {eff:>6s} {comm:7.2f} {peaks:>18s}  {text}")
        if len(ranks) > 1:
            for i, x in enumerate(ranks):
                ph = " ".join(f"{k}={v:.1f}" for k, v in x.get("phases", {}).items())
                print(f"{'  rank ' + str(i):44s} {'':4s} {x['seconds']:8.2f} {'':8s} {'':6s} {x['comm_s']:7.2f} {x['peak_gib']:>18}  {ph}")
    return extra


def _split_table(recs: list[dict]) -> None:
    """Print the split-model runs: time, edits or tokens, time per edit, peak memory per GPU."""
    shown = set()
    print(f"\n{'split run':36s} {'GPUs':>4s} {'seconds':>8s} {'edits':>6s} {'s/edit':>7s} {'tokens':>9s} {'peak GiB per GPU':>16s}  phases (s)")
    for r in recs:
        p = r.get("params", {})
        ph = p.get("phase", {})
        tokens = (r.get("shape") or {}).get("tokens", "")
        per_edit = f"{r['value'] / r['n_edits']:.3f}" if r.get("n_edits") else ""
        peaks = ",".join(map(str, ph.get("peak_gib_per_gpu", [])))
        text = " ".join(f"{k}={v:.1f}" for k, v in ph.get("phases", {}).items())
        if r.get("extrapolated"):
            text = f"EXTRAPOLATED from {p.get('from_edits')} edits, not measured"
        print(f"{r['name'][:36]:36s} {p.get('gpus', 1):4d} {r['value']:8.1f} {r.get('n_edits') or '':>6} {per_edit:>7s} {tokens:>9} {peaks:>16s}  {text}")
        if "blocks_per_gpu" in p and r.get("model") not in shown:
            shown.add(r.get("model"))
            print(f"{'':36s} blocks per GPU {p['blocks_per_gpu']}, edited layers {p.get('layers')} on {sorted(set(p.get('layer_devices', {}).values()))}, "
                  f"weights GiB per GPU {p.get('weights_gib_per_gpu')}, built in {p.get('build_s')} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("dp", "split"):
        p = sub.add_parser(name)
        p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (gloo): proves the script")
        p.add_argument("--tokenizer", default=None, help="tokenizer directory (default .device/tokenizer)")
        p.add_argument("--records", default=None, help="records file to append to (benchmarks/results_store.py)")
    dp, split = sub.choices["dp"], sub.choices["split"]
    dp.add_argument("--model", default="gpt-j-6b", choices=synthetic.MODELS)
    dp.add_argument("--stats-tokens", type=int, default=2_000_000, help="tokens of the statistics pass (0: none)")
    dp.add_argument("--edits", type=int, default=2000, help="edits (0: none)")
    dp.add_argument("--z-steps", type=int, default=0, help="z's optimisation steps (0: the preset's; 1: z is one forward, which times the "
                    "other phases of a large batch quickly)")
    dp.add_argument("--prefix-cache", choices=["templates", "per-row", "shared"], default=None,
                    help="z's prefix cache (default: the library's): per row built from the templates computed once, per row from whole "
                         "prefixes, or the templates held once")
    dp.add_argument("--profile-rows", type=int, default=0, help="rank 0 profiles the edits (torch.profiler; its times then include the "
                    "profiler's overhead) and prints this many rows")
    split.add_argument("--model", default="neox-20b", choices=list(SPLIT_MODELS))
    split.add_argument("--gpus", type=int, default=2)
    split.add_argument("--stats-tokens", type=int, default=1_000_000, help="tokens of the statistics pass (0: none; the edits then use synthetic statistics)")
    split.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per statistics forward")
    split.add_argument("--edits", type=int, default=1000, help="edits (0: none)")
    split.add_argument("--layers", type=int, default=None, help="edit only the last N of the preset's critical layers (memory: their statistics share a GPU)")
    s = sub.add_parser("summary")
    s.add_argument("--records", required=True)
    s.add_argument("--append-scaling", action="store_true", help="append the scaling-efficiency records to --records")
    args = ap.parse_args(argv)
    if args.cmd == "dp" and args.z_steps < 0:
        ap.error(f"--z-steps must be 0 (the preset's) or more, got {args.z_steps}")
    return {"dp": cmd_dp, "split": cmd_split, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
