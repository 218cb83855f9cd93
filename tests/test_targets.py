"""Batched target vectors z equal one-at-a-time ones (docs/algorithm.md section 2)."""

import pytest
import torch

from memit_fast import targets
from memit_fast.edit_requests import normalize_requests
from memit_fast.reference import reference_z
from memit_fast.targets import compute_targets as _compute_targets
from memit_fast.templates import flatten
from memit_fast.tokens import encode_requests

import tiny


def compute_targets(m, tok, reqs, hp, templates, **kw):
    return _compute_targets(m, tok, encode_requests(tok, reqs, flatten(templates), hp.fact_token), hp, **kw)


def _rel(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_batched_z_equals_one_at_a_time(arch):
    m, tok = tiny.model(arch), tiny.tokenizer()
    hp = tiny.hparams(m)
    reqs = normalize_requests(tiny.REQUESTS)
    batched = compute_targets(m, tok, reqs, hp, tiny.TEMPLATES, progress=False)
    alone = torch.cat([compute_targets(m, tok, [r], hp, tiny.TEMPLATES, progress=False) for r in reqs])
    ref = torch.stack([reference_z(m, tok, r, hp, tiny.TEMPLATES) for r in reqs])
    assert batched.dtype == torch.float64
    # float64 models: the only differences are rounding. The reference runs the KL prompt as its
    # own row; the fast path reads it from the bare row (shortcut 5), so the KL and NLL gradients
    # meet at that row instead of at delta: each alone is bit-identical, their sum rounds
    # differently, and tiny llama's backward amplifies that to ~2e-8.
    assert _rel(batched, alone) < 1e-9
    assert _rel(batched, ref) < 1e-7


def test_z_moves_towards_the_target():
    m, tok = tiny.model("llama"), tiny.tokenizer()
    hp = tiny.hparams(m, v_num_grad_steps=1)
    reqs = normalize_requests(tiny.REQUESTS)
    h_init = compute_targets(m, tok, reqs, hp, tiny.TEMPLATES, progress=False)  # one step: no update
    z = compute_targets(m, tok, reqs, hp.replace(v_num_grad_steps=10), tiny.TEMPLATES, progress=False)
    assert (z - h_init).norm(dim=1).min() > 0
    # the clamp: ||z - h_init|| <= clamp_norm_factor * ||h_init||
    assert ((z - h_init).norm(dim=1) <= hp.clamp_norm_factor * h_init.norm(dim=1) * (1 + 1e-9)).all()


def test_early_stop_per_request(monkeypatch):
    """Requests that meet the stop rule leave the batch and keep their z; the others go on."""
    m, tok = tiny.model("gpt2"), tiny.tokenizer()
    hp = tiny.hparams(m, v_num_grad_steps=8)
    reqs = normalize_requests(tiny.REQUESTS)
    h_init = compute_targets(m, tok, reqs, hp.replace(v_num_grad_steps=1), tiny.TEMPLATES, progress=False)
    monkeypatch.setattr(targets, "STOP_LOSS", 1e9)  # everyone stops at step 0
    assert torch.equal(compute_targets(m, tok, reqs, hp, tiny.TEMPLATES, progress=False), h_init)
    # A threshold between the two lowest first-step losses: one request stops at once, others go on.
    first = [_step0_loss(m, tok, r, hp) for r in reqs]
    low = sorted(first)
    monkeypatch.setattr(targets, "STOP_LOSS", (low[0] + low[1]) / 2)
    mixed = compute_targets(m, tok, reqs, hp, tiny.TEMPLATES, progress=False)
    ref = torch.stack([reference_z(m, tok, r, hp, tiny.TEMPLATES) for r in reqs])
    assert _rel(mixed, ref) < 1e-9
    stopped = [i for i in range(len(reqs)) if torch.equal(mixed[i], h_init[i])]
    assert stopped == [first.index(low[0])]


def _step0_loss(m, tok, request, hp):
    """The loss of the first step (delta = 0): NLL + KL (0) + decay (0)."""
    from memit_fast.targets import build_rows

    rows = build_rows(encode_requests(tok, [request], flatten(tiny.TEMPLATES), hp.fact_token)[0])
    nll = []
    with torch.no_grad():
        for ids, start in zip(rows.ids, rows.target_start):
            lp = m(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            pos = torch.arange(len(rows.target)) + start
            nll.append(-lp[pos, torch.tensor(rows.target)].mean())
    return float(torch.stack(nll).mean())


def test_chunking_does_not_change_z():
    """Chunks of one request each (a budget below any request) give the batched z."""
    m, tok = tiny.model("gptj"), tiny.tokenizer()
    hp = tiny.hparams(m)
    reqs = normalize_requests(tiny.REQUESTS)
    together = compute_targets(m, tok, reqs, hp, tiny.TEMPLATES, progress=False)
    one_by_one = compute_targets(m, tok, reqs, hp, tiny.TEMPLATES, chunk_tokens=1, progress=False)
    assert _rel(one_by_one, together) < 1e-9


def test_steps_out_counts_each_requests_adam_steps(monkeypatch):
    """steps_out holds the Adam steps each request took: a request that meets the stop rule at
    once keeps z = h_init (what one step of v_num_grad_steps=1 returns), the others run to the end;
    batched and one-at-a-time runs agree on every count. (The tiny model's loss starts near
    ln(vocab); a stop loss between the requests' first losses makes them stop apart.)"""
    m, tok = tiny.model("llama"), tiny.tokenizer()
    hp = tiny.hparams(m, v_num_grad_steps=8, v_lr=2.0)
    reqs = normalize_requests(tiny.REQUESTS)
    monkeypatch.setattr(targets, "STOP_LOSS", 6.85)
    steps = torch.full((len(reqs),), -1, dtype=torch.long)
    z = compute_targets(m, tok, reqs, hp, tiny.TEMPLATES, progress=False, steps_out=steps)
    assert sorted(steps.tolist()) == [0, 7, 7]
    for i, r in enumerate(reqs):
        alone = torch.zeros(1, dtype=torch.long)
        compute_targets(m, tok, [r], hp, tiny.TEMPLATES, progress=False, steps_out=alone)
        assert alone.item() == steps[i]
    stopped = int((steps == 0).nonzero()[0, 0])
    h_init = compute_targets(m, tok, [reqs[stopped]], hp.replace(v_num_grad_steps=1), tiny.TEMPLATES, progress=False)
    assert torch.equal(z[stopped], h_init[0])


def test_kl_row_read_from_the_bare_row(monkeypatch):
    """Shortcut 5: where the KL prompt's tokens up to the subject are the bare prompt's, the KL row
    is not run and z is what it is with the KL row run (float64)."""
    m, tok = tiny.model("gpt2"), tiny.tokenizer()
    hp = tiny.hparams(m)
    reqs = normalize_requests(tiny.REQUESTS)
    enc = encode_requests(tok, reqs, flatten(tiny.TEMPLATES), hp.fact_token)
    shared = [targets.build_rows(e).kl_in_bare for e in enc]
    assert any(shared)  # the tiny requests exercise the shortcut
    with_shortcut = torch.cat([_compute_targets(m, tok, [e], hp, progress=False) for e in enc])
    build = targets.build_rows

    def without(e):
        rows = build(e)
        rows.kl_in_bare = False
        return rows

    monkeypatch.setattr(targets, "build_rows", without)
    without_shortcut = torch.cat([_compute_targets(m, tok, [e], hp, progress=False) for e in enc])
    assert _rel(with_shortcut, without_shortcut) < 1e-9


RUNNERS = {"shared": "shared_suffix_runner", "templates": "template_suffix_runner", "per_row": "suffix_runner"}


def _spy_runners(monkeypatch, layout):
    """Count the layout's runner builds: templates held once ("shared"), templates computed once
    and copied per row ("templates"), every row's whole prefix ("per_row")."""
    calls = dict.fromkeys(RUNNERS, 0)
    for key, name in RUNNERS.items():
        method = getattr(layout, name)

        def counted(*a, method=method, key=key, **k):
            calls[key] += 1
            return method(*a, **k)

        monkeypatch.setattr(layout, name, counted)
    return calls


def _cache_mode(monkeypatch, layout, mode: str) -> None:
    """The layout's prefix cache: "shared", "templates" (the default) or "per_row"."""
    monkeypatch.setattr(type(layout), "shared_prefix", mode == "shared")
    monkeypatch.setattr(type(layout), "prefix_from_templates", mode == "templates")


def test_default_cache_is_built_from_the_templates():
    """The default: the per-row cache, built with the templates' keys and values computed once."""
    from memit_fast.layouts import layout_for

    m = tiny.model("llama")
    layout = layout_for(m, tiny.hparams(m))
    assert (layout.shared_prefix, layout.prefix_from_templates) == (False, True)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_template_caches_do_not_change_z(arch, monkeypatch):
    """Shortcut 1's shared part: the context templates' keys and values computed once per chunk,
    held once or copied into each row's cache, give the z of the per-row prefix cache built from
    whole prefixes (float64), early stops (the batch shrinking) included."""
    from memit_fast.layouts import layout_for

    m, tok = tiny.model(arch), tiny.tokenizer()
    hp = tiny.hparams(m, v_num_grad_steps=8)
    reqs = normalize_requests(tiny.REQUESTS)
    layout = layout_for(m, hp)
    calls = _spy_runners(monkeypatch, layout)
    first = [_step0_loss(m, tok, r, hp) for r in reqs]
    monkeypatch.setattr(targets, "STOP_LOSS", sorted(first)[1] + 1e-6)  # some stop at once, the others go on
    z = {}
    for mode in RUNNERS:
        _cache_mode(monkeypatch, layout, mode)
        z[mode] = compute_targets(m, tok, reqs, hp, tiny.TEMPLATES, progress=False, layout=layout)
        assert calls[mode] == 2  # one chunk per KL-row group
    assert sum(calls.values()) == 6
    assert _rel(z["shared"], z["per_row"]) < 1e-9
    assert _rel(z["templates"], z["per_row"]) < 1e-9


@pytest.mark.parametrize("mode", ["shared", "templates"])
def test_rows_without_their_template_fall_back_per_row(mode, monkeypatch):
    """A row that does not start with its template's tokens (those of more than half of the
    requests) keeps its whole prefix per row, and z is unchanged; when no request's rows start
    with shared tokens, the chunk runs the per-row prefix cache."""
    from memit_fast.layouts import layout_for
    from memit_fast.tokens import EncodedPrompt, EncodedRequest

    m, tok = tiny.model("llama"), tiny.tokenizer()
    hp = tiny.hparams(m)
    reqs = normalize_requests(tiny.REQUESTS)[::2]  # two requests whose KL rows are read from the bare row
    enc = encode_requests(tok, reqs, flatten(tiny.TEMPLATES), hp.fact_token)
    rows = [targets.build_rows(e) for e in enc]
    assert all(r.kl_in_bare for r in rows)
    templates = targets._template_tokens(rows, 3)
    assert [len(t) for t in templates] == [0, 3, 7]

    def first_token(e, which, token):
        """e with the first token of its rows `which` replaced (they no longer start with their template's tokens)."""
        prompts = [EncodedPrompt([token] + p.ids[1:], p.lookup) if j in which else p for j, p in enumerate(e.prompts)]
        return EncodedRequest(prompts, e.kl, e.target)

    other = enc[0].prompts[1].ids[0] + 1
    changed = [enc[0], first_token(enc[1], {2}, other), enc[0], enc[1]]  # template 2's tokens: 3 of 4 requests
    assert targets._template_tokens([targets.build_rows(e) for e in changed], 3) == templates
    split = targets._shared_split([targets.build_rows(e) for e in changed], 3, templates, 0, "cpu")
    assert split[-1].tolist() == [False, True, True] + [False, True, False] + [False, True, True] * 2
    layout = layout_for(m, hp)
    calls = _spy_runners(monkeypatch, layout)
    _cache_mode(monkeypatch, layout, mode)
    z = _compute_targets(m, tok, changed, hp, progress=False, layout=layout)
    assert calls[mode] == 1 and calls["per_row"] == 0
    _cache_mode(monkeypatch, layout, "per_row")
    alone = torch.cat([_compute_targets(m, tok, [e], hp, progress=False, layout=layout) for e in changed[:2]])
    assert _rel(z[:2], alone) < 1e-9
    _cache_mode(monkeypatch, layout, mode)
    # no tokens shared by more than half of the requests: the per-row prefix cache
    changed = [enc[0], first_token(enc[1], {1, 2}, other)]
    assert targets._template_tokens([targets.build_rows(e) for e in changed], 3) == [[], [], []]
    z = _compute_targets(m, tok, changed, hp, progress=False, layout=layout)
    assert calls[mode] == 1 and calls["per_row"] == 3
    _cache_mode(monkeypatch, layout, "per_row")
    alone = torch.cat([alone[:1], _compute_targets(m, tok, changed[1:], hp, progress=False, layout=layout)])
    assert _rel(z, alone) < 1e-9


def _plan(planner, suffix, prefix, shared=False):
    """Chunks (index lists) that planner.next_chunk makes of requests sorted longest suffix first."""
    todo, out = list(range(len(suffix))), []
    while todo:
        n, _ = planner.next_chunk([suffix[i] for i in todo], [prefix[i] for i in todo], shared)
        out.append(todo[:n])
        todo = todo[n:]
    return out


def test_chunk_planner_counts_the_cached_prefix():
    """GPU chunking: a chunk's padded suffix (rows x widest suffix) and padded prefix (rows x
    widest cached prefix) bytes stay within the budget; one request at least per chunk."""
    suffix, prefix = [30, 20, 20, 10, 10], [5, 40, 5, 5, 5]
    # suffix only: 2 x 30 = 60 <= 60, then 20 x 3 = 60
    assert _plan(targets.ChunkPlanner(60, 1.0, {False: 0.0}), suffix, prefix) == [[0, 1], [2, 3, 4]]
    # the prefix counted: {0, 1} would be 2 x (30 + 40) = 140 > 130; {1, 2, 3} 3 x (20 + 40) = 180 > 130
    assert _plan(targets.ChunkPlanner(130, 1.0, {False: 1.0}), suffix, prefix) == [[0], [1, 2], [3, 4]]
    assert _plan(targets.ChunkPlanner(1, 1.0, {False: 1.0}), suffix, prefix) == [[0], [1], [2], [3], [4]]
    # the shared-template cache has its own bytes per prefix token
    assert _plan(targets.ChunkPlanner(130, 1.0, {False: 1.0, True: 0.0}), suffix, prefix, shared=True) == [[0, 1, 2, 3], [4]]


def test_chunk_planner_scales_by_the_measured_peak(monkeypatch):
    """The largest measured/estimated ratio so far scales the next estimates: a chunk that used
    half its estimate lets the next chunks be about twice as large; one over it shrinks them."""
    from memit_fast import profiling

    planner = targets.ChunkPlanner(100, 1.0, {False: 0.0})
    used = {}
    monkeypatch.setattr(profiling, "restart_peak", lambda device=None: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1000 + used["bytes"])
    suffix = [10] * 40
    n, estimate = planner.next_chunk(suffix, [0] * 40, False)
    assert (n, estimate) == (10, 100)
    used["bytes"] = 50
    planner.measure(lambda: None, estimate)
    assert planner.scale == 0.5 and planner.next_chunk(suffix, [0] * 40, False)[0] == 20
    used["bytes"] = 400  # a chunk of estimate 200 used 400: scale 2, never back down
    planner.measure(lambda: None, 200)
    assert planner.scale == 2.0 and planner.next_chunk(suffix, [0] * 40, False)[0] == 5
    planner.measure(lambda: None, 400)
    assert planner.scale == 2.0 and planner.peak == 400


def test_default_gpu_chunking_counts_the_prefix(monkeypatch):
    """compute_targets' default chunking (the GPU's, forced here) sizes chunks by suffix and
    cached prefix bytes: with the prefix dear, more chunks; z the same either way."""
    m, tok = tiny.model("gpt2"), tiny.tokenizer()
    hp = tiny.hparams(m, v_num_grad_steps=3)
    reqs = normalize_requests(tiny.REQUESTS * 4)
    seen = []
    optimise = targets._optimise_chunk
    monkeypatch.setattr(targets, "_optimise_chunk", lambda m, l, t, rows, *a: seen.append(len(rows)) or optimise(m, l, t, rows, *a))
    monkeypatch.setattr(targets.ChunkPlanner, "measure", lambda self, run, estimate: run())
    z = {}
    for per_prefix in (0.0, 10.0):
        seen.clear()
        planner = targets.ChunkPlanner(300.0, 1.0, {False: per_prefix, True: per_prefix})
        monkeypatch.setattr(targets.ChunkPlanner, "for_model", classmethod(lambda cls, *a, planner=planner: planner))
        z[per_prefix] = compute_targets(m, tok, reqs, hp, tiny.TEMPLATES, progress=False)
        counts = list(seen)
        if per_prefix == 0:
            free = counts
    assert sum(free) == sum(counts) == len(reqs) and len(counts) > len(free)
    assert _rel(z[10.0], z[0.0]) < 1e-9
