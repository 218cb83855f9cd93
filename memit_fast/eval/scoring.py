"""Batched teacher-forced scoring of target strings after prompts.

For a pair (prompt, target) the scored sequence is

    x = ids(prompt) ++ ids(" " + target)        (P prompt ids, T target ids)

with the prompt tokenised as the tokenizer does by default (special tokens included) and the
target tokenised with a leading space and no special tokens. The two id lists are
concatenated; the joined string is never re-tokenised (the original code tokenised
f"{prompt} {target}" as one string, which can merge tokens across the boundary).

Target token j (0-based) is read from the logits at position P - 1 + j:

    nll   = -(1/T) * sum_j log softmax(logits[P-1+j])[x[P+j]]     (mean per-token NLL, fp32)
    hit_j = argmax(logits[P-1+j]) == x[P+j]

Sequences are right-padded, so every real token keeps positions 0..len-1 and never sees a pad;
many pairs go through one forward. Only the target positions are projected onto the
vocabulary where the model splits into a body and a linear head (see `split_head`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

# Config attributes of models whose logits are not simply head(hidden): use full logits there.
_LOGIT_POSTPROCESS_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_HEAD_ROWS = 1024  # rows projected onto the vocabulary at once


@dataclass
class Scores:
    """Per-pair results. nll: mean per-token NLL (nats); token_correct: argmax hits per token."""

    nll: list[float]
    token_correct: list[list[bool]]

    @property
    def all_correct(self) -> list[bool]:
        """True where every target token is the argmax (the stricter 'accuracy')."""
        return [all(c) for c in self.token_correct]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run in eval mode without gradients; put the training flag back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def split_head(model: torch.nn.Module):
    """(body, head) where logits == head(body(...).last_hidden_state), else None.

    Uses the Hugging Face `base_model` / `get_output_embeddings()` pair; refuses models whose
    config names a logit post-processing step (soft-capping, scaling).
    """
    body = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if body is None or head is None or body is model:
        return None
    cfg = getattr(model, "config", None)
    for attr in _LOGIT_POSTPROCESS_ATTRS:
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    return body, head


def pick_logits(model, input_ids, attention_mask, rows, cols) -> torch.Tensor:
    """Logits at positions (rows[i], cols[i]) as float32, shape (len(rows), vocab).

    input_ids, attention_mask: (B, L). Projects only the picked positions when the model splits
    into body and head; otherwise runs the full model and indexes its logits.
    """
    parts = split_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[rows, cols].float()
    body, head = parts
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    picked = hidden[rows, cols]
    return torch.cat([head(picked[i : i + _HEAD_ROWS]).float() for i in range(0, len(picked), _HEAD_ROWS)])


def score_token_ids(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 64,
    pad_id: int = 0,
) -> Scores:
    """Score pairs given as token ids. Every prompt needs >= 1 id and every target >= 1 id.

    Pairs are sorted by length and run `batch_size` at a time; results come back in input order
    and do not depend on the batching.
    """
    n = len(prompt_ids)
    if len(target_ids) != n:
        raise ValueError(f"{n} prompts but {len(target_ids)} targets")
    for i in range(n):
        if not prompt_ids[i] or not target_ids[i]:
            raise ValueError(f"pair {i}: empty prompt or target ids")
    device = model_device(model)
    nll = [0.0] * n
    correct: list[list[bool]] = [[] for _ in range(n)]
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]) + len(target_ids[i]), reverse=True)
    with eval_mode(model):
        for start in range(0, n, batch_size):
            chunk = order[start : start + batch_size]
            seqs = [list(prompt_ids[i]) + list(target_ids[i]) for i in chunk]
            width = max(map(len, seqs))
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            rows, cols, gold = [], [], []
            for b, (i, seq) in enumerate(zip(chunk, seqs)):
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
                p, t = len(prompt_ids[i]), len(target_ids[i])
                rows += [b] * t
                cols += range(p - 1, p - 1 + t)
                gold += target_ids[i]
            logp = torch.log_softmax(
                pick_logits(
                    model,
                    ids.to(device),
                    mask.to(device),
                    torch.tensor(rows, device=device),
                    torch.tensor(cols, device=device),
                ),
                dim=-1,
            )
            gold_t = torch.tensor(gold, device=logp.device)
            tok_nll = -logp.gather(1, gold_t[:, None])[:, 0].double().cpu()
            hits = (logp.argmax(-1) == gold_t).cpu()
            at = 0
            for i in chunk:
                t = len(target_ids[i])
                nll[i] = tok_nll[at : at + t].mean().item()
                correct[i] = hits[at : at + t].tolist()
                at += t
    return Scores(nll, correct)


def encode_pairs(tok, prompts: Sequence[str], targets: Sequence[str]):
    """(prompt_ids, target_ids): prompts with the tokenizer's default special tokens, targets as
    ids(" " + target) without special tokens."""
    prompt_ids = tok(list(prompts))["input_ids"]
    uniq = sorted(set(targets))
    enc = dict(zip(uniq, tok([" " + t for t in uniq], add_special_tokens=False)["input_ids"]))
    return prompt_ids, [enc[t] for t in targets]


def pad_token_id(tok) -> int:
    for cand in (tok.pad_token_id, tok.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def score_targets(
    model: torch.nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 64
) -> Scores:
    """Score each (prompts[i], targets[i]) pair: mean per-token NLL of " " + target and argmax hits."""
    prompt_ids, target_ids = encode_pairs(tok, prompts, targets)
    return score_token_ids(model, prompt_ids, target_ids, batch_size=batch_size, pad_id=pad_token_id(tok))
