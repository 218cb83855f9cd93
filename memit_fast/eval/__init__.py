"""Evaluation of edits: CounterFact and zsRE metrics, before and after editing.

    from memit_fast.eval import run_evaluation, load_records
    result = run_evaluation(model, tok, load_records("counterfact.json")[:20])
    print(markdown_report(result))
"""

from .counterfact import counterfact_request, evaluate_counterfact
from .fluency import generate_texts, ngram_entropy, text_entropy, words
from .report import counterfact_metrics, harmonic_mean, markdown_report, zsre_metrics
from .run import detect_kind, load_records, run_evaluation, to_requests
from .scoring import Scores, score_targets, score_token_ids
from .zsre import evaluate_zsre, zsre_request

__all__ = [
    "Scores",
    "counterfact_metrics",
    "counterfact_request",
    "detect_kind",
    "evaluate_counterfact",
    "evaluate_zsre",
    "generate_texts",
    "harmonic_mean",
    "load_records",
    "markdown_report",
    "ngram_entropy",
    "run_evaluation",
    "score_targets",
    "score_token_ids",
    "text_entropy",
    "to_requests",
    "words",
    "zsre_metrics",
    "zsre_request",
]
