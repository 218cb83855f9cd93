"""Covariance statistics C^l = E[k k^T] of the keys of each critical layer (docs/algorithm.md section 4).

Fast path: ONE forward pass per batch of text captures the keys of all requested layers at once
and stops after the last of them; padding is masked out; each layer's keys stream into a
`CovarianceAccumulator` (float32 products on tensor cores, float64 sum, token count). The reference path (`one_pass_per_layer`)
does what the original does: one pass per layer, stopped at that layer.

Results are cached (`memit_fast.cache`) as safetensors, one file per layer, keyed by the model's
fingerprint, the layer's module, the corpus id, the sample count, the sequence-length cap and
the dtype; the key and a checksum are stored inside the file and checked on load, and files are
written atomically.
Statistics are sums: with several ranks (memit_fast.distributed) each accumulates its share of
the documents and the float64 sums and counts are all-reduced before the mean; rank 0 alone
writes the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .cache import LayerStats, StatsKey, check_stats, default_cache_dir, load_stats, model_fingerprint, save_stats
from .corpus import is_local, load_corpus, remote_corpus_id
from .hparams import MEMITHyperParams
from .layouts import layout_for
from .model_access import in_features, model_device, rewrite_weights
from .ops import CovarianceAccumulator
from .tokens import length_batches, pad_id, pad_right

log = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 1024
MODEL_SAMPLE_LENGTH = 64  # tokens per document when the corpus is sampled from the model


def _accumulate(layout, tok, module_names: dict[int, str], texts, max_length: int, batch_tokens: int, progress: bool, desc: str) -> dict[str, CovarianceAccumulator]:
    """One pass per batch of documents through `layout`, ending at the last layer's key; every
    layer's keys at the real tokens go to its accumulator (the Triton kernel on CUDA reads the
    masked rows in place). Documents are tokenised by a background thread, a group ahead of the
    GPU (`_token_batches`)."""
    device, dtype = layout.device, layout.dtype
    layers = sorted(module_names)
    # each layer's sums live on its W_out's device (a model split over GPUs: that layer's GPU)
    accs = {module_names[i]: CovarianceAccumulator(in_features(layout.w_out(i)), layout.w_out(i).weight.device, dtype) for i in layers}
    state = {}

    def consume(layer, keys):
        mask = state["mask"]
        if mask.device != keys.device:
            mask = state.setdefault(keys.device, mask.to(keys.device))
        with distributed.device_guard(keys.device):
            accs[module_names[layer]].add(keys, mask=mask)

    with torch.no_grad(), tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
        for rows in _token_batches(tok, texts, max_length, batch_tokens):
            ids, mask = pad_right(rows, pad_id(tok), device)
            state.clear()
            state["mask"] = mask.bool()
            layout.mlp_keys(ids, mask, layers, consume)
            bar.update(sum(map(len, rows)))
    return accs


TOKENISE_GROUP = 1024  # documents tokenised in one call of the tokenizer (a fast tokenizer's batch runs in Rust threads)


def _token_batches(tok, texts, max_length: int, batch_tokens: int):
    """Batches of token rows (at most batch_tokens padded tokens each, similar lengths together),
    tokenised by a background thread one group of TOKENISE_GROUP documents ahead of the consumer,
    so the GPU does not wait for the CPU."""
    import queue
    import threading

    done = object()
    ready: queue.Queue = queue.Queue(maxsize=2)

    def produce():
        try:
            for start in range(0, len(texts), TOKENISE_GROUP):
                group = [e for e in tok(list(texts[start : start + TOKENISE_GROUP]), truncation=True, max_length=max_length)["input_ids"] if e]
                ready.put([[group[i] for i in b] for b in length_batches([len(d) for d in group], batch_tokens)])
            ready.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put(e)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    while (item := ready.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield from item
    worker.join()


def compute_stats(
    model,
    tok,
    hparams: MEMITHyperParams | None = None,
    layers: list[int] | None = None,
    *,
    corpus=None,
    n_samples: int | None = None,
    max_length: int | None = None,
    batch_tokens: int | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    one_pass_per_layer: bool = False,
    seed: int = 0,
    progress: bool = True,
    layout=None,
) -> dict[int, LayerStats]:
    """E[k k^T] for each layer in `layers` (default hparams.layers), loaded from the cache or computed.

    corpus: see `memit_fast.corpus` (default hparams.mom2_dataset); n_samples: documents
    (default hparams.mom2_n_samples); max_length: tokens per document (default min(model context,
    1024)); batch_tokens: padded tokens per forward pass. one_pass_per_layer: the original's
    structure (one pass per layer through HF's own forward), the reference for tests.
    layout: the model's `memit_fast.layouts` layout (resolved here when not given).
    """
    from .presets import for_model

    hparams = hparams or for_model(model)
    layers = list(hparams.layers if layers is None else layers)
    rewrite_weights(model, hparams.replace(layers=sorted(set(layers))))  # checks layers and module names
    corpus = hparams.mom2_dataset if corpus is None else corpus
    n_samples = hparams.mom2_n_samples if n_samples is None else n_samples
    max_length = max_length or (MODEL_SAMPLE_LENGTH if corpus == "model" else _context_cap(model))
    batch_tokens = batch_tokens or (32768 if model_device(model).type == "cuda" else 4096)
    dtype = getattr(torch, hparams.mom2_dtype)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    local = load_corpus(corpus, n_samples) if is_local(corpus) else None  # read once: id and texts
    corpus_id = local.id if local else remote_corpus_id(corpus, max_length, seed)
    fp = model_fingerprint(model, hparams)
    keys = {layer: StatsKey(fp, hparams.rewrite_module_tmp.format(layer), corpus_id, n_samples, max_length, hparams.mom2_dtype) for layer in layers}
    out: dict[int, LayerStats] = {}
    if use_cache:
        for layer, key in keys.items():
            if key.path(cache_dir).exists():
                out[layer] = load_stats(key.path(cache_dir), key)
                log.info("statistics of layer %d loaded from %s", layer, key.path(cache_dir))
    todo = distributed.union([layer for layer in layers if layer not in out])  # several ranks: what any rank lacks
    if not todo:
        return out

    layout = layout_for(model, hparams, generic=one_pass_per_layer) if layout is None or one_pass_per_layer else layout
    if local is None:  # sampled or downloaded by rank 0 (one process: by it), then sent to every rank
        def fetch():
            return load_corpus(corpus, n_samples, model=model, tok=tok, max_length=max_length, seed=seed, progress=progress).texts if distributed.rank() == 0 else None

        texts = distributed.broadcast_object(distributed.agreed("the statistics corpus", fetch))
    else:
        texts = local.texts
    mine, _ = distributed.my_share([len(t) for t in texts])  # several ranks: each its share of the documents
    texts = [texts[i] for i in mine] if len(mine) < len(texts) else texts
    groups = [[layer] for layer in todo] if one_pass_per_layer else [todo]
    for group in groups:
        names = {layer: keys[layer].module for layer in group}
        desc = f"statistics, layer{'s' if len(group) > 1 else ''} {','.join(map(str, group))}"
        accs = distributed.agreed("statistics", _accumulate, layout, tok, names, texts, max_length, batch_tokens, progress, desc)
        for name in names.values():
            distributed.all_reduce_sum_(*accs[name].state())  # float64 sums and counts of every rank's documents
        for layer, name in names.items():
            stats = LayerStats(accs[name].mean().to(dtype), accs[name].count)
            check_stats(stats.mom2, stats.count, f"layer {layer}")
            out[layer] = stats
            log.info("statistics of layer %d computed over %d tokens of corpus %s", layer, stats.count, corpus_id)
            if use_cache and distributed.rank() == 0 and save_stats(keys[layer].path(cache_dir), keys[layer], stats):
                log.info("statistics of layer %d written to %s", layer, keys[layer].path(cache_dir))
    return {layer: out[layer] for layer in layers}


def _context_cap(model) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if value:
            return min(int(value), DEFAULT_MAX_LENGTH)
    return DEFAULT_MAX_LENGTH
