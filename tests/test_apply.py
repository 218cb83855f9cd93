"""apply/restore: fast mode equals the reference mode, restore is bit-exact, and bad input or a
failure midway leaves every weight as it was."""

import pytest
import torch

import memit_fast
import tiny
from memit_fast import update
from memit_fast.errors import HyperParamsError, RequestError, SolveError, StatsError
from memit_fast.cache import LayerStats


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _unchanged(m, snap):
    return all(torch.equal(p, snap[n]) for n, p in m.named_parameters())


def _edit(m, hp, stats, **kw):
    kw = {"context_templates": tiny.TEMPLATES, "progress": False} | kw
    return memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, stats=stats, **kw)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_fast_equals_reference(arch):
    m = tiny.model(arch)
    hp = tiny.hparams(m)
    stats = tiny.stats(m, hp)
    before = _snapshot(m)
    _, orig = _edit(m, hp, stats, return_orig_weights=True)
    fast = _snapshot(m)
    memit_fast.restore(m, orig)
    assert _unchanged(m, before)
    _edit(m, hp, stats, mode="reference")
    names = list(orig)
    assert len(names) == len(hp.layers)
    for n, p in m.named_parameters():
        if n in orig:
            d_fast, d_ref = fast[n] - before[n], p - before[n]
            assert d_ref.norm() > 0
            # 1e-8 before shortcut 5: the fast path now adds the KL and NLL gradients at the bare
            # row, the reference at delta; each part is bit-identical alone, the sum rounds
            # differently, and tiny llama's z backward amplifies that to ~2e-8 (float64)
            assert (d_fast - d_ref).norm() / d_ref.norm() < 1e-7, n
        else:
            assert torch.equal(p, before[n]) and torch.equal(fast[n], before[n]), n


def test_fast_equals_reference_float32():
    """float32: rounding differs between the two structures; deltas agree to 1e-3."""
    m = tiny.model("llama", dtype=torch.float32)
    hp = tiny.hparams(m, v_num_grad_steps=4)
    stats = tiny.stats(m, hp)
    before = _snapshot(m)
    _, orig = _edit(m, hp, stats, return_orig_weights=True)
    fast = _snapshot(m)
    memit_fast.restore(m, orig)
    _edit(m, hp, stats, mode="reference")
    for n in orig:
        d_fast, d_ref = fast[n] - before[n], dict(m.named_parameters())[n] - before[n]
        assert (d_fast - d_ref).norm() / d_ref.norm() < 1e-3, n


def test_restore_copy_and_orig_weights():
    m = tiny.model("gpt2", dtype=torch.float32)
    hp = tiny.hparams(m)
    stats = tiny.stats(m, hp)
    before = _snapshot(m)
    edited, orig = _edit(m, hp, stats, copy=True, return_orig_weights=True)
    assert edited is not m and _unchanged(m, before)
    assert set(orig) == {f"transformer.h.{i}.mlp.c_proj.weight" for i in hp.layers}
    assert all(v.device.type == "cpu" and torch.equal(v, before[n]) for n, v in orig.items())
    assert not _unchanged(edited, before)
    memit_fast.restore(edited, orig)
    assert _unchanged(edited, before)
    _, none = _edit(m, hp, stats, return_orig_weights=False)
    assert none == {}


def test_training_mode_and_grad_flags_come_back():
    m = tiny.model("llama").train()
    hp = tiny.hparams(m)
    stats = tiny.stats(m, hp)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    _edit(m, hp, stats)
    assert m.training and flags == {n: p.requires_grad for n, p in m.named_parameters()}


BAD_REQUESTS = [
    ({"prompt": "no slot here", "subject": "France", "target_new": {"str": "Rome"}}, "exactly once"),
    ({"prompt": "{} and {}", "subject": "France", "target_new": {"str": "Rome"}}, "exactly once"),
    ({"prompt": "{} is", "subject": "  ", "target_new": {"str": "Rome"}}, "subject"),
    ({"prompt": "{} is", "subject": "France", "target_new": {"str": ""}}, "target_new"),
    ({"prompt": "{} is", "subject": "France", "target_new": "Rome"}, None),  # plain string target: allowed
]


@pytest.mark.parametrize("bad,match", BAD_REQUESTS)
def test_bad_request_raises_and_leaves_weights(bad, match):
    m = tiny.model("gpt2", dtype=torch.float32)
    hp = tiny.hparams(m, v_num_grad_steps=2)
    stats = tiny.stats(m, hp)
    before = _snapshot(m)
    if match is None:
        memit_fast.apply(m, tiny.tokenizer(), [bad], hp, stats=stats, context_templates=tiny.TEMPLATES, progress=False)
        assert not _unchanged(m, before)
        return
    with pytest.raises(RequestError, match=match):
        memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS + [bad], hp, stats=stats, context_templates=tiny.TEMPLATES, progress=False)
    assert _unchanged(m, before)


def test_conflicting_requests():
    m = tiny.model("gpt2", dtype=torch.float32)
    before = _snapshot(m)
    a = {"prompt": "{} is in", "subject": "Paris", "target_new": {"str": "France"}}
    b = {"prompt": "{} is in", "subject": "Paris", "target_new": {"str": "Italy"}}
    with pytest.raises(RequestError, match="conflicts"):
        memit_fast.apply(m, tiny.tokenizer(), [a, b], tiny.hparams(m), progress=False)
    assert _unchanged(m, before)


def test_bad_hparams_raise_and_leave_weights():
    m = tiny.model("llama", dtype=torch.float32)
    hp = tiny.hparams(m)
    stats = tiny.stats(m, hp)
    before = _snapshot(m)
    for bad, match in [
        (hp.replace(layers=[2, 6]), "out of range"),
        (hp.replace(rewrite_module_tmp="model.layers.{}.mlp.nope"), "not found"),
        (hp.replace(ln_f_module="model.final_norm"), "not found"),
        (hp.replace(v_loss_layer=1), "below the last critical layer"),
        (hp.replace(rewrite_module_tmp="model.layers.{}.mlp.up_proj"), "MLP output projection"),
    ]:
        with pytest.raises(HyperParamsError, match=match):
            _edit(m, bad, stats)
        assert _unchanged(m, before)


def test_bad_statistics_raise_and_leave_weights():
    m = tiny.model("llama", dtype=torch.float32)
    hp = tiny.hparams(m)
    stats = tiny.stats(m, hp)
    before = _snapshot(m)
    nan = {k: LayerStats(v.mom2.clone(), v.count) for k, v in stats.items()}
    nan[3].mom2[0, 0] = float("nan")
    wrong = {k: LayerStats(torch.eye(7), 10) for k in stats}
    missing = {2: stats[2]}
    for bad, match in [(nan, "NaN"), (wrong, "d_ff"), (missing, "no statistics for layer 3")]:
        with pytest.raises(StatsError, match=match):
            _edit(m, hp, bad)
        assert _unchanged(m, before)


def test_failure_midway_restores_weights(monkeypatch):
    """The first layer is written, then the second layer's solve fails: everything comes back."""
    m = tiny.model("gptj", dtype=torch.float32)
    hp = tiny.hparams(m)
    stats = tiny.stats(m, hp)
    before = _snapshot(m)
    real, calls = update.layer_delta, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SolveError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(update, "layer_delta", failing)
    with pytest.raises(SolveError, match="injected"):
        _edit(m, hp, stats)
    assert len(calls) == 2 and _unchanged(m, before)


def test_nan_in_solution_raises(monkeypatch):
    m = tiny.model("gpt_neox", dtype=torch.float32)
    hp = tiny.hparams(m)
    stats = tiny.stats(m, hp)
    before = _snapshot(m)
    monkeypatch.setattr(update, "solve_delta_weights", lambda *a, **k: torch.full((64, 128), float("nan"), dtype=torch.float64))
    with pytest.raises(SolveError, match="NaN"):
        _edit(m, hp, stats)
    assert _unchanged(m, before)


def test_not_positive_definite_statistics():
    """Statistics from too few tokens are singular; with lambda C + K K^T singular the solve fails clearly."""
    m = tiny.model("gpt2", dtype=torch.float32)
    hp = tiny.hparams(m)
    zero = {layer: LayerStats(torch.zeros(256, 256), 5) for layer in hp.layers}
    before = _snapshot(m)
    with pytest.raises(SolveError):
        _edit(m, hp, zero, solve_method="cholesky")
    assert _unchanged(m, before)


def test_without_mom2_adjustment_no_statistics_are_needed(monkeypatch):
    """mom2_adjustment False: C is the identity, no statistics are computed."""
    from memit_fast import api

    m = tiny.model("llama")
    hp = tiny.hparams(m, mom2_adjustment=False)
    monkeypatch.setattr(api, "compute_stats", lambda *a, **k: pytest.fail("statistics computed"))
    before = _snapshot(m)
    ident = {layer: LayerStats(torch.eye(96, dtype=torch.float64), 1) for layer in hp.layers}
    _edit(m, hp, None)
    without = _snapshot(m)
    memit_fast.restore(m, before)
    _edit(m, hp.replace(mom2_adjustment=True), ident)
    for n, p in m.named_parameters():
        assert torch.allclose(p, without[n], rtol=0, atol=1e-12), n
    assert not _unchanged(m, before)
