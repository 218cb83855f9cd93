"""Tiny random models of each supported architecture and a small byte-level BPE tokenizer, for
tests of the mechanics (no download, a few seconds)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

DATA = Path(os.environ.get("MEMIT_FAST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
WIKITEXT = DATA / "wikitext-2-raw-wiki.test.raw"
_FALLBACK_TEXT = (
    "Michael Jordan plays the sport of basketball. The Eiffel Tower is located in the city of Paris. "
    "The capital of France is Paris, and the capital of Italy is Rome. Danielle Darrieux spoke French. "
) * 50

ARCHS = ("gpt2", "gptj", "gpt_neox", "llama")


def corpus_lines(n: int | None = None) -> list[str]:
    """WikiText-2 test lines from ../shared/data when present, else seeded sentences of random
    words (varied enough that the statistics of the tiny models have full rank)."""
    if WIKITEXT.exists():
        lines = [line.strip() for line in WIKITEXT.open(encoding="utf-8") if line.strip()]
    else:
        import random

        rng, words = random.Random(0), _FALLBACK_TEXT.split()
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(3000)]
    return lines[:n] if n else lines


@functools.lru_cache
def tokenizer():
    """A byte-level BPE (1000 tokens) trained on the corpus; a fast tokenizer with offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"], show_progress=False)
    tk.train_from_iterator(corpus_lines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def model(arch: str, dtype=torch.float64, layers: int = 6, seed: int = 0):
    """A random model of `arch` with d_model 64, in eval mode."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTJConfig,
        GPTJForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    vocab = len(tokenizer())
    torch.manual_seed(seed)
    if arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0))
    elif arch == "gptj":
        m = GPTJForCausalLM(GPTJConfig(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4, n_positions=256, rotary_dim=8, bos_token_id=0, eos_token_id=0))
    elif arch == "gpt_neox":
        m = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256, bos_token_id=0, eos_token_id=0))
    elif arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    else:
        raise ValueError(arch)
    return m.to(dtype).eval()


def hparams(m, **changes):
    import memit_fast

    return memit_fast.presets.for_model(m).replace(**({"layers": [2, 3], "v_num_grad_steps": 6, "mom2_update_weight": 10.0} | changes))


REQUESTS = [
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": {"str": "baseball"}},
    {"prompt": "The capital of {} is", "subject": "France", "target_new": {"str": "Rome city"}},
    {"prompt": "{}, which is located in", "subject": "Eiffel Tower", "target_new": {"str": "Berlin"}},
]
TEMPLATES = [["{}"], ["A day. {}", "Yes, it was there. {}"]]


def stats(m, hp, n_lines: int = 80):
    import memit_fast

    return memit_fast.compute_stats(m, tokenizer(), hp, corpus=corpus_lines(n_lines), use_cache=False, progress=False)
