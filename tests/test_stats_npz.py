"""The original's .npz statistics: export, import into the cache (where compute_stats finds them), errors."""

import numpy as np
import pytest
import torch

import memit_fast
import tiny
from memit_fast.errors import StatsError
from memit_fast.cache import LayerStats
from memit_fast.stats_npz import export_npz, find_npz, import_npz, read_npz


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_round_trip_through_the_original_format(arch, tmp_path):
    m = tiny.model(arch, dtype=torch.float32)
    hp = tiny.hparams(m)
    stats = tiny.stats(m, hp, n_lines=30)
    files = export_npz(tmp_path / "stats", m, stats, hp, model_name="org/tiny")
    for layer, path in files.items():
        module = hp.rewrite_module_tmp.format(layer)
        assert path == tmp_path / "stats" / "org_tiny" / "wikipedia_stats" / f"{module}_float32_mom2_100000.npz"
        with np.load(path, allow_pickle=False) as f:
            assert set(f.files) == {"constructor", "mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"}
            assert int(f["mom2.count"]) == stats[layer].count and int(f["sample_size"]) == 100000
            # The original stores the SUM of k k^T; SecondMoment.moment() divides by the count.
            torch.testing.assert_close(torch.from_numpy(f["mom2.mom2"]) / stats[layer].count, stats[layer].mom2, rtol=1e-5, atol=1e-7)

    cached = import_npz(tmp_path / "stats", m, hp, cache_dir=tmp_path / "cache")
    assert sorted(cached) == hp.layers and all(p.exists() for p in cached.values())
    # Keyed as compute_stats looks them up: found in the cache, nothing computed (no tokenizer given).
    loaded = memit_fast.compute_stats(m, None, hp, cache_dir=tmp_path / "cache", progress=False)
    for layer in hp.layers:
        assert loaded[layer].count == stats[layer].count
        torch.testing.assert_close(loaded[layer].mom2, stats[layer].mom2, rtol=1e-5, atol=1e-7)


def _original_file(path, total, count, **extra):
    """A file as the original's layer_stats writes it (np.savez of CombinedStat(mom2=SecondMoment()).state_dict())."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{"constructor": np.array("util.runningstats.CombinedStat()"), "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(count), "mom2.mom2": total, "sample_size": np.array(1000)} | extra)
    return path


def test_reads_the_original_state_dict_and_plain_keys(tmp_path):
    k = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    total = k.T @ k
    a = read_npz(_original_file(tmp_path / "a.npz", total, 50))
    torch.testing.assert_close(a.mom2, torch.from_numpy(total).double() / 50)
    assert a.count == 50 and a.mom2.dtype == torch.float64
    np.savez(tmp_path / "b.npz", mom2=total, count=np.array(50))
    torch.testing.assert_close(read_npz(tmp_path / "b.npz").mom2, a.mom2)
    # A key the import does not need may hold a pickled object: it is never loaded.
    b = read_npz(_original_file(tmp_path / "c.npz", total, 50, note=np.array([None], dtype=object)))
    torch.testing.assert_close(b.mom2, a.mom2)


def test_single_file_imports_one_layer_under_the_file_n(tmp_path):
    m = tiny.model("llama", dtype=torch.float32)
    hp = tiny.hparams(m)
    k = np.random.default_rng(1).standard_normal((300, 96))
    path = _original_file(tmp_path / "x" / "wikitext_stats" / "model.layers.3.mlp.down_proj_float32_mom2_t768_5000.npz", k.T @ k, 300)
    (cached,) = import_npz(path, m, hp, layers=[3], cache_dir=tmp_path / "cache").values()
    loaded = memit_fast.compute_stats(m, None, hp.replace(mom2_dataset="wikitext", mom2_n_samples=5000), layers=[3], cache_dir=tmp_path / "cache", progress=False)
    torch.testing.assert_close(loaded[3].mom2, torch.from_numpy(k.T @ k / 300).float())
    assert cached.exists()
    with pytest.raises(StatsError, match="one file"):
        import_npz(path, m, hp, cache_dir=tmp_path / "cache")


def test_errors(tmp_path):
    m = tiny.model("gpt2", dtype=torch.float32)
    hp = tiny.hparams(m, layers=[2])
    module = hp.rewrite_module_tmp.format(2)
    folder = tmp_path / "stats" / "gpt2" / "wikipedia_stats"
    with pytest.raises(StatsError, match="no statistics file for transformer.h.2.mlp.c_proj"):
        import_npz(tmp_path, m, hp, cache_dir=tmp_path / "cache")
    with pytest.raises(StatsError, match="neither a statistics file nor a folder"):
        import_npz(tmp_path / "nowhere", m, hp, cache_dir=tmp_path / "cache")
    with pytest.raises(StatsError, match="not found"):
        read_npz(tmp_path / "missing.npz")

    bad = _original_file(folder / f"{module}_float32_mom2_1000.npz", np.eye(10, dtype=np.float32), 5)  # d_ff is 256
    with pytest.raises(StatsError, match=r"\(10, 10\), but transformer.h.2.mlp.c_proj has d_ff=256"):
        import_npz(tmp_path / "stats", m, hp, cache_dir=tmp_path / "cache")
    _original_file(bad, np.eye(256, dtype=np.float32), 0)
    with pytest.raises(StatsError, match="over 0 tokens"):
        import_npz(tmp_path / "stats", m, hp, cache_dir=tmp_path / "cache")
    np.savez(bad, **{"mom2.mom2": np.array([np.eye(256)], dtype=object), "mom2.count": np.array(5)})
    with pytest.raises(StatsError, match="need pickle"):
        import_npz(tmp_path / "stats", m, hp, cache_dir=tmp_path / "cache")
    np.savez(bad, other=np.eye(3))
    with pytest.raises(StatsError, match="holds neither"):
        read_npz(bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(StatsError, match="not a numpy .npz"):
        read_npz(bad)
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(StatsError, match="not a numpy .npz"):
        read_npz(bad)
    with open(bad, "wb") as f:
        np.save(f, np.eye(3))
    with pytest.raises(StatsError, match="single numpy array"):
        read_npz(bad)

    _original_file(bad, np.eye(256, dtype=np.float32), 5)
    _original_file(folder / f"{module}_float32_mom2_2000.npz", np.eye(256, dtype=np.float32), 5)
    with pytest.raises(StatsError, match="several statistics files"):
        import_npz(tmp_path / "stats", m, hp, cache_dir=tmp_path / "cache")
    assert find_npz(tmp_path / "stats", module, n_samples=2000).name.endswith("_2000.npz")
    assert not (tmp_path / "cache").exists()  # nothing was written by a refused import


def test_export_refuses_statistics_of_another_shape(tmp_path):
    m = tiny.model("gptj", dtype=torch.float32)
    hp = tiny.hparams(m, layers=[2])
    with pytest.raises(StatsError, match="d_ff=256"):
        export_npz(tmp_path, m, {2: LayerStats(torch.eye(64), 10)}, hp)
