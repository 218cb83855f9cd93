"""Caches: the tensor data are checksummed, the fingerprint sees every element, an unwritable
cache warns and keeps the statistics in memory, concurrent writers and converters both succeed,
and a missing corpus file is named as such."""

import json
import multiprocessing
import os
import re
import struct
import time

import numpy as np
import pytest
import torch

import memit_fast
import tiny
from memit_fast import cache, default_model
from memit_fast.cache import CacheWarning, LayerStats, StatsKey, load_stats, model_fingerprint, save_stats
from memit_fast.corpus import load_corpus
from memit_fast.errors import StatsError


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _unchanged(m, snap):
    return all(torch.equal(p, snap[n]) for n, p in m.named_parameters())


def _stats(m, hp, cache_dir, **kw):
    return memit_fast.compute_stats(m, tiny.tokenizer(), hp, corpus=tiny.corpus_lines(30), cache_dir=cache_dir, progress=False, **kw)


def _data_offset(path) -> int:
    """Where a safetensors file's tensor data start: after the 8-byte header length and the header."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_flipped_bytes_in_the_tensor_data_are_refused(arch, tmp_path):
    m = tiny.model(arch, dtype=torch.float32)
    hp = tiny.hparams(m, v_num_grad_steps=2)
    _stats(m, hp, tmp_path)
    path = sorted(tmp_path.rglob("*.safetensors"))[0]
    start, size = _data_offset(path), path.stat().st_size
    raw = bytearray(path.read_bytes())
    raw[start + (size - start) // 2] ^= 0x01  # one bit of one value, mid-matrix: still finite
    path.write_bytes(bytes(raw))
    before = _snapshot(m)
    with pytest.raises(StatsError, match=r"is corrupted: its tensor data do not match the stored checksum; delete it to recompute"):
        load_stats(path)
    with pytest.raises(StatsError, match="is corrupted"):
        memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, corpus=tiny.corpus_lines(30), cache_dir=tmp_path, context_templates=tiny.TEMPLATES, progress=False)
    assert _unchanged(m, before)


def test_file_without_checksum_is_refused(tmp_path):
    from safetensors.torch import save_file

    key = StatsKey("fp", "m.layers.2", "c", 1, 8, "float32")
    path = key.path(tmp_path)
    path.parent.mkdir(parents=True)
    save_file({"mom2": torch.eye(4)}, str(path), metadata=key.as_metadata() | {"count": "10", "format": "1"})
    with pytest.raises(StatsError, match=r"has no checksum \(format 1, this version writes 2\); delete it to recompute"):
        load_stats(path, key)
    save_stats(path, key, LayerStats(torch.eye(4), 10))
    assert torch.equal(load_stats(path, key).mom2, torch.eye(4))


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_fingerprint_sees_every_element(arch):
    m = tiny.model(arch, dtype=torch.float32)
    hp = tiny.hparams(m)
    fp = model_fingerprint(m, hp)
    assert model_fingerprint(m, hp) == fp
    assert model_fingerprint(tiny.model(arch, dtype=torch.bfloat16), hp) == fp  # bf16-rounded: a bf16 copy shares statistics
    edited = dict(m.named_parameters())[hp.rewrite_module_tmp.format(2) + ".weight"]
    with torch.no_grad():
        edited.add_(1.0)
    assert model_fingerprint(m, hp) == fp  # the edited matrices are left out
    rng = np.random.default_rng(0)
    left_out = re.compile(re.escape(hp.rewrite_module_tmp).replace(r"\{\}", r"\d+") + r"\.")  # every layer's MLP output projection
    for name, p in m.named_parameters():
        if left_out.match(name):
            continue
        i = int(rng.integers(p.numel()))  # a random element, almost never one the old 257-value sample read
        flat = p.detach().view(-1)
        old = flat[i].clone()
        with torch.no_grad():
            flat[i] = old * 1.5 + 0.25  # a change visible in bfloat16
        assert model_fingerprint(m, hp) != fp, name
        with torch.no_grad():
            flat[i] = old
    assert model_fingerprint(m, hp) == fp


def _reference_sums(x: torch.Tensor) -> np.ndarray:
    """_param_sums in exact integer arithmetic (numpy int64, no float rounding possible)."""
    bits = x.to(torch.bfloat16).view(torch.int16).reshape(-1).numpy().astype(np.int64)
    w = cache._weights(cache._CHUNK, "cpu").numpy().astype(np.int64)
    n_chunks = -(-bits.size // cache._CHUNK)
    v = cache._chunk_weights(0, n_chunks).numpy().astype(np.int64)
    total = np.zeros(cache._N_SUMS, np.int64)
    for j in range(n_chunks):
        chunk = bits[j * cache._CHUNK : (j + 1) * cache._CHUNK]
        s = np.fmod(chunk @ w[: chunk.size], cache._PRIME)
        total = np.fmod(total + np.fmod(s * v[j], cache._PRIME), cache._PRIME)
    return total


def test_fingerprint_sums_are_exact_and_block_independent(monkeypatch):
    x = torch.randn(5 * cache._CHUNK + 123) * 50
    def canonical(sums):
        return np.mod(np.asarray(sums).astype(np.int64), cache._PRIME)

    got = cache._param_sums(x).numpy()
    assert np.all(np.abs(got) < cache._PRIME) and np.array_equal(got, np.round(got))
    assert np.array_equal(canonical(got), canonical(_reference_sums(x)))
    monkeypatch.setattr(cache, "_BLOCK_CHUNKS", 2)  # blocks end inside the tensor: same sums
    assert np.array_equal(canonical(cache._param_sums(x).numpy()), canonical(got))


def test_unwritable_cache_warns_and_keeps_statistics_in_memory(tmp_path, monkeypatch):
    m = tiny.model("llama", dtype=torch.float32)
    hp = tiny.hparams(m)
    expected = _stats(m, hp, None, use_cache=False)
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache directory should be")  # like a read-only cache: mkdir fails
    with pytest.warns(CacheWarning, match="cannot be written .*the statistics are kept in memory only"):
        got = _stats(m, hp, not_a_dir)
    assert all(torch.equal(got[layer].mom2, expected[layer].mom2) for layer in hp.layers)

    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.warns(CacheWarning, match="No space left on device"):
        got = _stats(m, hp, tmp_path / "full")
    assert all(torch.equal(got[layer].mom2, expected[layer].mom2) for layer in hp.layers)
    assert not list((tmp_path / "full").rglob("*.tmp")) and not list((tmp_path / "full").rglob("*.safetensors"))


def _write_same_stats(cache_dir: str, seed: int, barrier) -> str:
    key = StatsKey("fp", "m.layers.2", "c", 1, 8, "float32")
    mom2 = torch.eye(512) * 2.0
    barrier.wait()
    for _ in range(20):
        save_stats(key.path(cache_dir), key, LayerStats(mom2, 10))
        load_stats(key.path(cache_dir), key)
    return "ok"


def _fake_convert(src, dest):
    time.sleep(1.0)
    with open(os.path.join(os.path.dirname(dest), "conversions.log"), "a") as f:
        f.write(f"{os.getpid()}\n")
    (dest / "config.json").write_text(json.dumps({"converted_from": str(src)}))


def _convert_default(cache_dir: str, gguf: str, barrier) -> str:
    os.environ["MEMIT_FAST_DEFAULT_GGUF"] = gguf
    default_model._convert_into = _fake_convert
    barrier.wait()
    return str(default_model.convert(cache_dir))


def _run_two(target, *args):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            results = [pool.apply_async(target, args + (barrier,)) for _ in range(2)]
            return [r.get(timeout=300) for r in results]


def test_two_processes_write_the_same_statistics(tmp_path):
    assert _run_two(_write_same_stats, str(tmp_path), 0) == ["ok", "ok"]
    key = StatsKey("fp", "m.layers.2", "c", 1, 8, "float32")
    assert torch.equal(load_stats(key.path(tmp_path), key).mom2, torch.eye(512) * 2.0)
    assert not list(tmp_path.rglob("*.tmp"))


def test_two_processes_convert_the_default_model(tmp_path):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    out = _run_two(_convert_default, str(tmp_path / "cache"), str(gguf))
    assert out[0] == out[1] and os.path.exists(os.path.join(out[0], "config.json"))
    assert len((tmp_path / "cache" / "models" / "conversions.log").read_text().split()) == 1  # converted once


@pytest.mark.parametrize("spec", ["data/missing.txt", "./missing", "/no/such/dir/corpus", "missing.jsonl", "wiki.test.raw", "~/no-such-corpus.json"])
def test_missing_corpus_file_is_named(spec):
    with pytest.raises(StatsError, match=f"corpus file not found: {spec}"):
        load_corpus(spec, 3)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_missing_corpus_file_refused_before_any_work(arch, tmp_path, monkeypatch):
    from memit_fast import api

    monkeypatch.setattr(api, "generate_context_templates", lambda *a, **k: pytest.fail("work started"))
    m = tiny.model(arch, dtype=torch.float32)
    before = _snapshot(m)
    missing = str(tmp_path / "corpus.txt")
    with pytest.raises(StatsError, match=f"corpus file not found: {missing}"):
        memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, tiny.hparams(m), corpus=missing, cache_dir=tmp_path, progress=False)
    with pytest.raises(StatsError, match="corpus file not found: nowhere/corpus.txt"):
        memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, tiny.hparams(m, mom2_dataset="nowhere/corpus.txt"), cache_dir=tmp_path, progress=False)
    assert _unchanged(m, before)


def test_hub_dataset_names_are_not_paths():
    from memit_fast.corpus import looks_like_path

    assert not any(looks_like_path(s) for s in ("wikipedia", "wikitext", "wikimedia/wikipedia", "wikitext:wikitext-2-raw-v1", "model"))
