"""Evaluation metrics on cases whose answers are known by construction.

The language model here is a bigram table: logits at position t are A[x_t] + B[t] (rows of A are
log-probabilities chosen by hand), so every NLL, argmax and greedy continuation can be worked
out on paper. Its tokenizer splits on spaces.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from memit_fast.eval import (
    counterfact_metrics,
    counterfact_request,
    evaluate_counterfact,
    evaluate_zsre,
    generate_texts,
    harmonic_mean,
    markdown_report,
    ngram_entropy,
    run_evaluation,
    score_targets,
    score_token_ids,
    text_entropy,
    words,
    zsre_metrics,
    zsre_request,
)
from memit_fast.eval.fluency import generate_ids
from memit_fast.eval.run import check_restored, detect_kind

VOCAB = ["<s>", "X", "Y", "is", "in", "the", "city", "of", "Paris", "London", "?"]
ID = {w: i for i, w in enumerate(VOCAB)}
V = len(VOCAB)
MAX_POS = 64


def probs_row(**p):
    """A row of log-probabilities: the named words get their p, the rest share what is left."""
    rest = (1.0 - sum(p.values())) / (V - len(p))
    return [math.log(p.get(w, rest)) for w in VOCAB]


# P(next | word). Rows not listed are uniform except a small preference for "the".
TABLE = {
    "in": probs_row(Paris=0.6, London=0.3),
    "of": probs_row(Paris=0.1, London=0.8),
    "Paris": probs_row(city=0.5, of=0.2),
    "city": probs_row(of=0.7),
    "?": probs_row(London=0.4, city=0.35),
}


def bigram_logits():
    a = torch.tensor([TABLE.get(w, probs_row(the=0.2)) for w in VOCAB])
    return a


class FakeTok:
    """Whitespace tokenizer over VOCAB ("?" is a word of its own); prompts get "<s>" first when
    add_special_tokens."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        bos = [ID["<s>"]] if add_special_tokens else []
        return {"input_ids": [bos + [ID[w] for w in t.replace("?", " ?").split()] for t in texts]}

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [" ".join(VOCAB[i] for i in s if not (skip_special_tokens and i == 0)) for s in seqs]


class Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("like", torch.zeros(()))  # follows .to(dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        h = torch.cat([torch.nn.functional.one_hot(input_ids, V), torch.nn.functional.one_hot(position_ids, MAX_POS)], -1)
        return SimpleNamespace(last_hidden_state=h.to(self.like.dtype), past_key_values=None)


class BigramLM(torch.nn.Module):
    """logits[b, t] = A[x_t] + B[pos_t], through a body (one-hot features) and a linear head."""

    def __init__(self, a, b=None, split=True):
        super().__init__()
        b = torch.zeros(MAX_POS, V) if b is None else b
        self.body = Body()
        self.head = torch.nn.Linear(V + MAX_POS, V, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.cat([a, b]).T)
        if split:
            self.base_model = self.body
            self.get_output_embeddings = lambda: self.head

    def forward(self, **kw):
        return SimpleNamespace(logits=self.head(self.body(**kw).last_hidden_state), past_key_values=None)


@pytest.fixture
def lm():
    return BigramLM(bigram_logits())


def lp(prev, nxt):
    return TABLE[prev][ID[nxt]]


# --------------------------------------------------------------------------- scoring


PAIRS = [  # (prompt words, target words): NLL and hits by hand below
    ("X is in", "Paris of"),
    ("X is of", "London"),
    ("the city", "of London"),
    ("Y", "the"),
]


def expected_pair(prompt, target):
    seq = ["<s>"] + prompt.split() + target.split()
    p = len(prompt.split()) + 1
    prev = seq[p - 1 : len(seq) - 1]
    gold = seq[p:]
    rows = [TABLE.get(w, probs_row(the=0.2)) for w in prev]
    nll = -sum(r[ID[g]] for r, g in zip(rows, gold)) / len(gold)
    hits = [max(range(V), key=lambda j: r[j]) == ID[g] for r, g in zip(rows, gold)]
    return nll, hits


def test_score_matches_hand_values(lm):
    s = score_targets(lm, FakeTok(), [p for p, _ in PAIRS], [t for _, t in PAIRS])
    # Written out: "in"->Paris 0.6, "Paris"->of 0.2; argmax after "in" is Paris, after "Paris" is city.
    assert s.nll[0] == pytest.approx(-(math.log(0.6) + math.log(0.2)) / 2, abs=1e-6)
    assert s.token_correct[0] == [True, False]
    assert s.nll[1] == pytest.approx(-math.log(0.8), abs=1e-6)
    assert s.token_correct[1] == [True]
    assert s.nll[2] == pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2, abs=1e-6)
    assert s.all_correct == [False, True, True, True]
    for (p, t), nll, hits in zip(PAIRS, s.nll, s.token_correct):
        e_nll, e_hits = expected_pair(p, t)
        assert nll == pytest.approx(e_nll, abs=1e-6) and hits == e_hits


@pytest.mark.parametrize("batch_size", [1, 2, 3, 100])
def test_padding_and_batching_do_not_change_results(lm, batch_size):
    ref = score_targets(lm, FakeTok(), [p for p, _ in PAIRS], [t for _, t in PAIRS], batch_size=1)
    got = score_targets(lm, FakeTok(), [p for p, _ in PAIRS], [t for _, t in PAIRS], batch_size=batch_size)
    assert got == ref


def test_positions_are_read_where_the_target_is():
    # A position bias that favours "Paris" only at position 3: the target after a 3-token prompt
    # is read from position 2, and the second target token from position 3.
    b = torch.zeros(MAX_POS, V)
    b[3, ID["Paris"]] = 50.0
    model = BigramLM(bigram_logits(), b)
    s = score_token_ids(model, [[ID["X"], ID["is"], ID["in"]]], [[ID["London"], ID["Paris"]]], batch_size=4)
    assert s.token_correct == [[False, True]]
    # Right padding: the same pair next to a longer one gives the same numbers.
    s2 = score_token_ids(
        model,
        [[ID["X"], ID["is"], ID["in"]], [ID["Y"]] * 7],
        [[ID["London"], ID["Paris"]], [ID["the"]] * 5],
        batch_size=4,
    )
    assert s2.nll[0] == s.nll[0] and s2.token_correct[0] == s.token_correct[0]


def test_full_logits_path_equals_projected_path(lm):
    full = BigramLM(bigram_logits(), split=False)
    args = ([p for p, _ in PAIRS], [t for _, t in PAIRS])
    assert score_targets(full, FakeTok(), *args) == score_targets(lm, FakeTok(), *args)


def test_targets_get_a_space_and_no_special_tokens():
    seen = {}

    class Spy(FakeTok):
        def __call__(self, texts, add_special_tokens=True):
            seen.setdefault(add_special_tokens, []).extend(texts)
            return super().__call__(texts, add_special_tokens)

    score_targets(BigramLM(bigram_logits()), Spy(), ["X is in"], ["Paris"])
    assert seen == {True: ["X is in"], False: [" Paris"]}


def test_low_precision_model_is_scored_in_float32():
    model = BigramLM(bigram_logits()).to(torch.bfloat16)
    s = score_targets(model, FakeTok(), ["X is in"], ["Paris"])
    assert s.nll[0] == pytest.approx(-math.log(0.6), abs=2e-2)  # bf16 logits, fp32 log-softmax


# --------------------------------------------------------------------------- n-gram entropy


def test_ngram_entropies_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(["a", "b", "a", "b"], 2) == pytest.approx(h2)
    assert ngram_entropy(["a", "b", "a", "b"], 3) == pytest.approx(1.0)
    assert text_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # Four distinct words: 3 bigrams, 2 trigrams, all different.
    assert text_entropy("w x y z") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert text_entropy("same same same same same") == 0.0
    assert text_entropy("two words") == 0.0  # one bigram (H2 = 0), no trigram
    assert text_entropy("") == 0.0


def test_word_splitting():
    assert words("Don't stop, John's car costs $1,000.50 (really).") == [
        "Do", "n't", "stop", ",", "John", "'s", "car", "costs", "$", "1,000.50", "(", "really", ")", ".",
    ]  # fmt: skip
    assert words("well-known  3.5\n\"quoted\"") == ["well-known", "3.5", '"', "quoted", '"']
    # Punctuation counts as words in the n-grams, as with nltk.
    assert text_entropy("a , a ,") == text_entropy("a, a,")


def test_harmonic_mean():
    assert harmonic_mean([100.0, 50.0, 50.0]) == pytest.approx(60.0)
    assert harmonic_mean([20.0, 20.0]) == pytest.approx(20.0)
    assert harmonic_mean([90.0, 0.0, 80.0]) == 0.0


# --------------------------------------------------------------------------- CounterFact


RECORD = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "{} is in",
        "subject": "X",
        "target_new": {"str": "Paris", "id": "Q90"},
        "target_true": {"str": "London", "id": "Q84"},
    },
    "paraphrase_prompts": ["Y is in", "the city of"],
    "neighborhood_prompts": ["the city of", "Y is in"],
    "generation_prompts": ["X is", "the city"],
}


def test_counterfact_metrics_by_hand(lm):
    res = evaluate_counterfact(lm, FakeTok(), [RECORD], fluency=False)
    assert res[0]["case_id"] == 7
    assert res[0]["rewrite"]["nll_new"][0] == pytest.approx(-math.log(0.6), abs=1e-6)
    assert res[0]["rewrite"]["nll_true"][0] == pytest.approx(-math.log(0.3), abs=1e-6)
    m = {k: v["mean"] for k, v in counterfact_metrics(res).items()}
    # after "in": P(Paris)=.6, P(London)=.3; after "of": P(Paris)=.1, P(London)=.8
    expect = {
        "ES": 100.0,  # .6 > .3
        "PS": 50.0,  # "Y is in" yes, "the city of" no
        "NS": 50.0,  # "the city of" keeps London, "Y is in" does not
        "EM": 100 * (0.6 - 0.3),
        "PM": 100 * ((0.6 - 0.3) + (0.1 - 0.8)) / 2,
        "NM": 100 * ((0.8 - 0.1) + (0.3 - 0.6)) / 2,
        "ES_acc": 100.0,  # Paris is the argmax after "in"
        "PS_acc": 50.0,
        "NS_acc": 50.0,  # London is the argmax after "of" only
        "S": 60.0,  # 3 / (1/100 + 1/50 + 1/50)
    }
    assert m == pytest.approx(expect, abs=1e-4)


def test_counterfact_means_over_records_and_standard_error(lm):
    rewrite = {**RECORD["requested_rewrite"], "prompt": "{} city of", "subject": "the"}
    flipped = {**RECORD, "case_id": 8, "requested_rewrite": rewrite}  # "the city of": ES 0 here
    res = evaluate_counterfact(lm, FakeTok(), [RECORD, flipped], fluency=False)
    es = counterfact_metrics(res)["ES"]
    assert es["mean"] == pytest.approx(50.0) and es["n"] == 2
    assert es["se"] == pytest.approx(100 * math.sqrt(0.5 / 2))  # values 1, 0: sample var 0.5


def test_counterfact_request_keeps_case_id():
    req = counterfact_request(RECORD)
    assert req["prompt"] == "{} is in" and req["target_new"]["str"] == "Paris" and req["case_id"] == 7


def test_counterfact_fluency_uses_generation_prompts(lm):
    res = evaluate_counterfact(lm, FakeTok(), [RECORD], fluency=True, gen_length=6)
    texts = res[0]["texts"]
    assert len(texts) == 2 and texts[0].startswith("X is") and texts[1].startswith("the city")
    assert all(len(t.split()) == 5 for t in texts)  # 6 tokens with "<s>", dropped when decoding
    assert res[0]["ngram_entropy"] == pytest.approx(sum(map(text_entropy, texts)) / 2)
    assert counterfact_metrics(res)["GE"]["mean"] == pytest.approx(100 * res[0]["ngram_entropy"])


# --------------------------------------------------------------------------- generation


def greedy_chain(start, n):
    out, w = [], start
    for _ in range(n):
        row = TABLE.get(w, probs_row(the=0.2))
        w = VOCAB[max(range(V), key=lambda j: row[j])]
        out.append(w)
    return out


def test_greedy_generation_left_padded_batch(lm):
    seqs = [[ID["X"], ID["is"], ID["in"]], [ID["city"]], [ID["Y"], ID["the"], ID["city"], ID["?"], ID["of"]]]
    gen = torch.Generator().manual_seed(0)
    new = generate_ids(lm, seqs, max_length=8, top_k=1, gen=gen, pad_id=0)
    for s, got in zip(seqs, new):
        assert [VOCAB[i] for i in got] == greedy_chain(VOCAB[s[-1]], 8 - len(s))
    assert generate_ids(lm, [[1] * 9], max_length=8, top_k=1, gen=gen, pad_id=0) == [[]]


def test_sampling_is_seeded_and_stays_in_top_k(lm):
    prompts = ["X is in", "the city of", "Y"] * 4
    a = generate_texts(lm, FakeTok(), prompts, max_length=12, top_k=2, seed=3, batch_size=5)
    b = generate_texts(lm, FakeTok(), prompts, max_length=12, top_k=2, seed=3, batch_size=5)
    assert a == b
    assert a != generate_texts(lm, FakeTok(), prompts, max_length=12, top_k=2, seed=4, batch_size=5)

    def top2(w):  # words at least as likely as the second most likely one (ties included)
        row = TABLE.get(w, probs_row(the=0.2))
        second = sorted(row)[-2]
        return {VOCAB[j] for j in range(V) if row[j] >= second - 1e-9}

    for p, t in zip(prompts, a):
        ws = t.split()
        n = len(p.split())
        assert ws[:n] == p.split() and len(ws) == 11
        assert all(nxt in top2(prev) for prev, nxt in zip(ws[n - 1 :], ws[n:]))


# --------------------------------------------------------------------------- zsRE


ZSRE = {
    "subject": "X",
    "src": "X is in",
    "rephrase": "Y is in",
    "answers": ["Paris of"],
    "loc": "the city",
    "loc_ans": "London of",
    "pred": "",
    "alt": "",
    "cond": "",
}


def test_zsre_token_accuracy_by_hand(lm):
    # " Paris of" after "in": Paris is the argmax (hit), then city, not "of" (miss).
    # " London of" after "the city ?": London is the argmax (hit), then "the" (miss).
    # After "of" London, not Paris, is the argmax: both tokens of the second record's src miss.
    res = evaluate_zsre(lm, FakeTok(), [ZSRE, dict(ZSRE, src="Y is of")])
    assert res[0] == {"case_id": 0, "efficacy": [True, False], "paraphrase": [True, False], "specificity": [True, False]}
    assert res[1]["efficacy"] == [False, False]
    m = {k: v["mean"] for k, v in zsre_metrics(res).items()}
    assert m == pytest.approx({"efficacy": 25.0, "paraphrase": 50.0, "specificity": 50.0, "S": 37.5})


def test_zsre_request_as_the_original():
    rec = {"subject": "IAAF Combined Events Challenge", "src": "When was the inception of IAAF Combined Events Challenge?", "answers": ["1998", "2000"]}  # fmt: skip
    assert zsre_request(rec, 4) == {
        "case_id": 4,
        "prompt": "When was the inception of {}?",
        "subject": "IAAF Combined Events Challenge",
        "target_new": {"str": "1998"},
    }


def test_detect_kind():
    assert detect_kind([RECORD]) == "counterfact" and detect_kind([ZSRE]) == "zsre"
    with pytest.raises(ValueError):
        detect_kind([{"foo": 1}])


# --------------------------------------------------------------------------- the editing loop


class FakeEditor:
    """apply: swaps the Paris/London logits after "in" (so ES flips), returns the original head;
    records whether each call found the model unedited."""

    def __init__(self, lm, fail_on_call=None):
        self.lm, self.orig = lm, lm.head.weight.detach().clone()
        self.calls, self.fail_on_call = [], fail_on_call

    def apply(self, model, tok, requests, hparams, *, copy, return_orig_weights, **opts):
        assert copy is False and return_orig_weights is True
        self.calls.append(([r["case_id"] for r in requests], torch.equal(model.head.weight, self.orig), opts))
        saved = {"head.weight": model.head.weight.detach().clone()}
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("edit failed")
        with torch.no_grad():
            w = model.head.weight
            w[[ID["Paris"], ID["London"]], ID["in"]] = w[[ID["London"], ID["Paris"]], ID["in"]].clone()
        return model, saved

    def restore(self, model, orig_weights):
        with torch.no_grad():
            for name, t in orig_weights.items():
                model.get_parameter(name).copy_(t)


def _records(n):
    return [dict(RECORD, case_id=i) for i in range(n)]


def test_loop_all_at_once_restores_and_reports_both(lm):
    ed = FakeEditor(lm)
    out = run_evaluation(lm, FakeTok(), _records(3), fluency=False, apply_fn=ed.apply, restore_fn=ed.restore,
                         apply_options={"corpus": "c.txt"}, log=lambda m: None)  # fmt: skip
    assert [c[0] for c in ed.calls] == [[0, 1, 2]] and ed.calls[0][2] == {"corpus": "c.txt"}
    assert out["mode"] == "all at once"
    assert out["before"]["metrics"]["ES"]["mean"] == 100.0 and out["after"]["metrics"]["ES"]["mean"] == 0.0
    assert torch.equal(lm.head.weight, ed.orig)
    assert set(out["timing_s"]) >= {"eval_before", "edit", "eval_after", "restore"}


def test_loop_independent_batches_restore_between(lm):
    ed = FakeEditor(lm)
    out = run_evaluation(lm, FakeTok(), _records(3), edit_batch=2, fluency=False, apply_fn=ed.apply,
                         restore_fn=ed.restore, log=lambda m: None)  # fmt: skip
    assert [(c[0], c[1]) for c in ed.calls] == [([0, 1], True), ([2], True)]
    assert [r["case_id"] for r in out["after"]["records"]] == [0, 1, 2]
    assert out["after"]["metrics"]["ES"]["mean"] == 0.0
    assert torch.equal(lm.head.weight, ed.orig)


def test_loop_sequential_batches_accumulate(lm):
    ed = FakeEditor(lm)
    out = run_evaluation(lm, FakeTok(), _records(3), edit_batch=1, sequential=True, fluency=False,
                         apply_fn=ed.apply, restore_fn=ed.restore, log=lambda m: None)  # fmt: skip
    # three swaps: the model seen by calls 2 and 3 is edited, the final one is swapped (odd count)
    assert [c[1] for c in ed.calls] == [True, False, True]
    assert out["mode"] == "sequential batches of 1"
    assert out["after"]["metrics"]["ES"]["mean"] == 0.0
    assert torch.equal(lm.head.weight, ed.orig)  # restored to the first saved copy


def test_loop_restores_after_an_error(lm):
    ed = FakeEditor(lm, fail_on_call=2)
    with pytest.raises(RuntimeError, match="edit failed"):
        run_evaluation(lm, FakeTok(), _records(2), edit_batch=1, sequential=True, fluency=False,
                       apply_fn=ed.apply, restore_fn=ed.restore, log=lambda m: None)  # fmt: skip
    assert torch.equal(lm.head.weight, ed.orig)


def test_bad_restore_is_caught(lm):
    ed = FakeEditor(lm)
    with pytest.raises(RuntimeError, match="restore left head.weight"):
        run_evaluation(lm, FakeTok(), _records(1), fluency=False, apply_fn=ed.apply,
                       restore_fn=lambda m, w: None, log=lambda m: None)  # fmt: skip
    with pytest.raises(RuntimeError):
        check_restored(lm, {"head.weight": torch.zeros_like(lm.head.weight)})


def test_unedited_only_needs_no_editor(lm):
    out = run_evaluation(lm, FakeTok(), [ZSRE], edit=False, log=lambda m: None)
    assert out["kind"] == "zsre" and out["after"] is None and out["case_ids"] == [0]


def test_markdown_report_rows(lm):
    ed = FakeEditor(lm)
    out = run_evaluation(lm, FakeTok(), _records(2), fluency=False, apply_fn=ed.apply, restore_fn=ed.restore,
                         log=lambda m: None)  # fmt: skip
    md = markdown_report(out)
    assert "| Efficacy ES: P(new) > P(true) | 100.0 ± 0.0 | 0.0 ± 0.0 |" in md
    assert "| Score S (hmean ES, PS, NS) | 60.0 | 0.0 |" in md  # ES 0 after: S is 0
    assert "- eval_before: " in md and "- edit: " in md
