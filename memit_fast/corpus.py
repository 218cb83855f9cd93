"""Text corpora for the covariance statistics (docs/algorithm.md section 4).

A corpus is given as one of:
  * a path to a UTF-8 text file: one document per non-empty line;
  * a list of strings: one document each;
  * "model": documents sampled from the model itself (seeded), for when no text is at hand;
  * any other string: a HF dataset name ("wikipedia", "wikitext", or "name:config"), loaded with
    the `datasets` package when it is installed and the hub is reachable.
Every corpus has an id that names its content, used in the statistics cache key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from .errors import StatsError

# Configs the original code used for its two dataset names.
_HF_CONFIGS = {"wikipedia": ("wikimedia/wikipedia", "20231101.en"), "wikitext": ("wikitext", "wikitext-103-raw-v1")}


@dataclass
class Corpus:
    texts: list[str]
    id: str


def _digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def is_local(spec) -> bool:
    """A list of strings or a text file: loaded at once, without the model or the network."""
    return isinstance(spec, (list, tuple)) or (isinstance(spec, (str, os.PathLike)) and os.path.isfile(os.path.expanduser(os.fspath(spec))))


_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".raw")


def looks_like_path(spec) -> bool:
    """A string meant as a file, not a dataset name: an os.PathLike, a path starting with / ./ ../
    or ~, a backslash, a file suffix (.txt .json .jsonl .raw), or a parent directory that exists
    (a Hub id "org/name" is not a path unless a directory "org" is here)."""
    if isinstance(spec, os.PathLike):
        return True
    if not isinstance(spec, str) or spec == "model":
        return False
    return (
        spec.startswith(("/", "./", "../", "~"))
        or "\\" in spec
        or spec.lower().endswith(_FILE_SUFFIXES)
        or ("/" in spec and os.path.isdir(os.path.dirname(spec)))
    )


def check_corpus_spec(spec) -> None:
    """Raise StatsError("corpus file not found: ...") for a path-like corpus that is not a file."""
    if looks_like_path(spec) and not os.path.isfile(os.path.expanduser(os.fspath(spec))):
        raise StatsError(f"corpus file not found: {os.fspath(spec)} (a corpus is a text file, a list of strings, 'model' or a dataset name)")


def remote_corpus_id(spec: str, max_length: int, seed: int) -> str:
    """The id of a corpus that is not local ("model" or a dataset name), known before loading it."""
    check_corpus_spec(spec)
    return f"model-sampled-seed{seed}-len{max_length}" if spec == "model" else f"hf-{spec}"


def load_corpus(spec, n_samples: int, *, model=None, tok=None, max_length: int = 128, seed: int = 0, progress: bool = True) -> Corpus:
    """The first `n_samples` documents of `spec` (see the module docstring)."""
    if isinstance(spec, (list, tuple)):
        texts = [t for t in spec if isinstance(t, str) and t.strip()][:n_samples]
        if not texts:
            raise StatsError("the corpus list holds no non-empty strings")
        return Corpus(texts, f"texts-{_digest(texts)}")
    if not isinstance(spec, (str, os.PathLike)):
        raise StatsError(f"corpus must be a path, a list of strings, 'model' or a dataset name, got {type(spec).__name__}")
    check_corpus_spec(spec)
    spec = os.path.expanduser(os.fspath(spec))
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()][:n_samples]
        if not texts:
            raise StatsError(f"corpus file {spec} holds no text")
        return Corpus(texts, f"file-{os.path.basename(spec)}-{_digest(texts)}")
    if spec == "model":
        if model is None or tok is None:
            raise StatsError("corpus 'model' needs the model and tokenizer")
        texts = sample_texts(model, tok, n_samples, max_length, seed=seed, progress=progress)
        return Corpus(texts, remote_corpus_id(spec, max_length, seed))
    return _load_hf_dataset(spec, n_samples)


def _load_hf_dataset(name: str, n_samples: int) -> Corpus:
    path, config = _HF_CONFIGS.get(name, (name.split(":")[0], name.split(":")[1] if ":" in name else None))
    hint = "pass corpus='path/to/text.txt' (one document per line) or corpus='model' (text sampled from the model)"
    try:
        import datasets
    except ImportError:
        raise StatsError(f"corpus {name!r} is a dataset name, but the `datasets` package is not installed; {hint}") from None
    try:
        ds = datasets.load_dataset(path, config, split="train", streaming=True)
        texts = []
        for row in ds:
            if row.get("text", "").strip():
                texts.append(row["text"])
            if len(texts) >= n_samples:
                break
    except Exception as e:
        raise StatsError(f"cannot load dataset {name!r} ({type(e).__name__}: {e}); {hint}") from None
    return Corpus(texts, remote_corpus_id(name, 0, 0))


# A neutral set of first words for sampling documents from a model.
_STARTS = ("The", "In", "A", "It", "He", "She", "This", "On", "After", "During", "Many", "When", "His", "Her", "According", "There")


@torch.no_grad()
def sample_texts(model, tok, n: int, length: int, *, seed: int = 0, batch_size: int = 128, progress: bool = True,
                 starts: tuple[str, ...] = _STARTS, top_k: int = 50) -> list[str]:
    """n documents of `length` tokens (the start word's included) sampled from the model
    (temperature 1, top-k), starting from starts[i % len(starts)]; document i is seeded with
    (seed, i), so the batch size does not change the text."""
    from tqdm.auto import tqdm

    from .model_access import cache_arg, model_device, returned_cache

    device = model_device(model)
    texts: list[str] = []
    bar = tqdm(total=n, desc="sampling corpus from the model", disable=not progress, unit="doc")
    while len(texts) < n:
        b = min(batch_size, n - len(texts))
        docs = range(len(texts), len(texts) + b)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in docs]  # per document: batching does not matter
        ids = [tok(starts[i % len(starts)])["input_ids"] for i in docs]
        width = max(map(len, ids))
        # Left-pad the (one or two token) starts so every row continues at the same column.
        input_ids = torch.tensor([[ids[0][0]] * (width - len(r)) + r for r in ids], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device)
        past, cur, out = None, input_ids, [input_ids]
        for _ in range(length - min(map(len, ids))):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -cur.shape[1] :]
            res = model(input_ids=cur, attention_mask=mask, position_ids=positions, use_cache=True, **cache_arg(model, past))
            past = returned_cache(res)
            probs = res.logits[:, -1].float().softmax(-1)
            top_p, top_i = probs.topk(top_k, dim=-1)
            top_p = top_p.cpu()
            pick = torch.stack([torch.multinomial(top_p[r], 1, generator=g) for r, g in enumerate(gens)]).to(device)
            cur = top_i.gather(-1, pick)
            out.append(cur)
            mask = torch.cat([mask, torch.ones_like(cur)], dim=1)
        rows = torch.cat(out, dim=1)
        for r, m in zip(rows, mask):
            texts.append(tok.decode(r[m.bool()][:length], skip_special_tokens=True).strip())
        bar.update(b)
    bar.close()
    return texts
