"""zsRE evaluation (records in the `zsre_mem_eval.json` / MEND format).

A record {subject, src, rephrase, answers, loc, loc_ans, ...} is scored as the original
evaluation does, teacher-forced token by token (see `scoring`):

    efficacy     answers[0] after src                  (the edited question)
    paraphrase   answers[0] after rephrase
    specificity  loc_ans    after loc + "?"            (an unrelated NQ question)

Each gives the list of per-token argmax hits of " " + answer; a record's accuracy is the mean
of that list (`report.zsre_metrics`). The original built one prompt per answer token by
decoding the answer's first tokens onto the question; concatenating token ids is the same
computation without re-tokenisation.
"""

from __future__ import annotations

from typing import Sequence

from .scoring import score_targets

PROMPT_SETS = ("efficacy", "paraphrase", "specificity")


def zsre_request(record: dict, case_id: int) -> dict:
    """The edit request of a record: prompt = src with the subject replaced by "{}",
    target_new = answers[0] (as the original `MENDQADataset`)."""
    return {
        "case_id": case_id,
        "prompt": record["src"].replace(record["subject"], "{}"),
        "subject": record["subject"],
        "target_new": {"str": record["answers"][0]},
    }


def evaluate_zsre(
    model, tok, records: Sequence[dict], *, case_ids: Sequence[int] | None = None, batch_size: int = 64
) -> list[dict]:
    """Per-record results {"case_id", "efficacy": [hit per answer token], "paraphrase": [...],
    "specificity": [...]}, in record order; case ids default to 0..n-1."""
    case_ids = list(range(len(records))) if case_ids is None else list(case_ids)
    prompts, targets = [], []
    for rec in records:
        prompts += [rec["src"], rec["rephrase"], rec["loc"] + "?"]
        targets += [rec["answers"][0], rec["answers"][0], rec["loc_ans"]]
    hits = score_targets(model, tok, prompts, targets, batch_size=batch_size).token_correct
    return [
        {"case_id": cid} | {name: hits[3 * r + k] for k, name in enumerate(PROMPT_SETS)}
        for r, cid in enumerate(case_ids)
    ]
