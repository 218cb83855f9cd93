"""Covariance statistics: one fused pass equals one pass per layer and a per-document computation;
the cache is keyed, checked and atomic."""

import os

import pytest
import torch

import memit_fast
import tiny
from memit_fast import stats as stats_mod
from memit_fast.errors import StatsError
from memit_fast.cache import StatsKey, load_stats, model_fingerprint


def _per_document(m, hp, texts):
    """E[k k^T] from each document run alone (no padding), float64."""
    tok = tiny.tokenizer()
    out = {}
    for layer in hp.layers:
        total, count = 0, 0
        module = m.get_submodule(hp.rewrite_module_tmp.format(layer))
        for t in texts:
            got = []
            h = module.register_forward_pre_hook(lambda _m, a: got.append(a[0][0].double()))
            with torch.no_grad():
                m(input_ids=torch.tensor([tok(t)["input_ids"][:256]]))  # the models' context
            h.remove()
            total = total + got[0].T @ got[0]
            count += got[0].shape[0]
        out[layer] = (total / count, count)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fused_pass_equals_per_layer_and_unpadded(arch):
    m = tiny.model(arch, dtype=torch.float32)
    hp = tiny.hparams(m, layers=[1, 3])
    texts = tiny.corpus_lines(40)
    # A small batch budget forces many padded batches of different lengths.
    fused = memit_fast.compute_stats(m, tiny.tokenizer(), hp, corpus=texts, batch_tokens=300, use_cache=False, progress=False)
    per_layer = memit_fast.compute_stats(m, tiny.tokenizer(), hp, corpus=texts, batch_tokens=5000, use_cache=False, progress=False, one_pass_per_layer=True)
    plain = _per_document(m, hp, texts)
    for layer in hp.layers:
        ref, count = plain[layer]
        assert fused[layer].count == per_layer[layer].count == count
        for s in (fused[layer], per_layer[layer]):
            assert s.mom2.dtype == torch.float32
            assert (s.mom2.double() - ref).norm() / ref.norm() < 1e-5


def test_cache_hit_key_check_corruption(tmp_path, monkeypatch):
    m = tiny.model("llama", dtype=torch.float32)
    hp = tiny.hparams(m)
    texts = tiny.corpus_lines(30)
    kw = dict(corpus=texts, cache_dir=tmp_path, progress=False)
    first = memit_fast.compute_stats(m, tiny.tokenizer(), hp, **kw)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == len(hp.layers)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files

    def no_forward(*a, **k):
        raise AssertionError("statistics recomputed despite the cache")

    monkeypatch.setattr(stats_mod, "_accumulate", no_forward)
    again = memit_fast.compute_stats(m, tiny.tokenizer(), hp, **kw)
    for layer in hp.layers:
        assert torch.equal(first[layer].mom2, again[layer].mom2) and first[layer].count == again[layer].count
    # Another sample count is another key: recomputed (here: refused by the patched _accumulate).
    with pytest.raises(AssertionError, match="recomputed"):
        memit_fast.compute_stats(m, tiny.tokenizer(), hp, n_samples=10, **kw)

    fp = model_fingerprint(m, hp)
    key = StatsKey(fp, hp.rewrite_module_tmp.format(2), "some-other-corpus", 30, 256, "float32")
    with pytest.raises(StatsError, match="does not match"):
        load_stats(files[0], key)
    files[0].write_bytes(b"not a safetensors file")
    with pytest.raises(StatsError, match="cannot be read"):
        memit_fast.compute_stats(m, tiny.tokenizer(), hp, **kw)


def test_nan_statistics_refused(tmp_path):
    from memit_fast.cache import LayerStats, save_stats

    key = StatsKey("fp", "m.layers.2", "c", 1, 8, "float32")
    bad = torch.eye(4)
    bad[1, 1] = float("inf")
    save_stats(key.path(tmp_path), key, LayerStats(bad, 10))
    with pytest.raises(StatsError, match="NaN or inf"):
        load_stats(key.path(tmp_path), key)


def test_fingerprint_identity():
    m = tiny.model("gpt2", dtype=torch.float32)
    hp = tiny.hparams(m)
    fp = model_fingerprint(m, hp)
    assert model_fingerprint(tiny.model("gpt2", dtype=torch.float32, seed=1), hp) != fp
    assert model_fingerprint(tiny.model("gpt2", dtype=torch.bfloat16), hp) == fp  # dtype-independent
    with torch.no_grad():
        m.transformer.h[2].mlp.c_proj.weight.add_(1.0)  # an edit keeps the statistics valid
    assert model_fingerprint(m, hp) == fp
    with torch.no_grad():
        m.transformer.h[2].mlp.c_fc.weight.add_(1.0)
    assert model_fingerprint(m, hp) != fp


def test_sequence_length_cap():
    m = tiny.model("llama", dtype=torch.float32)
    m.config.max_position_embeddings = 131072
    assert stats_mod._context_cap(m) == stats_mod.DEFAULT_MAX_LENGTH
    hp = tiny.hparams(m, layers=[1])
    long_text = [" ".join(tiny.corpus_lines(200))]
    s = memit_fast.compute_stats(m, tiny.tokenizer(), hp, corpus=long_text, max_length=50, use_cache=False, progress=False)
    assert s[1].count == 50


def test_corpus_sources(tmp_path):
    from memit_fast.corpus import load_corpus

    f = tmp_path / "docs.txt"
    f.write_text("first doc\n\nsecond doc\nthird\n", encoding="utf-8")
    c = load_corpus(f, 2)
    assert c.texts == ["first doc", "second doc"] and c.id.startswith("file-docs.txt-")
    assert load_corpus(["a", "", "b"], 5).texts == ["a", "b"]
    m = tiny.model("llama", dtype=torch.float32)
    sampled = load_corpus("model", 5, model=m, tok=tiny.tokenizer(), max_length=12, seed=1, progress=False)
    assert len(sampled.texts) == 5 and sampled.texts == load_corpus("model", 5, model=m, tok=tiny.tokenizer(), max_length=12, seed=1, progress=False).texts
    from memit_fast.corpus import sample_texts

    assert sample_texts(m, tiny.tokenizer(), 5, 12, seed=1, batch_size=2, progress=False) == sampled.texts  # batching-independent
    with pytest.raises(StatsError):
        load_corpus("surely-not-a-dataset-name-xyz", 3)
    with pytest.raises(StatsError, match="no text"):
        (tmp_path / "empty.txt").write_text("\n\n")
        load_corpus(tmp_path / "empty.txt", 3)
    assert os.path.exists(f)
