"""Editor: one MEMIT batch equals apply bit for bit; AlphaEdit's weight change leaves the
preserved keys alone; undo and save/load are bit-exact; bad input is refused as apply refuses it."""

import pytest
import torch

import memit_fast
import tiny
from memit_fast.errors import ArtifactError, RequestError, RestoreError

BATCH_2 = [
    {"prompt": "{} is a citizen of", "subject": "Danielle Darrieux", "target_new": {"str": "Italy"}},
    {"prompt": "{} was born in", "subject": "Michael Jordan", "target_new": {"str": "Paris"}},
]
BATCH_3 = [{"prompt": "The language of {} is", "subject": "Italy", "target_new": {"str": "French"}}]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """The null-space bases go to a temporary cache, not the user's."""
    monkeypatch.setenv("MEMIT_FAST_CACHE", str(tmp_path / "cache"))


def _weights(m, hp):
    return {w.name: w.param.detach().clone() for w in memit_fast.model_access.rewrite_weights(m, hp)}


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _setup(arch="llama"):
    m = tiny.model(arch)
    hp = tiny.hparams(m)
    return m, hp, tiny.stats(m, hp)


def _threshold(stats):
    """The median eigenvalue of the statistics: half the key space is the null space."""
    return float(max(torch.linalg.eigvalsh(s.mom2.double()).median() for s in stats.values()))


def _editor(m, hp, stats, method="memit", **kw):
    if method == "alphaedit":
        kw.setdefault("nullspace_threshold", _threshold(stats))
    return memit_fast.Editor(m, tiny.tokenizer(), hp, method, stats=stats, context_templates=tiny.TEMPLATES, progress=False, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_memit_batch_equals_apply(arch):
    m, hp, stats = _setup(arch)
    before = _weights(m, hp)
    _, orig = memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, stats=stats, context_templates=tiny.TEMPLATES, progress=False)
    applied = _weights(m, hp)
    memit_fast.restore(m, orig)
    ed = _editor(m, hp, stats)
    ed.edit(tiny.REQUESTS)
    after = _weights(m, hp)
    assert not _equal(after, before)
    assert _equal(after, applied)
    assert ed.n_edits == 3 and len(ed.history) == 1


def test_alphaedit_leaves_preserved_keys_alone():
    m, hp, stats = _setup()
    thr = _threshold(stats)
    before = _weights(m, hp)
    ed = _editor(m, hp, stats, "alphaedit", nullspace_threshold=thr)
    ed.edit(tiny.REQUESTS)
    ed.edit(BATCH_2)
    for w in memit_fast.model_access.rewrite_weights(m, hp):
        delta = (w.param.detach() - before[w.name]).double()
        values, vectors = torch.linalg.eigh(stats[w.layer].mom2.double())
        k0 = vectors[:, values >= thr]  # the preserved directions, projected out
        assert delta.norm() > 0
        ratio = (delta @ k0).norm() / (delta.norm() * k0.norm())
        assert ratio < 1e-6, (w.name, float(ratio))
    assert torch.allclose(ed._accs[hp.layers[0]].kk, sum(k.double().T @ k.double() for k in (b.keys[hp.layers[0]] for b in ed.history)))


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_undo_bit_exact(method):
    m, hp, stats = _setup()
    w0 = _weights(m, hp)
    ed = _editor(m, hp, stats, method)
    ed.edit(tiny.REQUESTS)
    w1 = _weights(m, hp)
    accs1 = {l: (a.kk.clone(), a.proj.clone()) for l, a in (ed._accs or {}).items()}
    ed.edit(BATCH_2)
    assert not _equal(_weights(m, hp), w1)
    ed.undo()
    assert _equal(_weights(m, hp), w1)
    for layer, (kk, proj) in accs1.items():
        assert torch.equal(ed._accs[layer].kk, kk) and torch.equal(ed._accs[layer].proj, proj)
    ed.edit(BATCH_2)  # the same batch again, on the same state: the same weights
    w2 = _weights(m, hp)
    ed.undo()
    ed.undo()
    assert _equal(_weights(m, hp), w0) and ed.n_edits == 0
    with pytest.raises(RestoreError, match="no edit batch"):
        ed.undo()
    ed.edit(tiny.REQUESTS)
    ed.edit(BATCH_2)
    assert _equal(_weights(m, hp), w2)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_save_load_bit_exact(method, tmp_path):
    m, hp, stats = _setup()
    ed = _editor(m, hp, stats, method)
    ed.edit(tiny.REQUESTS)
    ed.edit(BATCH_2)
    ed.save(tmp_path / "s")
    saved = _weights(m, hp)
    assert {p.name for p in (tmp_path / "s").iterdir()} >= {"session.json", "batch_0001.safetensors", "batch_0002.safetensors"}
    m2 = tiny.model("llama")
    ed2 = memit_fast.Editor.load(m2, tiny.tokenizer(), tmp_path / "s", stats=stats, progress=False)
    assert ed2.method == method and ed2.n_edits == 5
    assert _equal(_weights(m2, hp), saved)
    for layer, acc in (ed._accs or {}).items():
        assert torch.equal(ed2._accs[layer].kk, acc.kk) and torch.equal(ed2._accs[layer].proj, acc.proj)
    ed.edit(BATCH_3)
    ed2.edit(BATCH_3)  # the session goes on as the original one does
    assert _equal(_weights(m2, hp), _weights(m, hp))
    ed2.undo()
    assert _equal(_weights(m2, hp), saved)
    with pytest.raises(ArtifactError, match="unedited model"):
        memit_fast.Editor.load(m2, tiny.tokenizer(), tmp_path / "s", stats=stats, progress=False)  # m2 is edited now
    with pytest.raises(ArtifactError, match="another base model"):
        memit_fast.Editor.load(tiny.model("llama", seed=1), tiny.tokenizer(), tmp_path / "s", stats=stats, progress=False)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_bad_input_refused_as_apply_does(method):
    m, hp, stats = _setup()
    ed = _editor(m, hp, stats, method)
    ed.edit(tiny.REQUESTS)
    w1 = _weights(m, hp)
    bad = [{"prompt": "{} plays", "subject": "Nobody Here", "target_new": {"str": "chess"}}, {"prompt": "no slot", "subject": "x", "target_new": {"str": "y"}}]
    for requests in (bad, [{"prompt": "{} plays", "subject": "A"}], []):
        with pytest.raises(RequestError) as applied:
            memit_fast.apply(m, tiny.tokenizer(), requests, hp, stats=stats, context_templates=tiny.TEMPLATES, progress=False)
        with pytest.raises(RequestError) as edited:
            ed.edit(requests)
        assert str(edited.value) == str(applied.value)
        assert _equal(_weights(m, hp), w1) and len(ed.history) == 1


def test_failure_midway_leaves_weights(monkeypatch):
    m, hp, stats = _setup()
    ed = _editor(m, hp, stats, "alphaedit")
    ed.edit(tiny.REQUESTS)
    w1 = _weights(m, hp)
    kk = ed._accs[hp.layers[0]].kk.clone()
    calls = []

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise memit_fast.SolveError("boom")
        return real(*a, **k)

    import memit_fast.editor as editor_module

    real = editor_module.projected_factors
    monkeypatch.setattr(editor_module, "projected_factors", fail_second)
    with pytest.raises(memit_fast.SolveError, match="boom"):
        ed.edit(BATCH_2)
    assert _equal(_weights(m, hp), w1) and len(ed.history) == 1 and torch.equal(ed._accs[hp.layers[0]].kk, kk)


def _tree(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save replaces a saved session whole or not at all; no temporary folder is left behind."""
    import safetensors.torch

    m, hp, stats = _setup()
    ed = _editor(m, hp, stats, "alphaedit")
    ed.edit(tiny.REQUESTS)
    ed.edit(BATCH_2)
    ed.save(tmp_path / "s")
    two = _tree(tmp_path / "s")
    ed.undo()
    calls = []
    real = safetensors.torch.save_file

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        ed.save(tmp_path / "s")  # batch_0001 written, key_stats fails
    assert _tree(tmp_path / "s") == two and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "s"]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    ed.save(tmp_path / "s")  # one batch now: batch_0002 is gone with the old session
    assert sorted(_tree(tmp_path / "s")) == ["batch_0001.safetensors", "key_stats.safetensors", "session.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "s"]
    ed2 = memit_fast.Editor.load(tiny.model("llama"), tiny.tokenizer(), tmp_path / "s", stats=stats, progress=False)
    assert ed2.n_edits == len(tiny.REQUESTS) and _equal(_weights(ed2.model, hp), _weights(m, hp))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an editing session"):
        ed.save(tmp_path / "other")
    assert _tree(tmp_path / "other") == {"notes.txt": b"mine"}


def test_batch_work_does_not_depend_on_history(monkeypatch):
    """edit() never replays the earlier batches, and the state it keeps (AlphaEdit's basis and
    accumulators) keeps its shapes and device whatever the number of batches before."""
    import memit_fast.editor as editor_module

    monkeypatch.setattr(editor_module.Editor, "_replay", lambda self: pytest.fail("edit replayed the history"))
    m, hp, stats = _setup()
    ed = _editor(m, hp, stats, "alphaedit")

    def state():
        return {(layer, part): (getattr(acc, part).shape, getattr(acc, part).device) for layer, acc in ed._accs.items() for part in ("basis", "kk", "proj")}

    ed.edit(tiny.REQUESTS)
    first = state()
    for batch in (BATCH_2, BATCH_3, BATCH_2):
        ed.edit(batch)
        assert state() == first
