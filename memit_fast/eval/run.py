"""The evaluation loop: unedited figures, edits, edited figures, and the model restored.

Modes for n records and edit batch E (E = n when not given):
- all at once / independent batches (the original `evaluate.py`): each batch of E requests is
  applied to the unedited model, its records are evaluated, and the model is restored before
  the next batch;
- sequential: the batches are applied one after another without restoring, all n records are
  evaluated on the final model, and then the model is restored.
The unedited model is evaluated once on all n records. Every restore is checked bit for bit
against the saved weights. Each stage is timed (CUDA synchronised).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable, Sequence

import torch

from .counterfact import counterfact_request, evaluate_counterfact
from .report import counterfact_metrics, zsre_metrics
from .scoring import model_device
from .zsre import evaluate_zsre, zsre_request

KINDS = ("counterfact", "zsre")


def load_records(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def detect_kind(records: Sequence[dict]) -> str:
    """'counterfact' for records with `requested_rewrite`, 'zsre' for ones with `src` and `answers`."""
    first = records[0]
    if "requested_rewrite" in first:
        return "counterfact"
    if "src" in first and "answers" in first:
        return "zsre"
    raise ValueError(f"unknown record format (keys: {sorted(first)}); pass kind explicitly")


def to_requests(kind: str, records: Sequence[dict], case_ids: Sequence[int]) -> list[dict]:
    """Edit requests for `memit_fast.apply` (zsRE records are numbered by `case_ids`)."""
    if kind == "counterfact":
        return [counterfact_request(r) for r in records]
    return [zsre_request(r, c) for r, c in zip(records, case_ids)]


def evaluate(
    model, tok, kind: str, records, case_ids, *, batch_size=64, fluency=True, seed=0, gen_length=100
) -> list[dict]:
    """Per-record results of the model as it is now."""
    if kind == "counterfact":
        return evaluate_counterfact(
            model, tok, records, case_ids=case_ids, batch_size=batch_size, fluency=fluency, seed=seed,
            gen_length=gen_length,
        )  # fmt: skip
    return evaluate_zsre(model, tok, records, case_ids=case_ids, batch_size=batch_size)


def summarize(kind: str, results: Sequence[dict]) -> dict:
    return counterfact_metrics(results) if kind == "counterfact" else zsre_metrics(results)


def _sync(model) -> None:
    dev = model_device(model)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(model, fn):
    _sync(model)
    t = time.perf_counter()
    out = fn()
    _sync(model)
    return out, time.perf_counter() - t


def check_restored(model, orig_weights: dict) -> None:
    """Raise if any saved parameter differs (bitwise) from the model's current one."""
    for name, w in orig_weights.items():
        p = model.get_parameter(name)
        if not torch.equal(p.detach(), w.to(p.device, p.dtype)):
            raise RuntimeError(f"restore left {name} different from the saved original")


def _core():
    try:
        from memit_fast import apply, restore
    except ImportError as e:
        raise RuntimeError(f"memit_fast.apply/restore are not available: {e}") from e
    return apply, restore


def run_evaluation(
    model,
    tok,
    records: Sequence[dict],
    *,
    kind: str = "auto",
    edit: bool = True,
    edit_batch: int | None = None,
    sequential: bool = False,
    batch_size: int = 64,
    fluency: bool = True,
    gen_length: int = 100,
    seed: int = 0,
    hparams=None,
    apply_options: dict | None = None,
    apply_fn: Callable | None = None,
    restore_fn: Callable | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate `records` unedited, then (edit=True) edited with their own requests.

    apply_fn(model, tok, requests, hparams, copy=False, return_orig_weights=True, **apply_options)
    -> (model, orig_weights) and restore_fn(model, orig_weights) default to memit_fast.apply /
    memit_fast.restore. Returns {"kind", "n_records", "mode", "case_ids", "before": {"metrics",
    "records"}, "after": ... or None, "timing_s": {...}}. The model is unedited on return, also
    when an error is raised.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    kind = detect_kind(records) if kind == "auto" else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or 'auto', not {kind!r}")
    records = list(records)
    n = len(records)
    ids = [r.get("case_id", i) for i, r in enumerate(records)] if kind == "counterfact" else list(range(n))
    step = edit_batch or n
    batches = [range(i, min(i + step, n)) for i in range(0, n, step)]
    mode = "unedited only"
    if edit:
        how = "sequential" if sequential else "independent"
        mode = "all at once" if len(batches) == 1 else f"{how} batches of {step}"
    ev = dict(batch_size=batch_size, fluency=fluency, seed=seed, gen_length=gen_length)
    timing: dict = {}

    log(f"[eval] {kind}: {n} records, unedited")
    before, timing["eval_before"] = _timed(model, lambda: evaluate(model, tok, kind, records, ids, **ev))
    result = {
        "kind": kind,
        "n_records": n,
        "mode": mode,
        "case_ids": ids,
        "before": {"metrics": summarize(kind, before), "records": before},
        "after": None,
        "timing_s": timing,
    }
    if not edit:
        return result

    if apply_fn is None or restore_fn is None:
        core_apply, core_restore = _core()
        apply_fn, restore_fn = apply_fn or core_apply, restore_fn or core_restore
    requests = to_requests(kind, records, ids)
    opts = apply_options or {}
    timing.update(edit=0.0, eval_after=0.0, restore=0.0, edit_batches=[])
    after: list[dict] = []
    orig: dict = {}

    def do_restore():
        _, dt = _timed(model, lambda: restore_fn(model, orig))
        timing["restore"] += dt
        check_restored(model, orig)
        orig.clear()

    try:
        for k, b in enumerate(batches):
            log(f"[eval] editing batch {k + 1}/{len(batches)} ({len(b)} requests)")
            (_, w), dt = _timed(
                model,
                lambda: apply_fn(
                    model, tok, [requests[i] for i in b], hparams, copy=False, return_orig_weights=True,
                    **opts,
                ),  # fmt: skip
            )
            timing["edit"] += dt
            timing["edit_batches"].append(dt)
            for name, t in w.items():
                orig.setdefault(name, t)  # the first copy is the unedited weight
            if not sequential:
                log(f"[eval] evaluating batch {k + 1} edited")
                part = [records[i] for i in b], [ids[i] for i in b]
                res, dt = _timed(model, lambda: evaluate(model, tok, kind, *part, **ev))
                timing["eval_after"] += dt
                after += res
                do_restore()
        if sequential:
            log(f"[eval] evaluating all {n} records after the sequential edits")
            after, dt = _timed(model, lambda: evaluate(model, tok, kind, records, ids, **ev))
            timing["eval_after"] = dt
    finally:
        if orig:
            do_restore()
    result["after"] = {"metrics": summarize(kind, after), "records": after}
    return result
