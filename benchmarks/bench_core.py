"""pytest-benchmark: the core stages of an edit, memit_fast against the reference mode, per model
shape (GPT-J 6B / GPT-2 XL / Llama-3-8B configs, random weights) and dtype.

    pytest benchmarks/bench_core.py --benchmark-json=OUT.json    # CUDA: real shapes (one model on the GPU at a time)
    pytest benchmarks/ --benchmark-disable                       # CPU smoke (CI): tiny configs, one call each
    pytest benchmarks/bench_core.py --records OUT/records.jsonl  # each result also as records (results_store.py)

Stages: z (memit_fast's batched `compute_targets` vs the per-request `reference_z`, a few
optimisation steps), key capture for one layer (`keys.KeyReader` vs
`reference_keys_and_values`, tokenisation included in both), statistics accumulation
(`compute_stats`: one fused pass for all layers vs one pass per layer, the original's structure).
extra_info: device, versions, commit, the sizes, and edits/s, tokens/s or TFLOP/s (z: the
matrix-product work of benchmarks/synthetic.z_work) from the median. The providers run
different numbers of requests (the reference is one at a time): compare the per-second figures.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic  # noqa: E402
from bench_kernels import run  # noqa: E402 - timing with device, versions and commit in extra_info

from memit_fast.edit_requests import normalize_requests  # noqa: E402
from memit_fast.keys import KeyReader, key_rows  # noqa: E402
from memit_fast.layouts import layout_for  # noqa: E402
from memit_fast.templates import flatten  # noqa: E402
from memit_fast.tokens import encode_requests  # noqa: E402
from memit_fast.presets import for_model  # noqa: E402
from memit_fast.reference import reference_keys_and_values, reference_z  # noqa: E402
from memit_fast.stats import compute_stats  # noqa: E402
from memit_fast.targets import compute_targets  # noqa: E402

PROVIDERS = ["reference", "memit_fast"]
DTYPES = ["bfloat16", "float32"]
if CUDA:
    SIZES = dict(z_fast=128, z_ref=2, z_steps=5, keys_fast=1000, keys_ref=100, stats_tokens=65536, max_length=2048, rounds=3)
else:
    SIZES = dict(z_fast=4, z_ref=1, z_steps=2, keys_fast=8, keys_ref=2, stats_tokens=512, max_length=256, rounds=1)


@dataclass
class Setup:
    name: str
    dtype: str
    model: object
    tok: object
    hp: object
    records: list


@pytest.fixture(scope="module", params=[(m, d) for m in synthetic.MODELS for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request):
    """One model at a time (tests are grouped by this module-scoped fixture)."""
    name, dtype = request.param
    model, _ = synthetic.build_model(name, tiny=not CUDA, dtype=getattr(torch, dtype))
    s = Setup(name, dtype, model, synthetic.load_tokenizer(fallback_ok=True), None, synthetic.load_records(fallback_ok=True))
    s.hp = for_model(model).replace(v_num_grad_steps=SIZES["z_steps"])
    yield s
    del s.model, model
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_z(benchmark, setup, provider):
    """Target vectors z: SIZES["z_steps"] Adam steps per request (random weights: no early stop)."""
    n = SIZES["z_fast"] if provider == "memit_fast" else SIZES["z_ref"]
    raw = synthetic.make_requests(setup.records, n)
    reqs = normalize_requests(raw)
    if provider == "memit_fast":
        enc = encode_requests(setup.tok, reqs, flatten(synthetic.TEMPLATES), setup.hp.fact_token)
        fn = lambda: compute_targets(setup.model, setup.tok, enc, setup.hp, progress=False)  # noqa: E731
    else:
        fn = lambda: [reference_z(setup.model, setup.tok, r, setup.hp, synthetic.TEMPLATES) for r in reqs]  # noqa: E731
    work = synthetic.z_work(setup.model, setup.tok, raw, setup.hp, synthetic.TEMPLATES)
    steps = setup.hp.v_num_grad_steps
    run(benchmark, fn, kind="stage", rounds=SIZES["rounds"], flops=work.flops, per_s={"edits_per_s": n, "request_steps_per_s": n * steps},
          model=setup.name, dtype=setup.dtype, provider=provider, requests=n, steps=steps, suffix_tokens_per_step=work.suffix_tokens,
          flops_note="matrix products of the least work (synthetic.z_work), the same numerator for both providers")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_key_capture(benchmark, setup, provider):
    """Keys k^l of the first critical layer and block-L outputs, all templates, tokenisation included."""
    n = SIZES["keys_fast"] if provider == "memit_fast" else SIZES["keys_ref"]
    reqs = normalize_requests(synthetic.make_requests(setup.records, n))
    layer = setup.hp.layers[0]
    rows = key_rows(encode_requests(setup.tok, reqs, flatten(synthetic.TEMPLATES), setup.hp.fact_token))
    if provider == "memit_fast":
        def fn():
            r = key_rows(encode_requests(setup.tok, reqs, flatten(synthetic.TEMPLATES), setup.hp.fact_token))
            layout = layout_for(setup.model, setup.hp)
            return KeyReader(setup.model, layout, setup.tok, r, n, setup.hp.layers[-1], synthetic.TEMPLATES).read(layer)
    else:
        fn = lambda: reference_keys_and_values(setup.model, setup.tok, reqs, setup.hp, layer, synthetic.TEMPLATES)  # noqa: E731
    run(benchmark, fn, kind="stage", rounds=SIZES["rounds"], per_s={"edits_per_s": n, "prompt_tokens_per_s": sum(map(len, rows))},
          model=setup.name, dtype=setup.dtype, provider=provider, requests=n, layer=layer, prompts=len(rows))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_statistics(benchmark, setup, provider):
    """compute_stats over random-token documents: one fused pass (memit_fast) vs one pass per layer (reference)."""
    docs = synthetic.random_documents(setup.tok, SIZES["stats_tokens"], max_length=SIZES["max_length"], seed=3)
    kw = dict(corpus=docs, n_samples=len(docs), max_length=SIZES["max_length"], use_cache=False, progress=False)
    tokens = sum(len(setup.tok(t, truncation=True, max_length=SIZES["max_length"])["input_ids"]) for t in docs)
    fn = lambda: compute_stats(setup.model, setup.tok, setup.hp, one_pass_per_layer=provider == "reference", **kw)  # noqa: E731
    run(benchmark, fn, kind="stage", rounds=SIZES["rounds"], per_s={"tokens_per_s": tokens},
          model=setup.name, dtype=setup.dtype, provider=provider, tokens=tokens, documents=len(docs), layers=setup.hp.layers)
