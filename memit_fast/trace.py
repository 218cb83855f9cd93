"""Causal tracing (docs/tracing.md): which hidden states carry a fact to the model's prediction.

The subject's input embeddings are corrupted with Gaussian noise; then, one (layer, token) at a
time, a state of the clean run is put back into the corrupted run: the whole block output
("hidden"), or the MLP output ("mlp") or the attention output ("attn") over a window of layers
centred on the layer. The probability of the answer's first token after each restoration, less
the corrupted run's, is that state's indirect effect.

    result = causal_trace(model, tok, facts)        # facts: known-facts or prompt/subject/answer dicts
    result.average()["mlp"]                          # (6 token groups, L layers) average indirect effect
    suggest_layers(result, 5)                        # the band of 5 MLP layers with the largest effect

`mode="fast"` runs every restoration of many facts in a few batched forwards through the model's
layout (memit_fast/layouts), each restored row starting at the first block and the first token it
changes, from the corrupted run's state there and over its cached keys and values of the earlier
tokens (docs/tracing.md, "How it runs fast"); `mode="reference"` keeps the original notebook's structure (one
forward per restoration: the clean row and the noise samples, patched by forward hooks on the
HF modules) and is the check and the speed baseline of the fast mode.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

from .errors import ConfigError, RequestError
from .layouts import Layout, layout_for
from .layouts.base import cache_key_dtype
from .model_access import block_output, get_module, hooks, model_device, with_block_output
from .tokens import encode_prompts, encode_target, pad_id, pad_right

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
TOKEN_GROUPS = ("first subject token", "middle subject tokens", "last subject token",
                "first subsequent token", "further tokens", "last token")


@dataclass(frozen=True)
class Fact:
    """One prompt to trace: `subject` must occur in `prompt`; `answer` (None: the model's own
    prediction) is the text whose first token's probability is measured."""

    prompt: str
    subject: str
    answer: str | None = None


def read_facts(records) -> list[Fact]:
    """Facts from ROME's known-facts dicts (prompt, subject, attribute) or prompt/subject/answer
    dicts (a prompt may hold "{}" for the subject). A record without a prompt or subject string
    raises RequestError."""
    if not isinstance(records, list):
        raise RequestError(f"facts must be a list of dicts, not {type(records).__name__}")
    facts = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("subject"), str):
            raise RequestError(f"fact {i} is not a dict with string 'prompt' and 'subject' (known-facts or prompt/subject/answer format)")
        answer = r.get("answer", r.get("attribute"))
        if answer is not None and not isinstance(answer, str):
            raise RequestError(f"fact {i}: the answer must be a string, got {answer!r}")
        facts.append(Fact(r["prompt"].replace("{}", r["subject"]), r["subject"], answer))
    return facts


@dataclass
class FactTrace:
    """The trace of one fact. scores[kind]: (T, L) probability of the answer after restoring that
    (token, layer) of the clean run (tokens before the subject are unchanged by the noise, so their
    scores are the corrupted probability)."""

    index: int  # position in the input list
    fact: Fact
    tokens: list[str]
    subject: tuple[int, int]  # subject tokens [first, last + 1)
    answer: str  # the answer's first token
    p_clean: float
    p_corrupted: float
    scores: dict[str, list[list[float]]]

    def groups(self) -> list[list[int]]:
        """Token indices of each of TOKEN_GROUPS (some may be empty)."""
        a, b, T = self.subject[0], self.subject[1], len(self.tokens)
        return [[a], list(range(a + 1, b - 1)), [b - 1], [b] if b < T - 1 else [], list(range(b + 1, T - 1)), [T - 1]]

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt": self.fact.prompt, "subject": self.fact.subject, "given_answer": self.fact.answer,
                "tokens": self.tokens, "subject_tokens": list(self.subject), "answer_token": self.answer,
                "p_clean": self.p_clean, "p_corrupted": self.p_corrupted, "scores": self.scores}


@dataclass
class TraceResult:
    traces: list[FactTrace]
    skipped: list[tuple[int, str]]  # (input index, reason)
    n_layers: int
    noise_std: float
    settings: dict
    seconds: float = 0.0
    kinds: tuple[str, ...] = KINDS

    def average(self, kind: str | None = None):
        """Average indirect effect (6 token groups, L): restored minus corrupted probability,
        averaged over a fact's tokens in each group, then over the facts that have the group.
        Without `kind`, {kind: tensor} for every traced kind."""
        if kind is None:
            return {k: self.average(k) for k in self.kinds}
        total = torch.zeros(len(TOKEN_GROUPS), self.n_layers, dtype=torch.float64)
        count = torch.zeros(len(TOKEN_GROUPS), 1, dtype=torch.float64)
        for tr in self.traces:
            ie = torch.tensor(tr.scores[kind], dtype=torch.float64) - tr.p_corrupted
            for g, rows in enumerate(tr.groups()):
                if rows:
                    total[g] += ie[rows].mean(0)
                    count[g] += 1
        return total / count.clamp(min=1)

    def total_effect(self) -> float:
        """Average over facts of p_clean - p_corrupted."""
        return sum(t.p_clean - t.p_corrupted for t in self.traces) / max(1, len(self.traces))

    def summary(self) -> dict:
        return {"facts_traced": len(self.traces), "facts_skipped": len(self.skipped), "n_layers": self.n_layers,
                "noise_std": self.noise_std, "seconds": self.seconds, "average_total_effect": self.total_effect(),
                "average_p_clean": sum(t.p_clean for t in self.traces) / max(1, len(self.traces)),
                "average_p_corrupted": sum(t.p_corrupted for t in self.traces) / max(1, len(self.traces)),
                "average_indirect_effect": {k: v.tolist() for k, v in self.average().items()}, "token_groups": list(TOKEN_GROUPS),
                "settings": self.settings}

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "skipped": [{"index": i, "reason": r} for i, r in self.skipped],
                "facts": [t.to_dict() for t in self.traces]}


def suggest_layers(result: TraceResult, n: int, kind: str = "mlp", group: str = "last subject token") -> list[int]:
    """The n consecutive layers whose average indirect effect (of `kind`, at `group`) sums highest."""
    if not result.traces:
        raise RequestError("no fact was traced, so there is no effect to suggest layers from")
    if not 1 <= n <= result.n_layers:
        raise RequestError(f"cannot choose {n} layers of {result.n_layers}")
    aie = result.average(kind)[TOKEN_GROUPS.index(group)]
    sums = aie.unfold(0, n, 1).sum(1)
    start = int(sums.argmax())
    return list(range(start, start + n))


def suggested_hparams(result: TraceResult, hparams):
    """hparams with its layers replaced by the suggested band of the same length."""
    return hparams.replace(layers=suggest_layers(result, len(hparams.layers)))


# ---- preparing the facts ----

@dataclass
class _Prepared:
    index: int
    fact: Fact
    ids: list[int]
    subject: tuple[int, int]


def _prepare(tok, facts: list[Fact]) -> tuple[list[_Prepared], list[tuple[int, str]]]:
    ready, skipped = [], []
    for i, f in enumerate(facts):
        at = f.prompt.find(f.subject)
        if not f.subject or at < 0:
            skipped.append((i, f"subject {f.subject!r} is not in the prompt {f.prompt!r}"))
            continue
        parts = [(f.prompt[:at], f.subject, f.prompt[at + len(f.subject):])]
        try:
            first = encode_prompts(tok, parts, "subject_first")[0]
            last = encode_prompts(tok, parts, "subject_last")[0]
        except RequestError as e:
            skipped.append((i, str(e)))
            continue
        ready.append(_Prepared(i, f, first.ids, (first.lookup, last.lookup + 1)))
    return ready, skipped


def noise_std_of(model, prepared: list[_Prepared]) -> float:
    """Standard deviation of the input embeddings of the subjects' tokens (all dims pooled)."""
    emb = model.get_input_embeddings()
    device = model_device(model)
    ids = torch.tensor([t for p in prepared for t in p.ids[p.subject[0]:p.subject[1]]], device=device)
    with torch.no_grad():
        return float(emb(ids).float().std())


def _noise(p: _Prepared, samples: int, d: int, std: float, seed: int) -> torch.Tensor:
    """(samples, subject tokens, d) Gaussian noise of fact p, seeded by (seed, its input index)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + p.index)
    return torch.randn(samples, p.subject[1] - p.subject[0], d, generator=g, dtype=torch.float32) * std


def _window(layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """Layers [lo, hi) restored for a window centred on `layer` (as ROME: layer - w//2 .. layer + ceil(w/2))."""
    return max(0, layer - window // 2), min(n_layers, layer - (-window // 2))


# ---- the trace ----

def causal_trace(model, tok, facts, hparams=None, *, samples: int = 10, noise: float = 3.0, noise_std: float | None = None,
                 window: int = 10, answer: str = "given", kinds=KINDS, seed: int = 0, batch_tokens: int | None = None,
                 mode: str = "fast", progress: bool = True, max_seconds: float | None = None, generic: bool = False) -> TraceResult:
    """Trace `facts` (Fact objects or dicts, see read_facts). answer="given": a fact's answer must be
    the model's top-1 prediction (else it is skipped); "model": the prediction is the answer.
    noise: the noise's standard deviation in units of the subjects' embedding deviation (noise_std
    sets it directly). batch_tokens: padded tokens per forward (default 32768 on CUDA, 4096 on CPU).
    max_seconds: stop after the fact group that passes it (the rest are reported as skipped)."""
    from .presets import for_model

    if mode not in ("fast", "reference"):
        raise ConfigError(f"mode must be 'fast' or 'reference', got {mode!r}")
    if answer not in ("given", "model"):
        raise ConfigError(f"answer must be 'given' or 'model', got {answer!r}")
    if samples < 1 or window < 1 or not noise >= 0 or (noise_std is not None and not noise_std > 0):
        raise ConfigError(f"need samples >= 1 (got {samples}), window >= 1 (got {window}), noise >= 0 (got {noise}) and noise_std > 0 (got {noise_std})")
    if not kinds or set(kinds) - set(KINDS):
        raise ConfigError(f"kinds must be some of {KINDS}, got {kinds}")
    if len({p.device for p in model.parameters()}) > 1:
        raise ConfigError("tracing a model split over several devices is not supported (its restored rows would meet "
                          "hidden states on another GPU); trace it on one device")
    facts = read_facts(facts) if facts and isinstance(facts[0], dict) else list(facts)
    hparams = hparams or for_model(model)
    layout = layout_for(model, hparams, generic=generic)
    device = model_device(model)
    batch_tokens = batch_tokens or (32768 if device.type == "cuda" else 4096)
    start = time.perf_counter()
    prepared, skipped = _prepare(tok, facts)
    std = noise_std if noise_std is not None else (noise * noise_std_of(model, prepared) if prepared else 0.0)
    log.info("tracing %d facts (%d skipped): noise std %.4g, %d samples, window %d, %s mode", len(prepared), len(skipped), std, samples, window, mode)
    settings = dict(samples=samples, noise=noise, window=window, answer=answer, kinds=list(kinds), seed=seed, mode=mode,
                    batch_tokens=batch_tokens, layout=type(layout).__name__)
    result = TraceResult([], skipped, layout.n_layers, std, settings, kinds=tuple(kinds))
    # groups of facts of similar length, each small enough that its recorded states fit, taken in
    # a seeded random order (a time limit then leaves no length out on purpose)
    prepared.sort(key=lambda p: len(p.ids))
    longest = max((len(p.ids) for p in prepared), default=1)
    group_size = 1 if mode == "reference" else min(64, max(1, batch_tokens // (4 * samples * longest)))
    groups = [prepared[i:i + group_size] for i in range(0, len(prepared), group_size)]
    random.Random(seed).shuffle(groups)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prepared), desc="tracing", unit="fact", disable=not progress)
    deadline = None if max_seconds is None else start + max_seconds
    for gi, group in enumerate(groups):
        traced, dropped = (_trace_group if mode == "fast" else _trace_reference)(
            model, tok, layout, hparams, group, samples=samples, std=std, window=window, answer=answer, kinds=kinds,
            seed=seed, batch_tokens=batch_tokens, deadline=deadline)
        result.traces += traced or []
        result.skipped += dropped
        bar.update(len(group))
        if traced is None or (deadline is not None and time.perf_counter() > deadline):
            done = {i for i, _ in dropped} if traced is None else {p.index for p in group}
            left = [p for g in groups[gi:] for p in g if p.index not in done]
            result.skipped += [(p.index, f"not traced: the time limit of {max_seconds:g} s was reached") for p in left]
            break
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start
    result.traces.sort(key=lambda t: t.index)
    result.skipped.sort()
    return result


def _check_answers(tok, group, clean_logits, answer):
    """(answer ids, kept positions in group, skipped) from the clean run's last-token logits (F, V)."""
    top = clean_logits.argmax(-1).tolist()
    ids, kept, dropped = [], [], []
    for j, p in enumerate(group):
        if answer == "model":
            ids.append(top[j])
            kept.append(j)
            continue
        if p.fact.answer is None:
            dropped.append((p.index, "no answer given (use answer='model' to trace the model's own prediction)"))
            continue
        # the answer's first token, with a leading space (" Paris" after "is in") or as written
        texts = [" " + p.fact.answer.lstrip(" "), p.fact.answer]
        firsts = [encode_target(tok, t)[0] for t in texts if t.strip()]
        if not firsts:
            dropped.append((p.index, f"the answer {p.fact.answer!r} is empty"))
            continue
        if top[j] not in firsts:
            dropped.append((p.index, f"the model predicts {tok.decode([top[j]])!r}, not the answer's first token {tok.decode([firsts[0]])!r}"))
            continue
        ids.append(top[j])
        kept.append(j)
    return ids, kept, dropped


def _make_trace(tok, p: _Prepared, answer_id: int, p_clean: float, p_corrupted: float, scores: dict) -> FactTrace:
    return FactTrace(p.index, p.fact, [tok.decode([t]) for t in p.ids], p.subject, tok.decode([answer_id]),
                     p_clean, p_corrupted, {k: v.tolist() for k, v in scores.items()})


def _prob(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """(B,) probability of answers (B,) under logits (B, V), in float32."""
    return logits.float().softmax(-1).gather(1, answers[:, None])[:, 0]


def _trace_group(model, tok, layout, hparams, group, *, samples, std, window, answer, kinds, seed, batch_tokens, deadline=None):
    """The fast trace of a group of facts: the clean run and the corrupted runs recorded once, then
    every restoration of every fact as rows of a few batched forwards. (traces, skipped); traces is
    None when the deadline (a time.perf_counter() value) passed before the group was done."""
    device, L = model_device(model), layout.n_layers
    ids, _ = pad_right([p.ids for p in group], pad_id(tok), device)
    last = torch.tensor([len(p.ids) - 1 for p in group], device=device)
    clean_logits, clean = layout.patched_forward(ids, last, record=True)
    answer_ids, kept, dropped = _check_answers(tok, group, clean_logits, answer)
    if not kept:
        return [], dropped
    group = [group[j] for j in kept]
    keep = torch.tensor(kept, device=device)
    ids, last, clean_logits = ids[keep], last[keep], clean_logits[keep]
    clean = {k: v[:, keep] for k, v in clean.items()}
    F, S = ids.shape
    d = clean["hidden"].shape[-1]
    answers = torch.tensor(answer_ids, device=device)
    p_clean = _prob(clean_logits, answers)

    # the corrupted runs: `samples` rows per fact, noise on the subject's tokens
    noise = torch.zeros(F, samples, S, d, device=device, dtype=clean["hidden"].dtype)
    for f, p in enumerate(group):
        noise[f, :, p.subject[0]:p.subject[1]] = _noise(p, samples, d, std, seed).to(device, noise.dtype)
    noise = noise.flatten(0, 1)  # (F * samples, S, d), row f * samples + s
    fr = torch.arange(F, device=device).repeat_interleave(samples)
    base_logits, base = layout.patched_forward(ids[fr], last[fr], noise=noise, record=True)
    p_corr = _prob(base_logits, answers[fr]).view(F, samples).mean(1)

    # every restoration: (fact, kind, layer, token) for tokens from the subject's first on
    spec = []
    for f, p in enumerate(group):
        for k in kinds:
            for layer in range(L):
                for t in range(p.subject[0], len(p.ids)):
                    spec.append((f, KINDS.index(k), layer, t))
    spec = torch.tensor(spec, dtype=torch.long).view(-1, 4)
    _, k_, l_, _ = spec.unbind(1)
    lo = torch.where(k_ == 0, l_, (l_ - window // 2).clamp(min=0))  # layers [lo, hi) restored
    hi = torch.where(k_ == 0, l_ + 1, (l_ - (-window // 2)).clamp(max=L))
    if isinstance(layout, Layout):
        runs = _suffix_rows(layout, ids, last, noise, base["hidden"], clean, spec, lo, hi, samples, batch_tokens)
    else:
        runs = _whole_rows(layout, ids, last, noise, clean, spec, lo, hi, samples, batch_tokens)
    del base
    total = torch.zeros(len(spec), dtype=torch.float64)
    for rr, logits in runs:
        total.index_add_(0, rr, _prob(logits, answers[spec[rr, 0].to(device)]).double().cpu() / samples)
        if deadline is not None and time.perf_counter() > deadline:
            return None, dropped
    traces = []
    for f, p in enumerate(group):
        T = len(p.ids)
        scores = {k: torch.full((T, L), float(p_corr[f]), dtype=torch.float64) for k in kinds}
        mine = spec[:, 0] == f
        for k in kinds:
            sel = mine & (k_ == KINDS.index(k))
            scores[k][spec[sel, 3], l_[sel]] = total[sel]
        traces.append(_make_trace(tok, p, answer_ids[f], float(p_clean[f]), float(p_corr[f]), scores))
    return traces, dropped


def _patches(kinds, lo, hi, fd, td, tokens, clean, layers) -> dict:
    """{layer: {kind: (rows, tokens, clean values)}} restoring each row's kind ("hidden", "mlp",
    "attn" as 0, 1, 2) over its layers [lo, hi) at its token td (in the row's columns: `tokens`)."""
    patches = {}
    for j in layers:
        for k in range(3):
            sel = ((kinds == k) & (lo <= j) & (j < hi)).nonzero()[:, 0]
            if len(sel):
                sd = sel.to(fd.device)
                patches.setdefault(j, {})[KINDS[k]] = (sd, tokens[sd], clean[KINDS[k]][j][fd[sd], td[sd]])
    return patches


def _whole_rows(layout, ids, last, noise, clean, spec, lo, hi, samples, batch_tokens):
    """Restorations as whole rows run from the embeddings (any layout: the generic one patches HF's
    forward by hooks). Yields (restorations of the rows (B,), logits (B, V)), `samples` rows each."""
    device, S = ids.device, ids.shape[1]
    per = max(1, batch_tokens // S // samples)
    for c in range(0, len(spec), per):
        rr = torch.arange(c, min(c + per, len(spec))).repeat_interleave(samples)
        fd, td = spec[rr, 0].to(device), spec[rr, 3].to(device)
        b = fd * samples + torch.arange(samples, device=device).repeat(len(rr) // samples)
        patches = _patches(spec[rr, 1], lo[rr], hi[rr], fd, td, td, clean, range(layout.n_layers))
        yield rr, layout.patched_forward(ids[fd], last[fd], noise=noise[b], patches=patches)


class _Prefix:
    """Per block, the corrupted run's keys and values of rows b, tokens [0, P), gathered when read."""

    def __init__(self, kv, b, P):
        self.kv, self.b, self.P = kv, b, P

    def __getitem__(self, j):
        k, v = self.kv[j]
        return k[:, :, :self.P][self.b], v[:, :, :self.P][self.b]


def _suffix_rows(layout, ids, last, noise, hidden, clean, spec, lo, hi, samples, batch_tokens):
    """Restorations through a family layout, each run only where it changes the corrupted run: a
    restoration first changes block e = lo (e = layer + 1 for "hidden", whose row starts from the
    clean block output) at token t, so its rows start at block e from the corrupted rows' block
    inputs there, hold only tokens t.. (earlier ones stay corrupted under causal attention) and
    attend to the corrupted rows' keys and values of tokens < t. Grouped by e, sorted by length,
    at most batch_tokens tokens a forward. Yields (restorations of the rows (B,), logits (B, V))."""
    device, (F, S), L = ids.device, ids.shape, layout.n_layers
    positions = torch.arange(S, device=device).expand(F * samples, S)
    states = [layout.start(ids.repeat_interleave(samples, 0))[0] + noise, *hidden]  # block inputs, corrupted rows
    keys = cache_key_dtype(states[0].device, states[0].dtype)
    kv = [(k.to(keys), v) for k, v in (layout.input_kv(j, states[j], positions) for j in range(L))]
    clean_in = [None, *clean["hidden"]]
    kinds, layer, t_ = spec[:, 1], spec[:, 2], spec[:, 3]
    enter = torch.where(kinds == 0, layer + 1, lo)
    length = last.cpu()[spec[:, 0]] + 1 - t_
    for e in enter.unique().tolist():
        which = (enter == e).nonzero()[:, 0]
        which = which[length[which].argsort(stable=True)]
        lengths = length[which].tolist()
        c = 0
        while c < len(which):
            n = 1
            while c + n < len(which) and (n + 1) * samples * lengths[c + n] <= batch_tokens:
                n += 1
            r, W = which[c:c + n], lengths[c + n - 1]
            c += n
            rr = r.repeat_interleave(samples)
            fd, td = spec[rr, 0].to(device), t_[rr].to(device)
            b = fd * samples + torch.arange(samples, device=device).repeat(n)
            pos = td[:, None] + torch.arange(W, device=device)
            h = states[e][b[:, None], pos.clamp(max=S - 1)]
            hid = (kinds[rr] == 0).nonzero()[:, 0].to(device)
            if len(hid):
                h[hid, 0] = clean_in[e][fd[hid], td[hid]].to(h.dtype)
            P = int(t_[r].max())
            mask = torch.arange(P, device=device) < td[:, None] if P else None
            patches = _patches(kinds[rr], lo[rr], hi[rr], fd, td, torch.zeros_like(td), clean, range(e, L))
            yield rr, layout.suffix_patched_forward(h, e, pos, last[fd] - td, past=_Prefix(kv, b, P) if P else None,
                                                    prefix_mask=mask, patches=patches)


# ---- the original notebook's structure: one restoration per forward, hooks on HF modules ----

def _reference_run(model, ids, subject, noise, patched: list[tuple[str, int]], answer_id: int) -> float:
    """Mean over the noise rows of p(answer) at the last token of a forward of 1 + samples rows
    (row 0 clean); each (module name, token) of `patched` copies row 0's output into the others."""
    rows = ids.repeat(len(noise) + 1, 1)
    a, b = subject

    def corrupt(_m, _args, out):
        out = out.clone()
        out[1:, a:b] += noise.to(out.dtype)
        return out

    def restore(t):
        def run(_m, _args, out):
            h = block_output(out).clone()
            h[1:, t] = h[0, t]
            return with_block_output(out, h)
        return run

    handles = [model.get_input_embeddings().register_forward_hook(corrupt)]
    handles += [get_module(model, name).register_forward_hook(restore(t)) for name, t in patched]
    with hooks(*handles), torch.no_grad():
        logits = model(input_ids=rows).logits[1:, -1]
    return float(logits.float().softmax(-1)[:, answer_id].mean())


def _trace_reference(model, tok, layout, hparams, group, *, samples, std, window, answer, kinds, seed, batch_tokens, deadline=None):
    """The original structure on a group of one fact (causal_trace checks the deadline between groups)."""
    device, L = model_device(model), layout.n_layers
    templates = {"hidden": hparams.layer_module_tmp, "mlp": hparams.mlp_module_tmp, "attn": hparams.attn_module_tmp}
    traces, dropped = [], []
    for p in group:
        ids = torch.tensor([p.ids], device=device)
        with torch.no_grad():
            clean_logits = model(input_ids=ids).logits[:, -1]
        answer_ids, kept, bad = _check_answers(tok, [p], clean_logits, answer)
        dropped += bad
        if not kept:
            continue
        noise = _noise(p, samples, model.get_input_embeddings().weight.shape[1], std, seed).to(device)
        p_clean = float(clean_logits.float().softmax(-1)[0, answer_ids[0]])
        p_corr = _reference_run(model, ids, p.subject, noise, [], answer_ids[0])
        T = len(p.ids)
        scores = {}
        for k in kinds:
            s = torch.zeros(T, L, dtype=torch.float64)
            for t in range(T):
                for layer in range(L):
                    names = [templates[k].format(layer)] if k == "hidden" else [templates[k].format(j) for j in range(*_window(layer, window, L))]
                    s[t, layer] = _reference_run(model, ids, p.subject, noise, [(n, t) for n in names], answer_ids[0])
            scores[k] = s
        traces.append(_make_trace(tok, p, answer_ids[0], p_clean, p_corr, scores))
    return traces, dropped
