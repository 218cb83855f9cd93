"""CounterFact evaluation (records in the original `counterfact.json` format).

Per record, both targets (" " + target_new.str, " " + target_true.str) are scored after the
rewrite prompt (requested_rewrite.prompt filled with the subject), each paraphrase prompt and
each neighbourhood prompt: mean per-token NLL and argmax hits (see `scoring`). With fluency on,
one text is generated from each generation prompt and its weighted n-gram entropy taken (see
`fluency`). The metrics built from these are in `report.counterfact_metrics`.
"""

from __future__ import annotations

from typing import Sequence

from .fluency import generate_texts, text_entropy
from .scoring import score_targets

PROMPT_SETS = ("rewrite", "paraphrase", "neighborhood")


def counterfact_request(record: dict) -> dict:
    """The edit request of a record: its `requested_rewrite`, plus `case_id` where it has one."""
    req = dict(record["requested_rewrite"])
    if "case_id" in record:
        req["case_id"] = record["case_id"]
    return req


def counterfact_prompts(record: dict) -> dict[str, list[str]]:
    """{"rewrite": [filled prompt], "paraphrase": [...], "neighborhood": [...]}."""
    rw = record["requested_rewrite"]
    return {
        "rewrite": [rw["prompt"].format(rw["subject"])],
        "paraphrase": list(record["paraphrase_prompts"]),
        "neighborhood": list(record["neighborhood_prompts"]),
    }


def evaluate_counterfact(
    model,
    tok,
    records: Sequence[dict],
    *,
    case_ids: Sequence[int] | None = None,
    batch_size: int = 64,
    fluency: bool = True,
    seed: int = 0,
    gen_length: int = 100,
) -> list[dict]:
    """Per-record results, in record order:

    {"case_id", "rewrite"|"paraphrase"|"neighborhood": {"nll_new": [..], "nll_true": [..],
     "new_argmax": [..], "true_argmax": [..]} (one entry per prompt),
     "ngram_entropy": GE in bits (mean over the record's texts), "texts": [...]}  (fluency only)

    All records' prompts are scored together, `batch_size` (prompt, target) pairs per forward.
    Case ids default to each record's `case_id`, else its position.
    """
    if case_ids is None:
        case_ids = [rec.get("case_id", r) for r, rec in enumerate(records)]
    prompts, targets, where = [], [], []
    for r, rec in enumerate(records):
        rw = rec["requested_rewrite"]
        for name, ps in counterfact_prompts(rec).items():
            for p in ps:
                prompts += [p, p]
                targets += [rw["target_new"]["str"], rw["target_true"]["str"]]
                where.append((r, name))
    scores = score_targets(model, tok, prompts, targets, batch_size=batch_size)
    out = [
        {"case_id": cid}
        | {name: {"nll_new": [], "nll_true": [], "new_argmax": [], "true_argmax": []} for name in PROMPT_SETS}
        for cid in case_ids
    ]
    hits = scores.all_correct
    for k, (r, name) in enumerate(where):
        d = out[r][name]
        d["nll_new"].append(scores.nll[2 * k])
        d["nll_true"].append(scores.nll[2 * k + 1])
        d["new_argmax"].append(hits[2 * k])
        d["true_argmax"].append(hits[2 * k + 1])
    if fluency:
        gen_prompts = [p for rec in records for p in rec["generation_prompts"]]
        texts = generate_texts(
            model, tok, gen_prompts, max_length=gen_length, batch_size=batch_size, seed=seed
        )
        at = 0
        for r, rec in enumerate(records):
            mine = texts[at : at + len(rec["generation_prompts"])]
            at += len(mine)
            out[r]["texts"] = mine
            out[r]["ngram_entropy"] = sum(map(text_entropy, mine)) / len(mine) if mine else 0.0
    return out
