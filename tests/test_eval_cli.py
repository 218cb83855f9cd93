"""The evaluation on the real default model (SmolLM2-135M): scoring and generation agree with
their plain twins, and `memit-fast eval` runs end to end, unedited and edited, on a few records
of each dataset (CPU)."""

import argparse
import json
import os
from pathlib import Path

import pytest

import memit_fast
from memit_fast.eval import cli, generate_texts, score_targets
from memit_fast.eval import scoring
from memit_fast.eval.counterfact import counterfact_prompts

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    for d in (os.environ.get("MEMIT_FAST_DATA"), ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
        if d and (Path(d) / "counterfact_250.json").exists():
            return Path(d)
    pytest.skip("shared/data (counterfact_250.json, zsre_eval_300.json) not found; set MEMIT_FAST_DATA")


@pytest.fixture(scope="module")
def default_model():
    return memit_fast.load_default_model(device="cpu")


def test_projected_scoring_equals_full_logits_and_batching(default_model, monkeypatch):
    model, tok = default_model
    rec = json.loads((data_dir() / "counterfact_250.json").read_text())[0]
    rw = rec["requested_rewrite"]
    ps = counterfact_prompts(rec)
    prompts = [p for p in ps["rewrite"] + ps["paraphrase"] + ps["neighborhood"][:2] for _ in (0, 1)]
    targets = [rw["target_new"]["str"], rw["target_true"]["str"]] * (len(prompts) // 2)
    fast = score_targets(model, tok, prompts, targets, batch_size=32)
    single = score_targets(model, tok, prompts, targets, batch_size=1)
    monkeypatch.setattr(scoring, "split_head", lambda m: None)
    full = score_targets(model, tok, prompts, targets, batch_size=32)
    for other in (single, full):
        assert other.token_correct == fast.token_correct
        assert max(abs(a - b) for a, b in zip(other.nll, fast.nll)) < 1e-4


def test_batched_greedy_generation_equals_one_by_one(default_model):
    model, tok = default_model
    prompts = ["The capital of France is", "One can get to Angola by navigating"]  # 5 and 7 tokens
    batched = generate_texts(model, tok, prompts, max_length=16, top_k=1, batch_size=8)
    assert batched == [generate_texts(model, tok, [p], max_length=16, top_k=1)[0] for p in prompts]


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    """A small statistics corpus and a cache shared by the edit tests (computed once)."""
    d = tmp_path_factory.mktemp("stats")
    text = (data_dir() / "wikitext-2-raw-wiki.test.raw").read_text(encoding="utf-8")
    (d / "corpus.txt").write_text(text[:30_000], encoding="utf-8")  # about 7k tokens
    return d


def _eval_args(tmp_path, stats_dir, *extra):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(
        ["--device", "cpu", "--corpus", str(stats_dir / "corpus.txt"), "--cache-dir", str(stats_dir / "cache"),
         "--out", str(tmp_path / "out"), *extra]
    )  # fmt: skip


@pytest.mark.parametrize(
    "dataset, n, extra",
    [
        ("counterfact_250.json", 2, ["--gen-length", "16"]),
        ("zsre_eval_300.json", 2, []),
    ],
)
def test_eval_command_edits_and_restores(tmp_path, stats_dir, capsys, dataset, n, extra):
    args = _eval_args(tmp_path, stats_dir, "--data", str(data_dir() / dataset), "--edits", str(n), *extra)
    assert cli.run(args) == 0  # run_evaluation checks the restored weights bit for bit
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["n_records"] == n and res["mode"] == "all at once"
    assert len(res["before"]["records"]) == len(res["after"]["records"]) == n
    first = "ES" if res["kind"] == "counterfact" else "efficacy"
    before, after = res["before"]["metrics"][first]["mean"], res["after"]["metrics"][first]["mean"]
    assert after >= 50.0 and after >= before, (before, after)
    if res["kind"] == "counterfact":
        assert "GE" in res["after"]["metrics"] and len(res["after"]["records"][0]["texts"]) == 10
    assert res["timing_s"]["eval_before"] > 0 and res["timing_s"]["edit"] > 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| metric | unedited | edited |" in md and md in capsys.readouterr().out


def test_eval_command_unedited_only(tmp_path, stats_dir):
    args = _eval_args(tmp_path, stats_dir, "--data", str(data_dir() / "zsre_eval_300.json"), "--edits", "2", "--no-edit")
    assert cli.run(args) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["kind"] == "zsre" and res["after"] is None
    assert set(res["before"]["metrics"]) == {"S", "efficacy", "paraphrase", "specificity"}
