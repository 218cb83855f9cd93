"""End to end on the default model (SmolLM2-135M): 12 CounterFact records edited together."""

import json
import time

import pytest

import memit_fast
import tiny
from memit_fast.eval import counterfact_metrics, evaluate_counterfact

pytestmark = pytest.mark.model
DATA = tiny.DATA


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    if not (DATA / "counterfact_250.json").exists():
        pytest.skip(f"{DATA} not found (the shared CounterFact and WikiText files)")
    records = json.loads((DATA / "counterfact_250.json").read_text())[:12]
    model, tok = memit_fast.load_default_model(device="cpu")
    before = counterfact_metrics(evaluate_counterfact(model, tok, records, fluency=False))
    start = time.perf_counter()
    _, orig = memit_fast.apply(
        model, tok, records, corpus=tiny.corpus_lines(300), cache_dir=tmp_path_factory.mktemp("cache"), return_orig_weights=True, progress=False
    )
    seconds = time.perf_counter() - start
    after = counterfact_metrics(evaluate_counterfact(model, tok, records, fluency=False))
    memit_fast.restore(model, orig)
    restored = counterfact_metrics(evaluate_counterfact(model, tok, records, fluency=False))
    print(f"\nSmolLM2, 12 CounterFact edits in {seconds:.0f} s: " + ", ".join(f"{k} {before[k]['mean']:.1f} -> {after[k]['mean']:.1f}" for k in ("ES", "PS", "NS")))
    return before, after, restored


def test_efficacy(scores):
    _, after, _ = scores
    assert after["ES"]["mean"] >= 90


def test_generalisation_rises(scores):
    before, after, _ = scores
    assert after["PS"]["mean"] >= before["PS"]["mean"] + 25


def test_neighbours_mostly_kept(scores):
    before, after, _ = scores
    assert after["NS"]["mean"] >= before["NS"]["mean"] - 10


def test_restore_gives_back_the_unedited_scores(scores):
    before, _, restored = scores
    assert {k: v["mean"] for k, v in before.items()} == {k: v["mean"] for k, v in restored.items()}
