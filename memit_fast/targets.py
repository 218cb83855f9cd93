"""Target values z_i at the last critical layer L, all requests of a chunk optimised together
(docs/algorithm.md section 2), with the exact shortcuts of section 6:

1. each prompt is split at the subject's last token s: the prefix [0, s) never changes during the
   optimisation, so its attention keys/values are computed once, per layer (`layouts.PrefixCache`);
   the context template's own tokens, the same in every request, once per chunk and template
   (`layouts.shared_prefix`, family layouts), then copied into each row's cache (or held once,
   each row keeping only the tokens after them, with `Layout.shared_prefix`);
2. layers 0..L run once, without gradients, over the suffix [s, end); each step runs only layers
   L+1..v_loss_layer over the suffix, on top of the cached prefix (`layouts.SuffixRunner`);
3. the vocabulary projection is taken at the target positions and the KL position only;
4. a request that meets its stop rule (loss < 0.05) leaves the batch;
5. the KL prompt "{subject} is a" is read at the subject's last token, which the bare prompt
   (context template "{}") also holds with the same tokens before it: under causal attention both
   rows give the same hidden states there, so when their tokens agree the KL distribution is read
   from the bare row and the KL row is not run (a chunk's rows then all have the same suffix).

Each request keeps its own loss, Adam state, early stop and norm clamp, and the total loss is the
sum of the per-request losses, so the z are those of one-at-a-time optimisation (up to rounding).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import ConfigError, TargetError
from .hparams import MEMITHyperParams
from .layouts import layout_for
from .layouts.base import cache_key_dtype
from .model_access import float_dtype, hidden_size, model_device
from .tokens import EncodedRequest, length_batches, pad_id, pad_right

log = logging.getLogger(__name__)
STOP_LOSS = 5e-2  # the original's early-stop threshold
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam defaults, as the original uses


@dataclass
class RequestRows:
    """The prompts of one request: len(templates) rewriting rows, then the KL row "{subject} is a"."""

    ids: list[list[int]]  # full rows: prompt tokens + target[:-1] (KL row: cut after the subject)
    lookup: list[int]  # subject's token per row
    target: list[int]  # target token ids (T)
    target_start: list[int]  # per rewriting row: position whose logits predict target[0]
    kl_in_bare: bool  # the KL row's tokens are the bare row's up to the subject (shortcut 5)


def build_rows(enc: EncodedRequest) -> RequestRows:
    ids, lookup, starts = [], [], []
    for p in enc.prompts:
        ids.append(p.ids + enc.target[:-1])
        lookup.append(p.lookup)
        starts.append(len(p.ids) - 1)
    kl, bare = enc.kl, enc.prompts[0]  # prompts[0]: the bare template "{}"
    ids.append(kl.ids[: kl.lookup + 1])
    lookup.append(kl.lookup)
    return RequestRows(ids, lookup, enc.target, starts, kl.lookup == bare.lookup and kl.ids[: kl.lookup + 1] == bare.ids[: bare.lookup + 1])


@dataclass
class _Chunk:
    """Tensors of one chunk of B requests, rows request-major: r*n_rows + j; n_rows = n_t + 1 with
    the KL row last (j == n_t), or n_t when the KL row is read from the bare row j == 0."""

    prefix_ids: torch.Tensor  # (R, P)
    prefix_mask: torch.Tensor  # (R, P)
    suffix_ids: torch.Tensor  # (R, S)
    suffix_mask: torch.Tensor  # (R, S)
    suffix_pos: torch.Tensor  # (R, S) absolute positions
    target_pos: torch.Tensor  # (B, n_t, T) suffix positions of the target logits
    target_ids: torch.Tensor  # (B, n_t, T)
    target_mask: torch.Tensor  # (B, n_t, T)


def _make_chunk(rows: list[RequestRows], n_rows: int, pad: int, device) -> _Chunk:
    prefixes = [ids[:s] for r in rows for ids, s in zip(r.ids[:n_rows], r.lookup)]
    suffixes = [ids[s:] for r in rows for ids, s in zip(r.ids[:n_rows], r.lookup)]
    starts = [s for r in rows for s in r.lookup[:n_rows]]
    width = max(map(len, prefixes))
    if width:
        prefix_ids, prefix_mask = pad_right([p or [pad] for p in prefixes], pad, device)
        prefix_mask[[i for i, p in enumerate(prefixes) if not p]] = 0
    else:
        prefix_ids = prefix_mask = torch.zeros(len(prefixes), 0, dtype=torch.long, device=device)
    suffix_ids, suffix_mask = pad_right(suffixes, pad, device)
    # absolute positions; a padded token repeats its row's last position (it stays in range)
    last = torch.tensor([s + len(x) - 1 for s, x in zip(starts, suffixes)], device=device)
    suffix_pos = torch.minimum(torch.tensor(starts, device=device)[:, None] + torch.arange(suffix_ids.shape[1], device=device), last[:, None])
    # per request b and rewriting row j, target token t: its suffix position and id (0 past the target)
    n_t = len(rows[0].target_start)
    target_ids, real = pad_right([r.target for r in rows], 0)  # (B, T)
    offset = torch.tensor([[s - lk for s, lk in zip(r.target_start, r.lookup[:n_t])] for r in rows])  # (B, n_t)
    target_pos = (offset[:, :, None] + torch.arange(real.shape[1])) * real[:, None]
    n_t_view = (len(rows), n_t, real.shape[1])
    return _Chunk(prefix_ids, prefix_mask, suffix_ids, suffix_mask, suffix_pos, target_pos.to(device),
                  target_ids[:, None].expand(n_t_view).to(device), real[:, None].expand(n_t_view).float().to(device))


def _template_tokens(rows: list[RequestRows], n_rows: int) -> list[list[int]]:
    """Per row index j < n_rows, the tokens that row j of most requests (more than half) starts
    with, before its subject's last token: the context template's own tokens, whose keys and
    values are the same in every request that starts with them (shortcut 1's shared part)."""
    out = []
    for j in range(n_rows):
        alive, tokens = [r.ids[j][: r.lookup[j]] for r in rows], []
        while True:
            t = len(tokens)
            heads = Counter(ids[t] for ids in alive if len(ids) > t)
            if not heads or 2 * heads.most_common(1)[0][1] <= len(rows):
                break
            tokens.append(heads.most_common(1)[0][0])
            alive = [ids for ids in alive if len(ids) > t and ids[t] == tokens[t]]
        out.append(tokens)
    return out


def _uses_template(ids: list[int], s: int, template: list[int]) -> bool:
    """The row (ids, subject's last token at s) starts with its template's tokens (not empty)."""
    return 0 < len(template) <= s and ids[: len(template)] == template


def _cached_prefix(r: RequestRows, n_rows: int, templates: list[list[int]]) -> int:
    """The widest prefix that request r's rows cache: the part after the shared template tokens
    where a row starts with them, else the whole prefix [0, s)."""
    return max(s - len(t) * _uses_template(ids, s, t) for ids, s, t in zip(r.ids[:n_rows], r.lookup, templates))


def _shared_split(rows: list[RequestRows], n_rows: int, templates: list[list[int]], pad: int, device):
    """(template_ids, template_mask (n_rows, T), own_ids, own_mask (R, P), uses (R,) bool) of the
    prefixes [0, s): a row that starts with its template's tokens keeps the rest of its prefix
    (uses True), any other row its whole prefix; rows request-major as in `_make_chunk`."""
    each = [(ids, s, t) for r in rows for ids, s, t in zip(r.ids[:n_rows], r.lookup, templates)]
    uses = [_uses_template(ids, s, t) for ids, s, t in each]
    own = [ids[len(t) if u else 0 : s] for u, (ids, s, t) in zip(uses, each)]
    template_ids, template_mask = pad_right([t or [pad] for t in templates], pad, device)
    template_mask[[j for j, t in enumerate(templates) if not t]] = 0
    if max(map(len, own)):
        own_ids, own_mask = pad_right([o or [pad] for o in own], pad, device)
        own_mask[[i for i, o in enumerate(own) if not o]] = 0
    else:
        own_ids = own_mask = torch.zeros(len(own), 0, dtype=torch.long, device=device)
    return template_ids, template_mask, own_ids, own_mask, torch.tensor(uses, device=device)


def compute_targets(
    model,
    tok,
    requests: list[EncodedRequest],
    hparams: MEMITHyperParams,
    *,
    chunk_tokens: int | None = None,
    memory_cap_gib: float | None = None,
    progress: bool = True,
    layout=None,
    cuda_graphs: bool = False,
    steps_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """z (n, d_model) float32 (float64 for a float64 model) at layer L = max(hparams.layers), one
    row per request (encoded with `tokens.encode_requests`). layout: the model's
    `memit_fast.layouts` layout (resolved here when not given). chunk_tokens: padded suffix tokens
    per chunk; None on a GPU: chunks sized by memory (`ChunkPlanner`), within `memory_cap_gib` GiB of
    allocated GPU memory in all when given. cuda_graphs: replay each chunk's blocks
    L+1..v_loss_layer (forward and backward) from a CUDA graph while its batch keeps its rows. Off
    by default: on an H200, GPT-J chunks of 4,488 suffix tokens ran at 135 TFLOP/s with graphs
    (capture included) against 151 eager (benchmarks/NOTES.md). steps_out: an (n,) integer tensor
    that receives the number of Adam steps each request took before its stop rule (the early-stop
    loss, or v_num_grad_steps - 1)."""
    layout = layout or layout_for(model, hparams)
    rows = [build_rows(r) for r in requests]
    padded = [(len(r.ids) - r.kl_in_bare) * max(len(ids) - s for ids, s in zip(r.ids, r.lookup)) for r in rows]
    planner = None if chunk_tokens else ChunkPlanner.for_model(model, layout, hparams, memory_cap_gib)
    z = torch.empty(len(rows), hidden_size(model), dtype=float_dtype(model), device=model_device(model))
    bar = tqdm(total=len(rows), desc="target vectors z", unit="req", disable=not progress)
    n_chunks = 0

    def run(chunk: list[int], templates: list[list[int]]) -> None:
        nonlocal n_chunks
        z[chunk], steps = _optimise_chunk(model, layout, tok, [rows[i] for i in chunk], templates, hparams, bar, cuda_graphs)
        if steps_out is not None:
            steps_out[chunk] = steps.cpu()
        n_chunks += 1

    # requests whose KL row is read from the bare row (shortcut 5) are chunked apart from the
    # others, so each request is computed the same way whichever requests share its chunk
    shares = False
    for shortcut in (True, False):
        group = [i for i, r in enumerate(rows) if r.kl_in_bare == shortcut]
        if not group:
            continue
        n_rows = len(rows[group[0]].ids) - shortcut
        # the template tokens most requests of the group start with, for every chunk of it (shortcut 1)
        templates = _template_tokens([rows[i] for i in group], n_rows) if _shares_templates(layout) else [[]] * n_rows
        shares |= any(templates)
        if planner is None:
            for batch in length_batches([padded[i] for i in group], chunk_tokens or 4096):
                run([group[j] for j in batch], templates)
            continue
        # cached prefix tokens per request: its rows' widest part after the shared template, after
        # the template's slots (padded to the longest) where the cache is laid out per row
        held_once = any(templates) and layout.shared_prefix
        slots = 0 if held_once else max(map(len, templates))
        prefix = {i: n_rows * (_cached_prefix(rows[i], n_rows, templates) + slots) for i in group}
        todo = sorted(group, key=lambda i: padded[i], reverse=True)  # longest suffixes first
        while todo:
            take, estimate = planner.next_chunk([padded[i] for i in todo], [prefix[i] for i in todo], shared=held_once)
            chunk = todo[:take]
            planner.measure(lambda: run(chunk, templates), estimate)
            todo = todo[take:]
    bar.close()
    log.info("z: %d requests in %d chunks (%s), %s layout, templates' keys and values %s", len(rows), n_chunks,
             planner.describe() if planner else f"{chunk_tokens or 4096} padded suffix tokens", getattr(layout, "family", "?"),
             ("held once" if layout.shared_prefix else "computed once, cached per row") if shares else "per row")
    if not torch.isfinite(z).all():
        raise TargetError("a target vector z is NaN or inf")
    return z


# bytes of a z chunk at most by default (the cached prefix counted; 30% of the free memory if
# less): on an H200, GPT-J's 10,000 edits then peak at the weights + about this much
Z_MEMORY_CAP = 20 * 2**30
CAP_MARGIN = 2**30  # bytes left free under a memory cap for the allocator's rounding and small tensors


def _shares_templates(layout) -> bool:
    """The layout computes the context templates' keys and values once per chunk (shortcut 1),
    and holds them once (`shared_prefix`) or copies them into each row's cache (`prefix_from_templates`)."""
    return hasattr(layout, "shared_suffix_runner") and (layout.shared_prefix or layout.prefix_from_templates)


class ChunkPlanner:
    """Sizes z chunks on a GPU by memory: a budget in bytes, an estimate of a chunk's bytes from
    its padded suffix tokens and cached prefix tokens (`_bytes_per_token`), and the estimate's error
    measured on every chunk run: the allocator's peak over the chunk against the estimate, whose
    largest ratio so far scales the next chunks' estimates (the formula is a model; the
    measurement makes the chunks fill the budget on any model and GPU without exceeding it)."""

    def __init__(self, budget: float, per_suffix: float, per_prefix: dict[bool, float], devices=(None,)):
        self.budget, self.per_suffix, self.per_prefix = budget, per_suffix, per_prefix
        self.devices = devices  # the model's GPUs (a model split over several: the most used one counts)
        self.scale: float | None = None  # measured bytes / estimated bytes, the largest seen
        self.peak = 0

    @classmethod
    def for_model(cls, model, layout, hparams: MEMITHyperParams, memory_cap_gib: float | None) -> "ChunkPlanner | None":
        """None off the GPU. The budget: 30% of the free memory (of the fullest GPU of a split model)
        and Z_MEMORY_CAP at most; under a memory cap, also the cap less what is allocated now and
        CAP_MARGIN."""
        device = model_device(model)
        if device.type != "cuda":
            return None
        devices = sorted({p.device for p in model.parameters() if p.is_cuda}, key=str) or [device]
        free = min(torch.cuda.mem_get_info(d)[0] for d in devices)  # a split model: its fullest GPU
        budget = min(0.3 * free, Z_MEMORY_CAP)
        if memory_cap_gib is not None:
            allocated = max(torch.cuda.memory_allocated(d) for d in devices)  # a split model: the cap is per GPU
            room = memory_cap_gib * 2**30 - allocated - CAP_MARGIN
            if room <= 0:
                raise ConfigError(f"memory cap {memory_cap_gib:.1f} GiB: {allocated / 2**30:.1f} GiB are allocated before z "
                                  "(model, statistics) and nothing is left for it")
            budget = min(budget, room)
        per_suffix, per_prefix = _bytes_per_token(model, layout, hparams)
        return cls(budget, per_suffix, per_prefix, devices)

    def next_chunk(self, suffix: list[int], prefix: list[int], shared: bool) -> tuple[int, float]:
        """(n, estimated bytes): the first n requests (longest suffix first) whose padded suffix
        and padded prefix fit the budget; one at least."""
        scale = self.scale or 1.0
        per_prefix = self.per_prefix[shared]
        n, widest, estimate = 0, 0, 0.0
        for p in prefix:
            w = max(widest, p)
            bytes_ = (n + 1) * (suffix[0] * self.per_suffix + w * per_prefix)
            if n and bytes_ * scale > self.budget:
                break
            n, widest, estimate = n + 1, w, bytes_
        return n, estimate

    def measure(self, run, estimate: float) -> None:
        """run() one chunk and fold its measured peak (above the memory allocated before) into scale."""
        from .profiling import restart_peak

        before = [restart_peak(d) for d in self.devices]
        run()
        used = max(torch.cuda.max_memory_allocated(d) - b for d, b in zip(self.devices, before))
        self.peak = max(self.peak, used)
        self.scale = max(self.scale or 0.0, used / estimate)

    def describe(self) -> str:
        scale = f"measured/estimated {self.scale:.2f}" if self.scale else "no chunk measured"
        return f"budget {self.budget / 2**30:.1f} GiB, peak {self.peak / 2**30:.1f} GiB, {scale}"


def _bytes_per_token(model, layout, hparams: MEMITHyperParams) -> tuple[float, dict[bool, float]]:
    """(bytes per padded suffix token, {shared: bytes per padded cached prefix token}) of a z
    chunk, estimated. Per suffix token: the activations kept for the backward pass of blocks
    L+1..v_loss_layer (about 10 d + 3 d_ff elements per block) and the target logits. Per prefix
    token: its keys (float32, or the model's dtype in a per-row cache read by the Triton kernel) and
    values (model dtype) in the cache's blocks: L+1..v_loss_layer for the shared-template runner
    (it drops blocks 0..L as it goes), 0..v_loss_layer for the per-row cache (held while it is
    built from whole prefixes; built from the templates it holds less, which the planner's
    measured scale finds), every block for the generic layout."""
    config = model.config
    d = hidden_size(model)
    d_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    elem = next(model.parameters()).element_size()
    L, stop = hparams.layers[-1], hparams.v_loss_layer
    per_suffix = max(stop - L, 1) * (10 * d + 3 * d_ff) * elem + 8 * config.vocab_size
    kv_width = getattr(layout, "n_kv_heads", None) and layout.n_kv_heads * layout.head_dim
    if kv_width:
        cached = {True: stop - L, False: stop + 1}
    else:
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        kv_width = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or d // heads)
        n = getattr(config, "num_hidden_layers", None) or config.n_layer
        cached = {True: n, False: n}
    p = next(model.parameters())
    key_elem = {True: max(elem, 4), False: cache_key_dtype(p.device, p.dtype).itemsize}  # the shared cache's keys: float32
    return per_suffix, {k: v * kv_width * (key_elem[k] + elem) for k, v in cached.items()}


def default_chunk_tokens(model, layout, hparams: MEMITHyperParams, prefix_per_suffix: float = 0.0) -> int:
    """The padded suffix tokens of a default GPU chunk whose rows cache `prefix_per_suffix` prefix
    tokens per suffix token, by the unmeasured estimate (for benchmarks; compute_targets plans
    chunks with `ChunkPlanner`)."""
    planner = ChunkPlanner.for_model(model, layout, hparams, None)
    if planner is None:
        return 4096
    return int(planner.budget / (planner.per_suffix + prefix_per_suffix * planner.per_prefix[_shares_templates(layout)]))


def _optimise_chunk(model, layout, tok, rows: list[RequestRows], templates: list[list[int]], hp: MEMITHyperParams, bar, cuda_graphs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (B, d_model), Adam steps taken per request (B,)) of one chunk; templates: per row index,
    the shared template tokens (`_template_tokens`); the per-row cache where no row starts with them."""
    device = model_device(model)
    B, n_t = len(rows), len(rows[0].target_start)
    kl_row = 0 if rows[0].kl_in_bare else n_t  # shortcut 5 (a chunk's requests agree: compute_targets)
    n_rows = n_t + (kl_row == n_t)
    L, loss_layer = hp.layers[-1], hp.v_loss_layer
    c = _make_chunk(rows, n_rows, pad_id(tok), device)
    # Once: the prefix cache and block L's output over the suffix, no gradients; the context
    # templates' keys and values once per chunk where the layout can (shortcut 1).
    split = _shared_split(rows, n_rows, templates, pad_id(tok), device) if any(templates) else None
    if split is not None and split[-1].any():
        make = layout.shared_suffix_runner if layout.shared_prefix else layout.template_suffix_runner
        runner = make(*split[:4], c.suffix_ids, c.suffix_pos, L, loss_layer, uses=split[4])
    else:
        runner = layout.suffix_runner(c.prefix_ids, c.prefix_mask, c.suffix_ids, c.suffix_mask, c.suffix_pos, L, loss_layer)
    h_L = runner.hidden  # (R, S, d)

    # delta and z in float32 as the original (float64 for a float64 model); bare template first.
    h_init = h_L[torch.arange(B, device=device) * n_rows, 0].to(float_dtype(model))
    max_norm = hp.clamp_norm_factor * h_init.norm(dim=1)
    delta = torch.zeros_like(h_init, requires_grad=True)
    m, v = torch.zeros_like(h_init), torch.zeros_like(h_init)
    kl_init = None
    active = torch.arange(B, device=device)
    steps = torch.zeros(B, dtype=torch.long, device=device)
    h_active = h_L
    head_w, head_b = layout.lm_head.weight.T, getattr(layout.lm_head, "bias", None)
    forward = runner.forward
    if cuda_graphs and loss_layer > L and hp.v_num_grad_steps > 4:
        # the chunk's shapes stay fixed until a request leaves: capture the blocks' forward and
        # backward once (three warm-up runs, then the graphs) and replay them each step
        forward = torch.cuda.make_graphed_callables(runner.forward, (h_L.detach().clone().requires_grad_(),))
    for it in range(hp.v_num_grad_steps):
        shift = torch.zeros_like(h_active[:, :1])
        shift[:, 0] = delta[active].repeat_interleave(n_rows, 0).to(h_L.dtype)
        edited = torch.cat([h_active[:, :1] + shift, h_active[:, 1:]], dim=1)
        final = edited if loss_layer == L else forward(edited)
        final = final.view(len(active), n_rows, *final.shape[1:])

        # NLL of the targets, averaged per prompt over its target tokens, then over prompts.
        pos, ids, mask = c.target_pos[active], c.target_ids[active], c.target_mask[active]
        reps = final[:, :n_t].gather(2, pos.view(len(active), n_t, -1, 1).expand(-1, -1, -1, final.shape[-1]))
        logp = _log_probs(layout.final_norm, head_w, head_b, reps)
        token_lp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        nll = -(token_lp * mask).sum(-1) / mask.sum(-1)
        nll = nll.mean(1)
        # KL(p_now || p_before) of the next-token distribution at the subject of "{subject} is a".
        kl_lp = _log_probs(layout.final_norm, head_w, head_b, final[:, kl_row, 0])
        if kl_init is None:
            kl_init = kl_lp.detach().clone()
        kl = hp.kl_factor * (kl_lp.exp() * (kl_lp - kl_init[active])).sum(-1)
        decay = hp.v_weight_decay * delta[active].norm(dim=1) / h_init[active].norm(dim=1) ** 2
        loss = nll + kl + decay

        # one device-to-host copy per step: which requests go on, and whether any loss is not finite
        flags = torch.stack([loss.detach() >= STOP_LOSS, ~torch.isfinite(loss.detach())]).cpu()
        if flags[1].any():
            raise TargetError(f"the z loss is NaN or inf at step {it} for {int(flags[1].sum())} request(s) of this chunk")
        keep_cpu = flags[0]
        if it == hp.v_num_grad_steps - 1:
            keep_cpu[:] = False
        bar.update(int((~keep_cpu).sum()))
        keep = keep_cpu.to(device)
        steps[active[~keep]] = it
        if not keep_cpu.any():
            break
        loss[keep].sum().backward()
        with torch.no_grad():
            _adam_step(delta, m, v, active[keep], it + 1, hp.v_lr)
            idx = active[keep]
            norms = delta[idx].norm(dim=1)
            over = norms > max_norm[idx]
            delta[idx[over]] *= (max_norm[idx[over]] / norms[over])[:, None]
        delta.grad = None
        if not keep_cpu.all():  # the batch shrinks: select the rows of the requests that go on, once
            rows_kept = (keep.nonzero()[:, 0, None] * n_rows + torch.arange(n_rows, device=device)).reshape(-1)
            h_active = h_active[rows_kept]
            runner.select(rows_kept)
            forward = runner.forward  # new shapes: eager from here on
        active = active[keep]
    return h_init + delta.detach(), steps


def _log_probs(ln_f, head_w: torch.Tensor, head_b, hidden: torch.Tensor) -> torch.Tensor:
    logits = ln_f(hidden) @ head_w
    if head_b is not None:
        logits = logits + head_b
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _adam_step(param: torch.Tensor, m: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, step: int, lr: float) -> None:
    """torch.optim.Adam's update (defaults, no weight decay) on the rows `idx`, which all took `step` steps."""
    b1, b2 = ADAM_BETAS
    g = param.grad[idx]
    m[idx] = m[idx].lerp(g, 1 - b1)
    v[idx] = (v[idx] * b2).addcmul(g, g, value=1 - b2)
    denom = (v[idx].sqrt() / math.sqrt(1 - b2**step)).add(ADAM_EPS)
    param[idx] = param[idx].addcdiv(m[idx], denom, value=-lr / (1 - b1**step))
