"""Inputs longer than the model's context are refused before any work, with the limit named."""

import pytest
import torch

import memit_fast
import tiny
from memit_fast import api
from memit_fast.errors import RequestError
from memit_fast.tokens import check_context, context_length, encode_requests
from memit_fast.edit_requests import normalize_requests

WORDS = " ".join(tiny.corpus_lines(400)).split()


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _text(n_tokens: int) -> str:
    """Words from the corpus, cut to exactly n_tokens tokens of the tiny tokenizer."""
    tok = tiny.tokenizer()
    ids = tok(" ".join(WORDS[: 2 * n_tokens]), add_special_tokens=False)["input_ids"][:n_tokens]
    return tok.decode(ids)


def _no_work(monkeypatch):
    """Any statistics, z or update work fails the test."""
    for name in ("_covariances", "compute_targets", "apply_update", "reference_edit"):
        monkeypatch.setattr(api, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran"))


@pytest.mark.parametrize("mode", ["fast", "reference"])
@pytest.mark.parametrize("where", ["prompt", "target", "template"])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_too_long_refused_before_any_work(arch, where, mode, monkeypatch):
    m = tiny.model(arch, dtype=torch.float32)
    limit = 256  # the tiny models' n_positions / max_position_embeddings
    assert context_length(m.config)[0] == limit
    long = _text(300)
    request = {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": {"str": "baseball"}}
    templates = tiny.TEMPLATES
    if where == "prompt":
        request["prompt"] = long + " {} plays"
    elif where == "target":  # the prompt fits; prompt + target does not
        request["target_new"] = {"str": _text(250)}
    else:  # the bare prompt and target fit; a context template makes the row too long
        templates = [["{}"], [_text(250) + ". {}"]]
    _no_work(monkeypatch)
    before = _snapshot(m)
    first = "request 0 \\(prompt .*subject 'France'" if where == "template" else "request 1 \\(prompt .*subject 'Michael Jordan'"  # a template lengthens every request
    with pytest.raises(RequestError, match=first + rf".*\) needs \d+ tokens \(longest context template \+ prompt \+ target\), more than the model's context of {limit} positions \(config\.(n_positions|max_position_embeddings)\)"):
        memit_fast.apply(m, tiny.tokenizer(), [tiny.REQUESTS[1], request], tiny.hparams(m), mode=mode, context_templates=templates, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_the_limit_is_exact():
    """A row of exactly the context passes; one token more is refused (target's last token is not fed)."""
    tok = tiny.tokenizer()

    class Config:
        n_positions = 0

    reqs = normalize_requests([{"prompt": "{} is", "subject": "Paris", "target_new": {"str": " the capital city"}}])
    enc = encode_requests(tok, reqs, ["{}", "Some words first. {}"], "subject_last")
    longest = max(len(p.ids) for p in enc[0].prompts) + len(enc[0].target) - 1
    Config.n_positions = longest
    check_context(reqs, enc, Config())
    Config.n_positions = longest - 1
    with pytest.raises(RequestError, match=f"needs {longest} tokens .* context of {longest - 1} positions"):
        check_context(reqs, enc, Config())
    check_context(reqs, enc, object())  # a config without a context field: nothing to check
