"""Edits as artifacts: exact low-rank factors, reload onto the base model, PEFT adapters, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import memit_fast
import memit_fast.cache
import tiny
from memit_fast.artifacts import apply_edits, build_edits, export_peft, load_edits, low_rank_factors, save_edits
from memit_fast.errors import ArtifactError

_EDITED = {}


def edited(arch):
    """(base model, edited model, orig_weights, hparams) for the three requests, float32, computed once per arch."""
    if arch not in _EDITED:
        base = tiny.model(arch, dtype=torch.float32)
        hp = tiny.hparams(base)
        stats = tiny.stats(base, hp, n_lines=40)
        m, orig = memit_fast.apply(tiny.model(arch, dtype=torch.float32), tiny.tokenizer(), tiny.REQUESTS, hp, stats=stats,
                                   context_templates=tiny.TEMPLATES, return_orig_weights=True, progress=False)
        _EDITED[arch] = (base, m, orig, hp)
    return _EDITED[arch]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_factors_are_exact_at_rank_n_and_reapply_onto_the_base(arch, tmp_path):
    base, m, orig, hp = edited(arch)
    edits = save_edits(tmp_path / "e", m, orig, hparams=hp, requests=tiny.REQUESTS)
    params = dict(m.named_parameters())
    meta = json.loads((tmp_path / "e" / "edits.json").read_text())
    assert meta["base_model"]["fingerprint"] == memit_fast.cache.model_fingerprint(base, hp)
    assert meta["memit_fast"] == memit_fast.__version__ and meta["hparams"] == hp.to_dict()
    assert [r["subject"] for r in meta["requests"]] == ["Michael Jordan", "France", "Eiffel Tower"]
    assert sorted(meta["layers"]) == sorted(orig)
    for e in edits.layers:
        assert e.rank == 3 and meta["layers"][e.name] | {"form": "low_rank", "rank": 3} == meta["layers"][e.name]
        dense = params[e.name].detach().double() - orig[e.name].double()
        dense = dense.T if e.conv1d else dense
        # Exact to the rounding of the float32 weights.
        assert float((e.delta() - dense).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(params[e.name].detach().abs().max())

    fresh = tiny.model(arch, dtype=torch.float32)
    back = apply_edits(fresh, tmp_path / "e")
    fresh_params = dict(fresh.named_parameters())
    for name in orig:
        assert _rel(fresh_params[name], params[name]) < 1e-6
        assert torch.equal(back[name], orig[name])
    ids = torch.tensor([tiny.tokenizer()("Michael Jordan plays the sport of")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-5)
    memit_fast.restore(fresh, back)
    assert all(torch.equal(fresh_params[n], p) for n, p in base.named_parameters())


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_peft_adapter_merges_to_the_dense_edit(arch, tmp_path):
    peft = pytest.importorskip("peft")
    base, m, orig, hp = edited(arch)
    export_peft(tmp_path / "adapter", m, orig, hparams=hp, requests=tiny.REQUESTS)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["fan_in_fan_out"] == (arch == "gpt2")
    assert config["target_modules"] == sorted(n[: -len(".weight")] for n in orig)
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{n[: -len('.weight')]}.lora_{x}.weight" for n in orig for x in "AB"}

    merged = peft.PeftModel.from_pretrained(tiny.model(arch, dtype=torch.float32), str(tmp_path / "adapter")).merge_and_unload()
    merged_params, params = dict(merged.named_parameters()), dict(m.named_parameters())
    for name in orig:
        assert _rel(merged_params[name], params[name]) < 1e-6, name
    assert all(torch.equal(merged_params[n], p) for n, p in base.named_parameters() if n not in orig)
    # The adapter folder also reloads as memit_fast edits.
    fresh = tiny.model(arch, dtype=torch.float32)
    apply_edits(fresh, tmp_path / "adapter")
    assert all(_rel(dict(fresh.named_parameters())[n], params[n]) < 1e-6 for n in orig)


def _deltas(model, hp, ranks, seed=0):
    """{parameter name: random Delta W (d_model, d_ff)} of the given rank per edited layer, float64."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for w, r in zip(memit_fast.model_access.rewrite_weights(model, hp), ranks):
        out[w.name] = (torch.randn(w.d_model, r, generator=g, dtype=torch.float64) @ torch.randn(r, w.d_ff, generator=g, dtype=torch.float64)) * 1e-2
    return out


def test_dense_past_break_even_and_ranks_per_layer_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    m = tiny.model("gpt2", dtype=torch.float64)  # d_model 64, d_ff 256: factors save space up to r = 51
    hp = tiny.hparams(m)
    deltas = _deltas(m, hp, [60, 2])
    edits = save_edits(tmp_path / "e", m, deltas=deltas, hparams=hp)
    assert [e.rank for e in edits.layers] == [60, 2] and edits.dtype == torch.float64
    forms = {n: e["form"] for n, e in json.loads((tmp_path / "e" / "edits.json").read_text())["layers"].items()}
    assert forms == {"transformer.h.2.mlp.c_proj.weight": "dense", "transformer.h.3.mlp.c_proj.weight": "low_rank"}
    loaded = load_edits(tmp_path / "e")
    assert [e.rank for e in loaded.layers] == [None, 2]
    for e in loaded.layers:
        torch.testing.assert_close(e.delta(), deltas[e.name], rtol=1e-12, atol=1e-14)

    # PEFT has no dense form: the dense layer is factored again, and the ranks differ per layer.
    loaded.save(tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 60 and config["rank_pattern"] == config["alpha_pattern"] == {r"transformer\.h\.3\.mlp\.c_proj": 2}
    merged = peft.PeftModel.from_pretrained(tiny.model("gpt2", dtype=torch.float64), str(tmp_path / "adapter")).merge_and_unload()
    for w in memit_fast.model_access.rewrite_weights(merged, hp):
        torch.testing.assert_close(w.param.detach().T - m.get_parameter(w.name).detach().T, deltas[w.name], rtol=1e-10, atol=1e-12)


def test_low_rank_factors_truncate_at_the_tolerance():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)
    noisy = exact + 1e-9 * torch.randn(20, 30, generator=g, dtype=torch.float64)
    B, A = low_rank_factors(noisy, tol=1e-6)
    assert B.shape == (20, 3) and A.shape == (3, 30)
    assert float((B @ A - noisy).abs().max()) < 1e-7
    assert low_rank_factors(noisy, tol=0.0)[0].shape == (20, 20)


def test_refusals(tmp_path):
    base, m, orig, hp = edited("llama")
    save_edits(tmp_path / "e", m, orig, hparams=hp)
    other = tiny.model("llama", dtype=torch.float32, seed=1)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ArtifactError, match="another base model"):
        apply_edits(other, tmp_path / "e")
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())
    with pytest.raises(ArtifactError, match="edits.json not found"):
        load_edits(tmp_path / "missing")

    tensors = load_file(str(tmp_path / "e" / "edits.safetensors"))
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(tmp_path / "e" / "edits.safetensors"))
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        load_edits(tmp_path / "e")
    meta_path = tmp_path / "e" / "edits.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"tensors_sha256": memit_fast.artifacts.file_sha256(tmp_path / "e" / "edits.safetensors")}))
    with pytest.raises(ArtifactError, match="lacks tensor"):
        load_edits(tmp_path / "e")
    (tmp_path / "e" / "edits.safetensors").unlink()
    with pytest.raises(ArtifactError, match="edits.safetensors not found"):
        load_edits(tmp_path / "e")
    meta_path.write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_edits(tmp_path / "e")
    meta_path.write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_edits(tmp_path / "e")

    with pytest.raises(ValueError, match="exactly one of"):
        build_edits(m, orig, deltas={}, hparams=hp)
    with pytest.raises(ArtifactError, match="not the weight of an MLP output projection"):
        build_edits(m, {"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}, hparams=hp)
    with pytest.raises(ArtifactError, match=r"expected \(d_model, d_ff\) = \(64, 96\)"):
        build_edits(m, deltas={"model.layers.2.mlp.down_proj.weight": torch.zeros(96, 64)}, hparams=hp)
    with pytest.raises(ValueError, match="format must be one of"):
        save_edits(tmp_path / "f", m, orig, hparams=hp, format="onnx")
    with pytest.raises(ArtifactError, match="changes no weight"):
        export_peft(tmp_path / "g", base, deltas={n: torch.zeros(64, 96) for n in orig}, hparams=hp)


def test_a_zero_change_reloads_as_rank_zero(tmp_path):
    m = tiny.model("gpt_neox", dtype=torch.float32)
    hp = tiny.hparams(m)
    deltas = _deltas(m, hp, [1, 1])
    deltas["gpt_neox.layers.3.mlp.dense_4h_to_h.weight"].zero_()
    save_edits(tmp_path / "e", m, deltas=deltas, hparams=hp)
    loaded = load_edits(tmp_path / "e")
    assert [e.rank for e in loaded.layers] == [1, 0]
    before = m.get_parameter("gpt_neox.layers.3.mlp.dense_4h_to_h.weight").detach().clone()
    apply_edits(m, loaded)
    assert torch.equal(m.get_parameter("gpt_neox.layers.3.mlp.dense_4h_to_h.weight"), before)
