"""restore: the README's two lines restore bit-exactly; bad originals are refused before any write."""

import re
from pathlib import Path

import pytest
import torch

import memit_fast
import tiny
from memit_fast.errors import RestoreError

README = Path(__file__).resolve().parents[1] / "README.md"


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _unchanged(m, snap):
    return all(torch.equal(p, snap[n]) for n, p in m.named_parameters())


def _readme_usage() -> str:
    """The first python block of the README, as written."""
    return re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_readme_usage_runs_verbatim_and_restores_bit_exactly(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMIT_FAST_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny.corpus_lines(60)), encoding="utf-8")
    model = tiny.model(arch, dtype=torch.float32)
    hparams = tiny.hparams(model, v_num_grad_steps=3, mom2_dataset=str(corpus), mom2_n_samples=60)
    before = _snapshot(model)
    code = _readme_usage()
    assert "memit_fast.apply(model, tok, requests, hparams)" in code and "memit_fast.restore(model, orig_weights)" in code
    lines = code.splitlines()
    cut = next(i for i, line in enumerate(lines) if "memit_fast.restore" in line)
    scope = {"model": model, "tok": tiny.tokenizer(), "requests": tiny.REQUESTS, "hparams": hparams}
    exec("\n".join(lines[:cut]), scope)  # import and apply
    edited = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert edited == set(scope["orig_weights"]) == {hparams.rewrite_module_tmp.format(i) + ".weight" for i in hparams.layers}
    assert all(v.device.type == "cpu" for v in scope["orig_weights"].values())
    exec("\n".join(lines[cut:]), scope)  # restore
    assert _unchanged(model, before)
    exec(code, scope)  # the whole block, as written
    assert _unchanged(model, before)


def _edited_name(m):
    return tiny.hparams(m).rewrite_module_tmp.format(2) + ".weight"


def _bad_cases(m):
    """(id, orig_weights, message pattern): each holds a good entry (the weight + 1) and one bad."""
    name = _edited_name(m)
    p = dict(m.named_parameters())[name]
    good = {name: p.detach() + 1}
    other = next(n for n, _ in m.named_parameters() if n != name)
    q = dict(m.named_parameters())[other]
    return [
        ("unknown name", good | {"no.such.weight": torch.zeros(3)}, r"'no\.such\.weight' is not a parameter"),
        ("shape", good | {other: torch.zeros(q.numel() + 1)}, rf"{re.escape(other)}: shape .* != the parameter's"),
        ("dtype", good | {other: q.detach().to(torch.float16)}, rf"{re.escape(other)}: dtype torch.float16 != the parameter's torch.float32"),
        ("device", good | {other: torch.empty(q.shape, dtype=q.dtype, device="meta")}, rf"{re.escape(other)}: on meta"),
        ("not a tensor", good | {other: q.detach().tolist()}, rf"{re.escape(other)}: expected a tensor, got list"),
    ]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_bad_originals_are_refused_and_nothing_is_written(arch, case):
    m = tiny.model(arch, dtype=torch.float32)
    before = _snapshot(m)
    _, orig, pattern = _bad_cases(m)[case]
    with pytest.raises(RestoreError, match="restore wrote nothing: 1 of 2 original weights do not fit the model: .*" + pattern):
        memit_fast.restore(m, orig)
    assert _unchanged(m, before)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_empty_or_non_dict_originals_say_why(arch):
    m = tiny.model(arch, dtype=torch.float32)
    before = _snapshot(m)
    with pytest.raises(RestoreError, match=r"empty dict\): apply was called with return_orig_weights=False"):
        memit_fast.restore(m, {})
    with pytest.raises(RestoreError, match="needs the dict of original weights that apply returns, got tuple"):
        memit_fast.restore(m, (m, {}))
    assert _unchanged(m, before)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_return_orig_weights_false_then_restore_is_refused(arch):
    m = tiny.model(arch, dtype=torch.float32)
    hp = tiny.hparams(m, v_num_grad_steps=2, mom2_adjustment=False)
    _, orig = memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, hp, context_templates=tiny.TEMPLATES, progress=False, return_orig_weights=False)
    assert orig == {}
    edited = _snapshot(m)
    with pytest.raises(RestoreError, match="return_orig_weights=False"):
        memit_fast.restore(m, orig)
    assert _unchanged(m, edited)


def test_good_originals_from_the_device_or_cpu_are_written():
    m = tiny.model("llama", dtype=torch.float32)
    before = _snapshot(m)
    name = _edited_name(m)
    with torch.no_grad():
        dict(m.named_parameters())[name].mul_(2)
    memit_fast.restore(m, {name: before[name].clone()})
    assert _unchanged(m, before)
