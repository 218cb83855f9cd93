"""AlphaEdit's projected solve (memit_fast.sequential): the r x r symmetric form equals the
literal formula, the update leaves the preserved keys alone, and the basis cache."""

import pytest
import torch

from memit_fast.errors import HyperParamsError, SolveError
from memit_fast.sequential import KeyAccumulator, cached_null_space, check_method, factors_delta, null_space_basis, projected_factors


def _problem(d=40, m=12, n=5, n_prev=7, seed=0):
    """A covariance with 24 large and 16 tiny eigenvalues, keys, residuals and earlier keys."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    values = torch.cat([torch.rand(16, generator=g, dtype=torch.float64) * 1e-3, 0.5 + torch.rand(d - 16, generator=g, dtype=torch.float64)])
    cov = (q * values) @ q.T
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    resid = torch.randn(n, m, generator=g, dtype=torch.float64)
    prev = torch.randn(n_prev, d, generator=g, dtype=torch.float64)
    return cov, keys, resid, prev, q[:, 16:]


def _literal(P, kpkp, keys, resid, l2):
    """Delta = R K^T P (K_p K_p^T P + K K^T P + l2 I)^-1, the formula as AlphaEdit writes it."""
    K, R = keys.T, resid.T
    return R @ K.T @ P @ torch.linalg.inv(kpkp @ P + K @ K.T @ P + l2 * torch.eye(P.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("method", ["cholesky", "woodbury", "dense"])
@pytest.mark.parametrize("l2", [10.0, 0.1])
def test_projected_solve_equals_literal_formula(method, l2):
    cov, keys, resid, prev, _ = _problem()
    U = null_space_basis(cov, 2e-2)
    assert U.shape == (40, 16)
    acc = KeyAccumulator(U)
    acc.add(prev[:3])
    acc.add(prev[3:])
    assert torch.allclose(acc.kk, prev.T @ prev, rtol=1e-12, atol=1e-12)
    assert torch.allclose(acc.proj, U.T @ prev.T @ prev @ U, rtol=1e-12, atol=1e-12)
    r, a = projected_factors(U, acc.proj, keys, resid, l2, method)
    got = factors_delta(r, a)
    want = _literal(U @ U.T, acc.kk, keys, resid, l2)
    assert got.shape == (12, 40)
    assert (got - want).norm() / want.norm() < 1e-10


def test_update_orthogonal_to_preserved_keys():
    cov, keys, resid, prev, big = _problem()
    U = null_space_basis(cov, 2e-2)
    acc = KeyAccumulator(U)
    acc.add(prev)
    delta = factors_delta(*projected_factors(U, acc.proj, keys, resid, 10.0))
    k0 = big @ torch.randn(big.shape[1], 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert (delta @ k0).norm() / (delta.norm() * k0.norm()) < 1e-6
    assert delta.norm() > 0


def test_basis_cache(tmp_path):
    cov = _problem()[0].float()
    kw = dict(model_fp="fp", module="m.0", cache_dir=tmp_path)
    first = cached_null_space(cov, 2e-2, **kw)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1 and first.dtype == torch.float64
    assert torch.equal(cached_null_space(cov, 2e-2, **kw), first)  # read back
    cached_null_space(cov, 3e-2, **kw)  # another threshold, another file
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2
    files[0].write_bytes(b"garbage")  # a broken file is computed again
    assert torch.equal(cached_null_space(cov, 2e-2, **kw), first)
    with pytest.raises(SolveError, match="null space is empty"):
        cached_null_space(cov, 1e-9, **kw)


def test_check_method():
    check_method("alphaedit", 2e-2, 10)
    with pytest.raises(HyperParamsError, match="method"):
        check_method("rome", 2e-2, 10)
    with pytest.raises(HyperParamsError, match="l2"):
        check_method("alphaedit", 2e-2, 0)
    with pytest.raises(HyperParamsError, match="nullspace_threshold"):
        check_method("memit", float("nan"), 1)


def _records():
    """CounterFact-shaped records over the tiny tokenizer's words."""
    rows = [("Michael Jordan", "{} plays the sport of", "baseball", "basketball"), ("France", "The capital of {} is", "Rome", "Paris"),
            ("Eiffel Tower", "{}, which is located in", "Berlin", "Paris"), ("Danielle Darrieux", "{} spoke the language", "Italian", "French")]
    return [{"case_id": i, "requested_rewrite": {"prompt": p, "subject": s, "target_new": {"str": new}, "target_true": {"str": true}},
             "paraphrase_prompts": [f"Yes. {p.format(s)}"], "neighborhood_prompts": ["The capital of Italy is"],
             "generation_prompts": [f"{s} is"]} for i, (s, p, new, true) in enumerate(rows)]


def test_sequential_eval_curves(tmp_path, monkeypatch):
    import sys

    import tiny
    from memit_fast.eval.sequential import markdown_sequential, plot_curves, run_sequential

    m = tiny.model("llama")
    hp = tiny.hparams(m)
    stats = tiny.stats(m, hp)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    thr = float(max(torch.linalg.eigvalsh(s.mom2.double()).median() for s in stats.values()))
    out = run_sequential(m, tiny.tokenizer(), _records(), kind="counterfact", methods=["alphaedit", "memit"], edit_batch=2, hparams=hp,
                         fluency_records=2, gen_length=12, log=lambda s: None,
                         editor_options={"stats": stats, "context_templates": tiny.TEMPLATES, "progress": False, "nullspace_threshold": thr, "cache_dir": tmp_path})
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())  # restored after each method
    for method in ("alphaedit", "memit"):
        curve = out["methods"][method]["curve"]
        assert [p["n_edits"] for p in curve] == [2, 4]
        assert [p["so_far"]["ES"]["n"] for p in curve] == [2, 4] and all(p["first_batch"]["ES"]["n"] == 2 for p in curve)
        assert all(p["GE"]["n"] == 2 and p["edit_s"] > 0 for p in curve)
        assert [p["unedited_so_far"]["ES"]["n"] for p in curve] == [2, 4] and curve[-1]["unedited_so_far"]["NS"] == out["before"]["metrics"]["NS"]

    assert out["methods"]["memit"]["nullspace_threshold"] is None and out["methods"]["alphaedit"]["l2"] == 10.0
    text = markdown_sequential(out)
    assert "### alphaedit (nullspace_threshold" in text and "| first batch: ES |" in text and "unedited NS |" in text
    pytest.importorskip("matplotlib")
    plot_curves([out], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        plot_curves([out], str(tmp_path / "d.png"))


def test_merge_results_joins_methods_of_the_same_records():
    from memit_fast.eval.sequential import merge_results

    def result(method, ids=(1, 2)):
        return {"kind": "zsre", "n_records": 2, "edit_batch": 1, "case_ids": list(ids), "methods": {method: {"curve": []}},
                "timing_s": {"eval_before": 1.0, f"{method}_total": 2.0}}

    joined = merge_results([result("memit"), result("alphaedit"), result("memit", ids=(3, 4))])
    assert [sorted(r["methods"]) for r in joined] == [["alphaedit", "memit"], ["memit"]]
    assert joined[0]["timing_s"] == {"eval_before": 1.0, "memit_total": 2.0, "alphaedit_total": 2.0}
    assert "interrupted" not in joined[0]
    cut = result("alphaedit") | {"interrupted": "alphaedit: interrupted after 1 of 2 batches"}
    assert merge_results([result("memit"), cut])[0]["interrupted"] == cut["interrupted"]


def test_sequential_eval_interrupted_keeps_the_batches_done(tmp_path, monkeypatch):
    import tiny
    from memit_fast import editor
    from memit_fast.eval.sequential import run_sequential

    m = tiny.model("llama")
    hp = tiny.hparams(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    real, calls = editor.Editor.edit, []

    def edit(self, requests):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, requests)

    monkeypatch.setattr(editor.Editor, "edit", edit)
    out = run_sequential(m, tiny.tokenizer(), _records(), kind="counterfact", methods=["memit", "alphaedit"], edit_batch=2, hparams=hp,
                         fluency=False, log=lambda s: None,
                         editor_options={"stats": tiny.stats(m, hp), "context_templates": tiny.TEMPLATES, "progress": False, "cache_dir": tmp_path})
    assert out["interrupted"] == "memit: interrupted after 1 of 2 batches" and list(out["methods"]) == ["memit"]
    assert len(out["methods"]["memit"]["curve"]) == 1
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
