"""Causal tracing (memit_fast/trace.py) on tiny float32 models of every family, CPU.

The fast trace (restorations batched through the family layout, rows entering at the first
block and token they change, over the corrupted run's cached keys and values) against the
original structure (one restoration per HF forward, patched by hooks on the HF modules), against
whole rows from the embeddings through the same layout, and against the generic layout (HF's
forward with hooks); the short rows over a prefix give the clean and the corrupted runs; restoring
every block output gives the clean probability and restoring nothing the corrupted one; the
sub-block patches are exact (all attention and MLP outputs restored leaves the clean run plus
the noise); bad facts are skipped with a reason; the suggestion is the band of largest effect and
round-trips through MEMITHyperParams.from_json; the CLI's bad input is one line, exit code 2.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

import memit_fast
from memit_fast import cli, trace
from memit_fast.hparams import MEMITHyperParams
from memit_fast.layouts import layout_for
from memit_fast.trace import KINDS, Fact, FactTrace, TraceResult, causal_trace, suggest_layers, suggested_hparams

import tiny

# the HF forward (the reference's hooks, the generic layout), the family layout's whole rows and
# its short rows over a cached prefix are float32 implementations of the same sums: their
# probabilities differ by rounding (measured up to 9e-7)
ATOL = 1e-6
FACTS = [
    {"prompt": "Michael Jordan plays the sport of", "subject": "Michael Jordan"},
    {"prompt": "The capital of France is", "subject": "France"},
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower"},
]
SETTINGS = dict(samples=3, window=3, answer="model", progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache
def _model(arch: str):
    """A tiny float32 model whose weights are larger than the initialiser's and whose final norm is
    scaled up (peaked predictions), so that the answer's probability moves visibly under the noise."""
    model = tiny.model(arch, dtype=torch.float32, layers=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        layout_for(model, tiny.hparams(model)).final_norm.weight.mul_(8)
    return model


@functools.lru_cache
def _trace(arch: str, **kw):
    return causal_trace(_model(arch), tiny.tokenizer(), FACTS, **(SETTINGS | kw))


def _scores(result, kind):
    return torch.tensor([s for t in result.traces for s in t.scores[kind]], dtype=torch.float64)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_batched_equals_one_restoration_per_forward(arch):
    fast, ref = _trace(arch), _trace(arch, mode="reference")
    one_at_a_time = _trace(arch, batch_tokens=1)  # one restoration (its noise samples) per forward
    generic = _trace(arch, generic=True)
    assert [t.index for t in fast.traces] == [0, 1, 2] and not fast.skipped
    for kind in KINDS:
        assert (_scores(fast, kind) - _scores(one_at_a_time, kind)).abs().max() < ATOL, kind
        for other in (ref, generic):
            assert (_scores(fast, kind) - _scores(other, kind)).abs().max() < ATOL, kind
    for a, b in zip(fast.traces, ref.traces):
        assert abs(a.p_clean - b.p_clean) < ATOL and abs(a.p_corrupted - b.p_corrupted) < ATOL
    # the noise matters: the corrupted probability moves away from the clean one
    assert max(abs(t.p_clean - t.p_corrupted) for t in fast.traces) > 0.05


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_short_rows_equal_whole_rows(arch, monkeypatch):
    fast = _trace(arch)
    monkeypatch.setattr(trace, "Layout", type("NotAFamily", (), {}))  # every layout takes the whole-rows path
    whole = causal_trace(_model(arch), tiny.tokenizer(), FACTS, **SETTINGS)
    for kind in KINDS:
        assert (_scores(fast, kind) - _scores(whole, kind)).abs().max() < ATOL, kind


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_rows_from_a_token_and_block_over_a_cached_prefix(arch):
    """Rows holding tokens t.. entering block e, over a run's keys and values of tokens < t, give
    that run's logits: the clean run from its states, the corrupted run (restoring nothing) from its own."""
    model, tok = _model(arch), tiny.tokenizer()
    layout = layout_for(model, tiny.hparams(model))
    ids = torch.tensor([tok(FACTS[2]["prompt"])["input_ids"]] * 2)
    (B, S), L = ids.shape, layout.n_layers
    last = torch.full((B,), S - 1)
    noise = torch.randn(B, S, model.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(0))
    positions = torch.arange(S).expand(B, S)
    for run_noise in (None, noise):
        logits, rec = layout.patched_forward(ids, last, noise=run_noise, record=True)
        embedded = layout.start(ids)[0] + (0 if run_noise is None else run_noise)
        states = [embedded, *rec["hidden"]]
        kv = {j: layout.input_kv(j, states[j], positions) for j in range(L)}
        for e in (0, 2, L):
            for t in (0, 3, S - 1):
                past = {j: (k[:, :, :t], v[:, :, :t]) for j, (k, v) in kv.items()} if t else None
                mask = torch.ones(B, t, dtype=torch.bool) if t else None
                got = layout.suffix_patched_forward(states[e][:, t:], e, positions[:, t:], last - t, past=past, prefix_mask=mask)
                assert torch.allclose(got.softmax(-1), logits.softmax(-1), atol=ATOL), (e, t)
    assert not torch.allclose(got.softmax(-1), layout.patched_forward(ids, last).softmax(-1), atol=1e-3)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_restoring_everything_or_nothing(arch):
    model, tok = _model(arch), tiny.tokenizer()
    result = _trace(arch)
    for tr in result.traces:
        # the last block's output at the last token is the whole clean computation there
        assert abs(tr.scores["hidden"][-1][-1] - tr.p_clean) < ATOL
        # tokens before the subject are not changed by the noise: restoring them changes nothing
        for kind in KINDS:
            assert all(s == tr.p_corrupted for row in tr.scores[kind][: tr.subject[0]] for s in row)
    layout = layout_for(model, tiny.hparams(model))
    ids = torch.tensor([tok(FACTS[0]["prompt"])["input_ids"]])
    S, L = ids.shape[1], layout.n_layers
    last = torch.tensor([S - 1])
    clean_logits, clean = layout.patched_forward(ids, last, record=True)
    noise = torch.randn(1, S, clean["hidden"].shape[-1])
    noisy = layout.patched_forward(ids, last, noise=noise)
    every = torch.arange(S)
    rows = torch.zeros(S, dtype=torch.long)
    restore_all = {i: {"hidden": (rows, every, clean["hidden"][i][0])} for i in range(L)}
    assert torch.allclose(layout.patched_forward(ids, last, noise=noise, patches=restore_all).softmax(-1), clean_logits.softmax(-1), atol=ATOL)
    assert not torch.allclose(noisy.softmax(-1), clean_logits.softmax(-1), atol=1e-3)
    # restoring nothing is the corrupted run
    assert torch.equal(layout.patched_forward(ids, last, noise=noise, patches={}), noisy)
    # every attention and MLP output restored: the residual stream is the clean one plus the noise
    sub = {i: {k: (rows, every, clean[k][i][0]) for k in ("attn", "mlp")} for i in range(L)}
    _, got = layout.patched_forward(ids, last, noise=noise, patches=sub, record=True)
    assert torch.allclose(got["hidden"][-1] - clean["hidden"][-1], noise, atol=1e-4)


def test_bad_facts_are_skipped_and_reported():
    model, tok = _model("llama"), tiny.tokenizer()
    good = _trace("llama").traces[1]
    facts = [
        Fact("The capital of France is", "France", good.answer),  # the model's prediction: traced
        Fact("The capital of France is", "Germany", good.answer),  # subject not in the prompt
        Fact("The capital of France is", "France", "zzzq"),  # not what the model predicts
        Fact("The capital of France is", "France", None),  # no answer to check
    ]
    result = causal_trace(model, tok, facts, samples=2, window=3, progress=False)
    assert [t.index for t in result.traces] == [0]
    reasons = dict(result.skipped)
    assert sorted(reasons) == [1, 2, 3]
    assert "not in the prompt" in reasons[1] and "the model predicts" in reasons[2] and "no answer" in reasons[3]
    assert abs(result.traces[0].p_clean - good.p_clean) < ATOL


def test_a_model_split_over_devices_is_refused():
    """Tracing runs on one device; a model whose blocks sit on several is refused before any work."""
    model = tiny.model("llama")
    model.model.layers[-1].to("meta")
    with pytest.raises(memit_fast.ConfigError, match="split over several devices"):
        causal_trace(model, tiny.tokenizer(), [Fact("The capital of France is", "France", " Paris")], progress=False)


def _synthetic(effect_by_layer: list[float]) -> TraceResult:
    L = len(effect_by_layer)
    fact = Fact("A B c d", "A B")
    scores = {k: [[0.1] * L for _ in range(4)] for k in KINDS}
    scores["mlp"][1] = [0.1 + e for e in effect_by_layer]  # the last subject token
    return TraceResult([FactTrace(0, fact, ["A", " B", " c", " d"], (0, 2), " x", 0.9, 0.1, scores)], [], L, 1.0, {})


def test_suggestion_is_the_band_of_largest_effect_and_round_trips(tmp_path):
    result = _synthetic([0, 0.1, 0.2, 0.5, 0.4, 0.05, 0.3, 0])
    assert suggest_layers(result, 3) == [2, 3, 4]
    assert suggest_layers(result, 1) == [3]
    # from a real trace: the preset with the band of the same length, in the JSON edit --hparams reads
    model = _model("gpt2")
    hp = tiny.hparams(model)
    suggested = suggested_hparams(_trace("gpt2"), hp)
    assert len(suggested.layers) == len(hp.layers) and suggested.layers == list(range(suggested.layers[0], suggested.layers[0] + len(hp.layers)))
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps(suggested.to_dict()))
    assert MEMITHyperParams.from_json(path) == suggested
    assert suggested.replace(layers=hp.layers) == hp


def test_average_effect_by_token_group():
    result = _synthetic([0, 0.1, 0.2, 0.5])
    aie = result.average("mlp")
    assert aie.shape == (6, 4)
    assert torch.allclose(aie[2], torch.tensor([0, 0.1, 0.2, 0.5], dtype=torch.float64))  # last subject token
    assert torch.all(aie[[0, 3, 5]] == 0) and torch.all(aie[[1, 4]] == 0)  # other groups: no effect (or no tokens)
    assert abs(result.total_effect() - 0.8) < 1e-12


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("memit-fast: error:")
    return err


def test_cli_bad_input(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "not found" in _one_line_error(capsys, ["trace", "--data", str(tmp_path / "missing.json"), "--out", out])
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    assert "not valid JSON" in _one_line_error(capsys, ["trace", "--data", str(bad), "--out", out])
    bad.write_text(json.dumps([{"prompt": "x"}]))
    assert "subject" in _one_line_error(capsys, ["trace", "--data", str(bad), "--out", out])
    bad.write_text("[]")
    assert "no facts" in _one_line_error(capsys, ["trace", "--data", str(bad), "--out", out])
    good = tmp_path / "facts.json"
    good.write_text(json.dumps(FACTS))
    assert "--noise" in _one_line_error(capsys, ["trace", "--data", str(good), "--out", out, "--noise", "-1"])
    assert "--samples" in _one_line_error(capsys, ["trace", "--data", str(good), "--out", out, "--samples", "0"])
    assert "--fact-plots" in _one_line_error(capsys, ["trace", "--data", str(good), "--out", out, "--fact-plots", "-1"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in _one_line_error(capsys, ["trace", "--data", str(good), "--out", str(tmp_path / "full")])


def test_cli_trace_writes_figures_and_suggestion(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = _model("llama")
    model.save_pretrained(tmp_path / "model")
    tiny.tokenizer().save_pretrained(tmp_path / "model")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS + [{"prompt": "Nothing here", "subject": "Paris", "answer": "x"}]))
    out = tmp_path / "out"
    argv = ["trace", "--model", str(tmp_path / "model"), "--data", str(facts), "--out", str(out), "--answer", "model",
            "--samples", "2", "--window", "3", "--suggest", "--quiet", "--device", "cpu", "--fact-plots", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "traced 3 of 4 facts" in printed and "skipped fact 3" in printed and "suggested layers" in printed
    doc = json.loads((out / "trace.json").read_text())
    assert len(doc["facts"]) == 3 and doc["skipped"][0]["index"] == 3
    hp = MEMITHyperParams.from_json(out / "hparams.json")
    assert hp.layers == doc["summary"]["suggested_layers"] and len(hp.layers) == len(doc["summary"]["preset_layers"])
    pngs = sorted(p.name for p in out.rglob("*.png"))
    assert pngs == ["0000.png", "0001.png", "average.png"]
    assert all((out / "facts" / n).stat().st_size > 10_000 for n in pngs[:2])


def test_missing_matplotlib_is_one_clear_error(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    good = tmp_path / "facts.json"
    good.write_text(json.dumps(FACTS))
    err = _one_line_error(capsys, ["trace", "--data", str(good), "--out", str(tmp_path / "out")])
    assert "matplotlib" in err and "--no-plots" in err


def test_time_limit_reports_the_facts_left():
    result = causal_trace(_model("gpt_neox"), tiny.tokenizer(), FACTS, max_seconds=1e-9, **SETTINGS)
    assert result.traces == [] and [i for i, _ in result.skipped] == [0, 1, 2]
    assert all("time limit" in reason for _, reason in result.skipped)
