"""Token ids of prompts and targets, and the position of the subject's token in a prompt.

Works for any HF tokenizer: character offsets from a fast tokenizer where available, otherwise
incremental encoding of the text up to the subject's end. Prompts are encoded with the
tokenizer's special tokens (a BOS, say); targets without them, and are appended as ids, so the
target tokens are the same in every prompt.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .errors import RequestError


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    lookup: int  # index of the token where keys and values are read (fact_token)


def encode_target(tok, target: str) -> list[int]:
    return encode_targets(tok, [target])[0]


def encode_targets(tok, targets: list[str]) -> list[list[int]]:
    """Each target's token ids, without special tokens, in one tokenizer call; RequestError for a
    target that encodes to no tokens."""
    out = [list(ids) for ids in tok(targets, add_special_tokens=False)["input_ids"]]
    for target, ids in zip(targets, out):
        if not ids:
            raise RequestError(f"target {target!r} encodes to no tokens")
    return out


def _covering(text: str, ids, offsets, start: int, end: int) -> tuple[list[int], int, int]:
    """(ids, first, last): the tokens whose character offsets cover [start, end)."""
    covering = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not covering:
        raise RequestError(f"subject {text[start:end]!r} is not in the tokens of {text!r}")
    return list(ids), covering[0], covering[-1]


def _incremental(tok, text: str, start: int, end: int) -> tuple[list[int], int, int]:
    """(ids, first, last) without offsets: compare the encodings of the text up to the subject's
    start and end with the whole text's."""
    ids = list(tok(text)["input_ids"])
    first = _common_prefix(tok(text[:start])["input_ids"], ids)
    through = tok(text[:end])["input_ids"]
    common = _common_prefix(through, ids)
    last = common - 1 if common == len(through) else common  # else the token holding the subject's end
    if last < first or last >= len(ids):
        raise RequestError(f"subject {text[start:end]!r} is not in the tokens of {text!r}")
    return ids, first, last


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_prompt(tok, before: str, subject: str, after: str, fact_token: str = "subject_last") -> EncodedPrompt:
    """Encode before + subject + after; `lookup` per fact_token: subject_last, subject_first or last."""
    return encode_prompts(tok, [(before, subject, after)], fact_token)[0]


def encode_prompts(tok, parts: list[tuple[str, str, str]], fact_token: str = "subject_last") -> list[EncodedPrompt]:
    """encode_prompt for many (before, subject, after) at once: one batched call of a fast tokenizer."""
    texts = [b + s + a for b, s, a in parts]
    spans = [(len(b), len(b) + len(s)) for b, s, _ in parts]
    if getattr(tok, "is_fast", False):
        enc = tok(texts, return_offsets_mapping=True)
        ranges = [_covering(text, ids, offsets, start, end) for text, ids, offsets, (start, end) in zip(texts, enc["input_ids"], enc["offset_mapping"], spans)]
    else:
        ranges = [_incremental(tok, text, start, end) for text, (start, end) in zip(texts, spans)]
    out = []
    for ids, first, last in ranges:
        lookup = {"subject_last": last, "subject_first": first, "last": len(ids) - 1}[fact_token]
        out.append(EncodedPrompt(list(ids), lookup))
    return out


@dataclass(frozen=True)
class EncodedRequest:
    """A request's prompts, encoded once: one per context template (flattened), the KL prompt
    "{subject} is a", and the target's token ids."""

    prompts: list[EncodedPrompt]
    kl: EncodedPrompt
    target: list[int]


def encode_requests(tok, requests, templates: list[str], fact_token: str) -> list[EncodedRequest]:
    """Every prompt of every request in one batched tokenizer call; raises RequestError for a
    subject that is not in its prompt's tokens or an empty target."""
    parts = []
    for r in requests:
        for template in templates:
            t_before, t_after = template.split("{}")
            parts.append((t_before + r.before, r.subject, r.after + t_after))
        parts.append(("", r.subject, " is a"))
    encoded = encode_prompts(tok, parts, fact_token)
    targets = encode_targets(tok, [r.target for r in requests])
    n = len(templates) + 1
    return [EncodedRequest(encoded[i * n : i * n + n - 1], encoded[i * n + n - 1], target) for i, target in enumerate(targets)]


_CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")


def context_length(config) -> tuple[int, str] | None:
    """(positions, config field) of the model's context, or None when the config names none."""
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def check_context(requests, encoded: list[EncodedRequest], config) -> None:
    """Refuse (RequestError) a request whose longest row does not fit the model's context: a
    context template + prompt row followed by the target's tokens but the last (the rows z is
    optimised on; keys and the KL row are shorter)."""
    limit = context_length(config)
    if limit is None:
        return
    positions, field = limit
    for i, (r, enc) in enumerate(zip(requests, encoded)):
        longest = max(len(p.ids) for p in enc.prompts) + len(enc.target) - 1
        longest = max(longest, len(enc.kl.ids))
        if longest > positions:
            raise RequestError(
                f"request {i} (prompt {r.prompt!r}, subject {r.subject!r}, target {r.target!r}) needs {longest} tokens "
                f"(longest context template + prompt + target), more than the model's context of {positions} positions "
                f"(config.{field}); shorten it or use shorter context templates"
            )


def pad_right(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (n_rows, max_len), right padded."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    real = torch.arange(int(lengths.max())) < lengths[:, None]
    ids = torch.full(real.shape, pad_id, dtype=torch.long)
    ids[real] = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)  # row-major: each row's tokens in order
    return ids.to(device), real.long().to(device)


def pad_id(tok) -> int:
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, each group at most batch_tokens padded tokens (one row at least)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
