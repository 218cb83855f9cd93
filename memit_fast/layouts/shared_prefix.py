"""z's prefix cache with the context templates' keys and values held once (docs/algorithm.md 6.2).

Every request of a z chunk has one row per context template, request-major (row b * n + j reads
template j), and each row starts with its template's own tokens. By causality those tokens' keys
and values are the same, in every layer, for every request: they are computed once per template
(n rows), and per row only the tokens between the template and the subject's last token (the
row's own prefix) are cached. A suffix query then attends to three parts, joined as scores: its
template's keys (one product for the queries of all B requests, the B requests in the M
dimension), its row's own prefix keys, and its row's own keys.
Shapes: R = B * n rows, n templates, T template tokens (padded), P own prefix tokens (padded),
S suffix tokens, H heads, H_kv key/value heads, h_d head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PrefixCache, grouped_softmax, score_dtype, step_context


def shared_prefix_attention(q, k, v, template, own, mask, n: int, scale=None) -> torch.Tensor:
    """Attention of rows (R = B * n, request-major) over their template's cached keys and values
    `template` (n, H_kv, T, h_d) (read in place, never repeated per row), their own cached prefix
    `own` (R, H_kv, P, h_d) or None, and their own tokens k, v (R, H_kv, S, h_d). q (R, H, S, h_d);
    mask (R, 1, S, T + P + S) bool, True where a query may attend. Scores and softmax in float32
    at least; values multiplied in v's dtype. Returns (R, H, S, h_d)."""
    R, H, S, hd = q.shape
    H_kv, T = template[0].shape[1], template[0].shape[2]
    P = 0 if own is None else own[0].shape[2]
    B, M = R // n, H // H_kv * S
    f = score_dtype(q.dtype)
    qg = q.reshape(R, H_kv, M, hd).to(f)  # query heads h_kv*rep .. h_kv*rep + rep - 1 read kv head h_kv
    # template j's queries of all B requests in one product: (n, H_kv, B * M, h_d) @ (n, H_kv, h_d, T);
    # its scores and outputs are read back as (B, n, ...) views (no copy: cat and add take them)
    q_t = qg.view(B, n, H_kv, M, hd).permute(1, 2, 0, 3, 4).reshape(n, H_kv, B * M, hd)
    s_t = (q_t @ template[0].to(f).transpose(-1, -2)).view(n, H_kv, B, M, T).permute(2, 0, 1, 3, 4)
    parts = [s_t] + ([(qg @ own[0].to(f).transpose(-1, -2)).view(B, n, H_kv, M, P)] if P else [])
    parts.append((qg @ k.to(f).transpose(-1, -2)).view(B, n, H_kv, M, S))
    scores = torch.cat(parts, dim=-1).view(R, H_kv, H // H_kv, S, T + P + S)
    p = grouped_softmax(scores, mask, hd**-0.5 if scale is None else scale, v.dtype)
    p_t = p[..., :T].reshape(B, n, H_kv, M, T).permute(1, 2, 0, 3, 4).reshape(n, H_kv, B * M, T)
    o = p[..., T + P :] @ v
    if P:
        o = o + p[..., T : T + P] @ own[1]
    o = o.view(B, n, H_kv, M, hd) + (p_t @ template[1]).view(n, H_kv, B, M, hd).permute(2, 0, 1, 3, 4)
    return o.reshape(R, H, S, hd)


@dataclass
class SharedPrefixKV:
    """One layer's cached prefix: the templates' keys and values (n, H_kv, T, h_d) and the rows'
    own (R, H_kv, P, h_d) or None. `Layout.attention` calls `attend` for a past of this kind."""

    template: tuple[torch.Tensor, torch.Tensor]
    own: tuple[torch.Tensor, torch.Tensor] | None
    n: int

    def attend(self, q, k, v, mask, scale=None) -> torch.Tensor:
        return shared_prefix_attention(q, k, v, self.template, self.own, mask, self.n, scale)


class SharedPrefixCache:
    """Per layer, the n templates' keys and values and the R rows' own prefix keys and values
    (keys in the scores' dtype). Key slots of a row: its template's T (padded), then its own P
    (padded). template_mask (n, T) and own_mask (R, P): 1 = real token; uses (R,) bool: the row
    reads its template (else its own prefix is its whole prefix)."""

    def __init__(self, template: dict, template_mask: torch.Tensor, own: dict, own_mask: torch.Tensor, uses: torch.Tensor):
        self.template, self.template_mask, self.own, self.own_mask, self.uses = template, template_mask, own, own_mask, uses
        self.n = template_mask.shape[0]
        self.kv = {i: SharedPrefixKV(kv, own.get(i), self.n) for i, kv in template.items()}

    @property
    def template_length(self) -> torch.Tensor:
        """(R,) template tokens of each row."""
        return self.template_mask.sum(1).repeat(self.own_mask.shape[0] // self.n) * self.uses

    @property
    def mask(self) -> torch.Tensor:
        """(R, T + P) the real key slots of each row."""
        R = self.own_mask.shape[0]
        return torch.cat([self.template_mask.repeat(R // self.n, 1) * self.uses[:, None], self.own_mask], dim=1)

    @property
    def key_positions(self) -> torch.Tensor:
        """(R, T + P) positions of each row's key slots: template tokens 0.., own prefix after them."""
        (R, P), T = self.own_mask.shape, self.template_mask.shape[1]
        device = self.own_mask.device
        own = self.template_length[:, None] + torch.arange(P, device=device)
        return torch.cat([torch.arange(T, device=device).expand(R, T), own], dim=1)

    @property
    def length(self) -> torch.Tensor:
        """(R,) real prefix tokens per row: the position of the row's first suffix token."""
        return self.template_length + self.own_mask.sum(1)

    def to_per_row(self) -> PrefixCache:
        """The same keys and values laid out per row (keys in the values' dtype, as a per-row cache
        keeps them): row r's key slots are its template's T (template r % n), then its own P, with
        `mask` and `key_positions`. Each layer's own part is dropped from this cache as it is
        copied, so the two layouts are not held in full at once."""
        kv = {}
        R, P = self.own_mask.shape
        for i, (tk, tv) in self.template.items():
            n, H_kv, T, hd = tv.shape
            k, v = (torch.empty(R, H_kv, T + P, hd, dtype=tv.dtype, device=tv.device) for _ in range(2))
            for out, t in ((k, tk), (v, tv)):  # template j into the rows b * n + j of every request b
                out.view(R // n, n, H_kv, T + P, hd)[:, :, :, :T] = t
            if P:
                ok, ov = self.own.pop(i)
                k[:, :, T:], v[:, :, T:] = ok, ov
            kv[i] = (k, v)
        return PrefixCache(kv, self.mask, self.key_positions)

    def select(self, rows: torch.Tensor) -> "SharedPrefixCache":
        """Keep these rows (whole requests: n consecutive rows each)."""
        if len(rows) % self.n:
            raise ValueError(f"{len(rows)} rows selected, not whole requests of {self.n} rows")
        own = {i: (k[rows.to(k.device)], v[rows.to(v.device)]) for i, (k, v) in self.own.items()}
        return SharedPrefixCache(self.template, self.template_mask, own, self.own_mask[rows], self.uses[rows])


def _compact(t: torch.Tensor) -> torch.Tensor:
    """t in storage of its own size: a view into a fused projection's output (GPT-2's c_attn, NeoX's
    query_key_value) would keep the whole output alive in the cache."""
    return t.contiguous() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


class SharedPrefixRunner:
    """`SuffixRunner`'s contract (hidden, select, forward) over a `SharedPrefixCache`: the
    templates' keys and values once (n rows, blocks 0..stop), then in one pass without gradients,
    block by block, the rows' own prefixes over their template (keys and values kept) and the
    suffixes over both (up to block `layer`); only blocks layer+1..stop of the cache are kept.

    template_ids, template_mask (n, T); own_ids, own_mask (R, P) (P may be 0); suffix_ids (R, S)
    at absolute positions suffix_pos (R, S); row r reads template r % n where uses[r] (R,) bool
    (default: every row)."""

    def __init__(self, layout, template_ids, template_mask, own_ids, own_mask, suffix_ids, suffix_pos, layer: int, stop: int, uses=None):
        self.layout, self.layer, self.stop = layout, layer, stop
        n, R, P = template_ids.shape[0], own_ids.shape[0], own_ids.shape[1]
        if R % n:
            raise ValueError(f"{R} rows are not whole requests of {n} templates")
        uses = torch.ones(R, dtype=torch.bool, device=own_ids.device) if uses is None else uses.bool()
        with torch.no_grad():
            t = layout.prefix_cache(template_ids, template_mask, stop + 1)
            template = {i: (k.to(score_dtype(k.dtype)), v) for i, (k, v) in t.kv.items()}
            cache = SharedPrefixCache(template, template_mask, {}, own_mask[:, :0], uses)
            if P:  # own prefix tokens after the template; a padded slot repeats its row's last position
                t_len = cache.template_length
                last = t_len + (own_mask.sum(1) - 1).clamp(min=0)
                own_pos = torch.minimum(t_len[:, None] + torch.arange(P, device=own_ids.device), last[:, None])
                own_h = layout.embed(own_ids, own_pos)
                own_ctx = layout.context(own_h, own_pos, cache.mask, prefix_positions=cache.key_positions)
            full = SharedPrefixCache(template, template_mask, {}, own_mask, uses)  # the key slots' layout
            h = layout.embed(suffix_ids, suffix_pos)
            ctx = layout.context(h, suffix_pos, full.mask, prefix_positions=full.key_positions)
            own = {}
            for i in range(stop + 1):
                if P:
                    own_h, (k, v) = layout.block(i, own_h, own_ctx, cache.kv[i], want_kv=True)
                    own[i] = (_compact(k.to(score_dtype(k.dtype))), _compact(v))
                if i <= layer:
                    h = layout.block(i, h, ctx, SharedPrefixKV(template[i], own.pop(i, None), n))
            self.hidden = h.to(suffix_ids.device)
        kept = range(layer + 1, stop + 1)
        self.cache = SharedPrefixCache({i: template[i] for i in kept}, template_mask, own, own_mask, uses)
        self.positions = suffix_pos
        self.ctx = step_context(layout, ctx)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (whole requests; the batch shrinks as requests converge)."""
        self.positions = self.positions[rows]
        self.cache = self.cache.select(rows)
        self.ctx = step_context(self.layout, self.layout.context(self.hidden[:1], self.positions, self.cache.mask, prefix_positions=self.cache.key_positions))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Block `stop`'s output from block `layer`'s output h (rows as selected)."""
        return self.layout.run(h, self.layer + 1, self.stop + 1, self.ctx, self.cache)
