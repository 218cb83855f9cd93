"""Non-finite results: a delta that is NaN/inf, or finite in float64 but overflowing the weight's
dtype, raises SolveError; every weight is rolled back bit for bit."""

import pytest
import torch

import memit_fast
import tiny
from memit_fast import update
from memit_fast.cache import LayerStats
from memit_fast.errors import SolveError, StatsError
from memit_fast.model_access import rewrite_weights


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _unchanged(m, snap):
    return all(torch.equal(p, snap[n]) for n, p in m.named_parameters())


def _edit(m, **kw):
    hp = tiny.hparams(m, v_num_grad_steps=2, mom2_adjustment=False)
    return memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, context_templates=tiny.TEMPLATES, progress=False, **kw)


def _second_layer_delta(monkeypatch, value):
    """The first layer's delta is the real one (and gets written); the second is `value` everywhere."""
    real, calls = update.layer_delta, []

    def patched(*args, **kwargs):
        delta = real(*args, **kwargs)
        calls.append(1)
        return torch.full_like(delta, value) if len(calls) == 2 else delta

    monkeypatch.setattr(update, "layer_delta", patched)
    return calls


# (dtype, delta value, message): finite in float64 but past the dtype's largest value, or NaN/inf.
CASES = [
    (torch.float16, 1e5, r"overflows its dtype torch.float16: W \+ delta would contain NaN or inf \(largest \|delta\| 1e\+05, largest finite torch.float16 6.55e\+04\)"),
    (torch.bfloat16, 1e39, r"overflows its dtype torch.bfloat16"),
    (torch.float32, 1e39, r"overflows its dtype torch.float32"),
    (torch.float32, float("nan"), "contains NaN or inf"),
    (torch.float64, float("inf"), "contains NaN or inf"),
]


@pytest.mark.parametrize("dtype,value,said", CASES, ids=[f"{d}-{v}" for d, v, _ in CASES])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_non_finite_or_overflowing_update_rolls_back(arch, dtype, value, said, monkeypatch):
    m = tiny.model(arch, dtype=dtype)
    before = _snapshot(m)
    calls = _second_layer_delta(monkeypatch, value)
    name = tiny.hparams(m).rewrite_module_tmp.format(3) + ".weight"
    with pytest.raises(SolveError, match=f"the update of {name} " + said):
        _edit(m)
    assert len(calls) == 2  # the first layer was written before the failure
    assert _unchanged(m, before)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_write_layer_leaves_the_weight_as_it_was(arch):
    m = tiny.model(arch, dtype=torch.float16)
    w = rewrite_weights(m, tiny.hparams(m))[0]
    before = w.param.detach().clone()
    delta = torch.zeros(w.d_model, w.d_ff, dtype=torch.float64)
    delta[0, -1] = 7e4  # one element: finite in float64, past float16's 65504
    with pytest.raises(SolveError, match="overflows its dtype torch.float16"):
        update.write_layer(w, delta)
    assert torch.equal(w.param, before)
    delta[0, -1] = 1.0
    update.write_layer(w, delta)  # a representable update is written
    assert not torch.equal(w.param, before)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_non_finite_statistics_refused_before_any_write(arch):
    m = tiny.model(arch, dtype=torch.float32)
    hp = tiny.hparams(m, v_num_grad_steps=2)
    d_ff = rewrite_weights(m, hp)[0].d_ff
    bad = torch.eye(d_ff)
    bad[0, 1] = float("nan")
    before = _snapshot(m)
    stats = {layer: LayerStats(bad, 10) for layer in hp.layers}
    with pytest.raises(StatsError, match=f"statistics of layer {hp.layers[0]}: statistics contain NaN or inf"):
        memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, stats=stats, context_templates=tiny.TEMPLATES, progress=False)
    assert _unchanged(m, before)


def test_all_finite_is_exact():
    from memit_fast.cache import all_finite

    big = torch.full((4,), 1e308, dtype=torch.float64)  # finite, but the sum overflows: the exact path
    assert all_finite(big) and all_finite(torch.ones(3, dtype=torch.float16), big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            t = torch.ones(5, dtype=dtype)
            t[3] = bad
            assert not all_finite(t) and not all_finite(big, t), (bad, dtype)
    assert not all_finite(torch.tensor([1e308, -float("inf")], dtype=torch.float64))
