"""Fluency: text generation from prompts, and the weighted n-gram entropy of its words.

Generation follows the original evaluation (ROME/MEMIT `generate_fast`): top-k sampling with
k = 5 from the full softmax, each text grown to `max_length` = 100 tokens in all (prompt
included, no stop at end-of-sequence), decoded with the prompt, NFKD-normalised, "\\n\\n"
replaced by " ". Differences: sampling is seeded (the original is not); special tokens are
dropped when decoding (the original removes only "<|endoftext|>"); prompts are left-padded
with explicit position ids (the original right-pads and feeds each row's own tokens).

Entropy (docs/eval.md; same formula as the original `compute_n_gram_entropy`):

    H_n = -sum_g f_g log2 f_g      f_g: relative frequency of word n-gram g in one text
    GE(text) = (2/3 * H_2 + 4/3 * H_3) / 2         (mean of the weighted entropies)

A text with no n-grams of some order contributes H_n = 0 for it. GE is reported x100.

Word splitting: the original uses `nltk.word_tokenize` (Punkt sentences, then Treebank rules).
`words` approximates it without nltk: spaces separate words; the punctuation . , ; : ! ? ( )
[ ] { } " ` @ # $ % & and the clitics n't 's 'm 'd 'll 're 've are split off, as is any other
apostrophe; numbers like 1,000 and 3.5 stay whole. It differs from nltk in three ways: every
period is split (nltk keeps abbreviations such as "Mr." and "U.S." whole and splits only
sentence-final periods); opening and closing double quotes are the same word (nltk writes ``
and ''); a word with an inner apostrophe such as "d'Ivoire" is split (nltk keeps it).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Sequence

import torch

from ..model_access import cache_arg, returned_cache
from .scoring import eval_mode, model_device, pad_token_id, split_head

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

_P = r"""[.,;:!?()\[\]{}"`@#$%&]"""
_WORD_RE = re.compile(
    rf"""(?ix)
      \d+(?:[.,]\d+)+               # 1,000  3.5
    | [^\s'{_P[1:-1]}]+(?=n't\b)    # "do" of "don't"
    | n't\b | '(?:s|m|d|ll|re|ve)\b # clitics
    | [^\s'{_P[1:-1]}]+             # words
    | {_P} | '                      # punctuation, one per word
    """
)


def words(text: str) -> list[str]:
    """Split text into words (an approximation of nltk.word_tokenize; see the module docs)."""
    return _WORD_RE.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the n-grams of `tokens` (0 if none)."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_entropy(text: str, orders=NGRAM_ORDERS, weights=NGRAM_WEIGHTS) -> float:
    """GE of one text in bits: mean over k of weights[k] * H_{orders[k]} (not yet x100)."""
    toks = words(text)
    return sum(w * ngram_entropy(toks, n) for n, w in zip(orders, weights)) / len(orders)


def _next_logits(model, ids, mask, pos, past):
    """Float32 logits at the last position, (B, vocab), and the updated cache."""
    parts = split_head(model)
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_arg(model if parts is None else parts[0], past))
    if parts is None:
        out = model(**kw)
        return out.logits[:, -1].float(), returned_cache(out)
    body, head = parts
    out = body(**kw)
    return head(out.last_hidden_state[:, -1]).float(), returned_cache(out)


def _sample(logits: torch.Tensor, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """Top-k sampling from softmax(logits) renormalised over the k best; argmax when k == 1."""
    if top_k == 1:
        return logits.argmax(-1)
    vals, idx = logits.topk(top_k, dim=-1)
    pick = torch.multinomial(torch.softmax(vals, dim=-1), 1, generator=gen)
    return idx.gather(1, pick)[:, 0]


def generate_ids(
    model, seqs: Sequence[Sequence[int]], *, max_length: int, top_k: int, gen: torch.Generator, pad_id: int
) -> list[list[int]]:
    """New token ids for each prompt in one batch: max_length - len(prompt) of them (>= 0).

    Left-pads to (B, width) with position ids cumsum(mask) - 1, then one cached step per token.
    """
    lens = [len(s) for s in seqs]
    steps = max_length - min(lens)
    if steps <= 0:
        return [[] for _ in seqs]
    device = model_device(model)
    width = max(lens)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.tensor(s)
        mask[b, width - len(s) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    past, new = None, []
    for _ in range(steps):
        logits, past = _next_logits(model, ids, mask, pos, past)
        nxt = _sample(logits, top_k, gen)
        new.append(nxt)
        ids, pos = nxt[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(seqs), 1)], dim=1)
    out = torch.stack(new, 1).cpu()
    return [out[b, : max(0, max_length - n)].tolist() for b, n in enumerate(lens)]


def generate_texts(
    model,
    tok,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
    top_k: int = 5,
    batch_size: int = 64,
    seed: int = 0,
) -> list[str]:
    """Generate one text per prompt (prompt included), as the original evaluation does.

    Prompts are grouped by length into batches of `batch_size`; the sampling generator is seeded
    once per call, so the same prompts, seed and batch size give the same texts.
    """
    device = model_device(model)
    prompt_ids = tok(list(prompts))["input_ids"]
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    full: list[list[int]] = [[] for _ in prompt_ids]
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            new = generate_ids(
                model,
                [prompt_ids[i] for i in chunk],
                max_length=max_length,
                top_k=top_k,
                gen=gen,
                pad_id=pad_token_id(tok),
            )
            for i, extra in zip(chunk, new):
                full[i] = list(prompt_ids[i]) + extra
    texts = tok.batch_decode(full, skip_special_tokens=True)
    return [unicodedata.normalize("NFKD", t).replace("\n\n", " ") for t in texts]
