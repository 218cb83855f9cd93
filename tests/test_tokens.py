"""Subject positions for any tokenizer: offsets, or incremental encoding for slow tokenizers."""

import pytest

import tiny
from memit_fast.errors import RequestError
from memit_fast.tokens import encode_prompt, encode_target, encode_targets


class _Slow:
    """A tokenizer without offsets (like a slow, pure-Python HF tokenizer)."""

    is_fast = False

    def __init__(self, fast):
        self.fast = fast

    def __call__(self, text, **kw):
        return {"input_ids": self.fast(text)["input_ids"]}


@pytest.mark.parametrize("slow", [False, True])
def test_subject_last_and_first(slow):
    fast = tiny.tokenizer()
    tok = _Slow(fast) if slow else fast
    enc = encode_prompt(tok, "The capital of ", "United Kingdom", " is", "subject_last")
    assert enc.ids == fast("The capital of United Kingdom is")["input_ids"]
    assert fast.decode(enc.ids[: enc.lookup + 1]) == "The capital of United Kingdom"
    first = encode_prompt(tok, "The capital of ", "United Kingdom", " is", "subject_first")
    assert fast.decode(enc.ids[: first.lookup]) == "The capital of" and first.lookup < enc.lookup
    assert encode_prompt(tok, "The capital of ", "United Kingdom", " is", "last").lookup == len(enc.ids) - 1


def test_subject_at_start_and_end():
    tok = tiny.tokenizer()
    start = encode_prompt(tok, "", "Paris", " is a city")
    assert tok.decode(start.ids[: start.lookup + 1]) == "Paris"
    end = encode_prompt(tok, "I love ", "Paris", "")
    assert end.lookup == len(end.ids) - 1


def test_bos_adding_tokenizer():
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    base = tiny.tokenizer()
    tk = base.backend_tokenizer
    tk.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", base.eos_token_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    try:
        enc = encode_prompt(tok, "", "Paris", " is")
        assert enc.ids[0] == base.eos_token_id and tok.decode(enc.ids[1 : enc.lookup + 1]) == "Paris"
        assert encode_target(tok, " Rome")[0] != base.eos_token_id  # targets without special tokens
    finally:
        tk.post_processor = None


def test_subject_not_in_tokens():
    """A normaliser that drops characters can leave the subject without tokens."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    tk = tiny.tokenizer().backend_tokenizer
    tk.normalizer = normalizers.Replace("§", "")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    try:
        with pytest.raises(RequestError, match="not in the tokens"):
            encode_prompt(tok, "The ", "§§", " is")
    finally:
        tk.normalizer = None


@pytest.mark.model
def test_default_model_tokenizer():
    from transformers import AutoTokenizer

    from memit_fast.default_model import convert

    tok = AutoTokenizer.from_pretrained(convert())
    enc = encode_prompt(tok, "", "The Eiffel Tower", " is located in the city of")
    assert tok.decode(enc.ids[: enc.lookup + 1]) == "The Eiffel Tower"
    assert tok.decode(encode_target(tok, " Paris")) == " Paris"


@pytest.mark.parametrize("slow", [False, True])
def test_targets_in_one_call(slow):
    """encode_targets: each target's ids as encode_target gives them one by one; a target that
    encodes to no tokens is a RequestError naming it."""
    tok = tiny.tokenizer()
    tok = _Slow(tok) if slow else tok
    targets = [" Rome", " the Pacific Ocean", "x"]
    assert encode_targets(tok, targets) == [encode_target(tok, t) for t in targets]
    with pytest.raises(RequestError, match="target '' encodes to no tokens"):
        encode_targets(tok, [" Rome", ""])
