"""Inputs for the end-to-end benchmarks: model shapes with random weights, synthetic requests,
fixed context templates, synthetic "cached" statistics, random documents, and a FLOP model of z.

Nothing here reads weights or data from a hub: the models are transformers configs with random
weights (HF's own initialisation run on the target device, or `build_on_devices` for a model
larger than one GPU), the tokenizer is the SmolLM2 one
(49,152 ids, which every model below accepts), requests come from CounterFact records.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

# Real shapes (their published transformers configs) and tiny ones of the same architecture and
# depth (so the published layer ranges apply as they are) for CPU checks.
REAL = {
    "gpt-j-6b": ("GPTJConfig", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048)),
    "gpt2-xl": ("GPT2Config", dict(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024)),
    "llama-3-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                                       rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
TINY = {
    "gpt-j-6b": dict(n_embd=64, n_head=4, rotary_dim=8),
    "gpt2-xl": dict(n_embd=64, n_head=4),
    "llama-3-8b": dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2),
}
MODELS = list(REAL)

# The original's template set is ["{}"] + 5 samples of 10 tokens from the model (docs/algorithm.md section 1).
# A random-weight model samples noise, so the benchmarks use 5 fixed prefixes of about that length
# (the sampling itself is timed separately by the profiler).
TEMPLATES = [
    ["{}"],
    [
        "The following is a list of the most important. {}",
        "Therefore, it is important to understand the role of. {}",
        "Because of the high demand for the product, the. {}",
        "I have been working on this project for a. {}",
        "You can find out more about the history of. {}",
    ],
]


def z_attention(model) -> str:
    """Which attention z's steps run over their cached prefix on this model, for the records."""
    from memit_fast.layouts import fused
    from memit_fast.layouts.base import prefix_kernel

    p = next(model.parameters())
    if fused.use_fused():
        return "compiled (layouts/fused.py)"
    return "triton (kernels/prefix_attention.py)" if prefix_kernel(p.device, p.dtype) else "eager"


def make_config(name: str, tiny: bool = False):
    import transformers

    cls_name, kw = REAL[name]
    kw = dict(kw, **(TINY[name] if tiny else {}))
    return getattr(transformers, cls_name)(**kw)


def build_model(name: str, *, tiny: bool = False, device=None, dtype=None, seed: int = 0):
    """(model, seconds to build): the config's architecture with random weights made on `device`.

    HF's own initialisation (normal(0, initializer_range), norms at one) runs on the device under
    a `torch.device` context: no CPU copy of the weights, a few seconds for 8B parameters."""
    import time

    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(make_config(name, tiny), dtype=dtype)
    model.eval().requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - t0


def build_on_devices(config, device_map: dict, *, dtype=torch.bfloat16, seed: int = 0):
    """(model, seconds): `config`'s architecture with random weights made where `device_map`
    (module name -> GPU index or device, e.g. memit_fast.distributed.balanced_device_map's) puts
    each parameter, never on the CPU first: the model is built on the meta device (accelerate's
    init_empty_weights), then each parameter is made on its device in `dtype` and filled there
    (matrices normal(0, initializer_range), biases zero, other vectors one: norms), tied weights
    are tied again and accelerate's hooks attached (dispatch_model, as from_pretrained does).
    Seeded per parameter."""
    import time

    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real, on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    seeds = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()):
        device = _device_of(name, device_map)
        value = torch.empty(p.shape, dtype=dtype, device=device)
        if p.dim() >= 2:
            g = torch.Generator(device).manual_seed(int(torch.randint(1 << 62, (1,), generator=seeds)))
            value.normal_(0.0, config.initializer_range, generator=g)
        else:
            value.fill_(0.0 if name.endswith("bias") else 1.0)
        set_module_tensor_to_device(model, name, device, value=value)
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"left on the meta device: {left[:5]}")
    skip = getattr(model, "_skip_keys_device_placement", None)  # as from_pretrained(device_map=...): the KV cache is not moved
    model = dispatch_model(model.eval(), device_map=device_map, skip_keys=sorted(skip) if skip else None)
    model.requires_grad_(False)
    for device in {_device_of(n, device_map) for n, _ in model.named_parameters()}:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return model, time.perf_counter() - t0


def _device_of(name: str, device_map: dict) -> torch.device:
    """The device of parameter `name` in `device_map`: that of its longest module prefix ("" is the root)."""
    key = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if key is None:
        raise KeyError(f"{name} is in no module of the device map")
    where = device_map[key]
    return torch.device("cuda", where) if isinstance(where, int) else torch.device(where)


REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIRS = [REPO / ".device" / "tokenizer", Path("/work/main/.device/tokenizer")]
DATA_FILES = [REPO / ".device" / "data" / "counterfact_250.json", REPO / "shared" / "data" / "counterfact_250.json",
              REPO.parent / "shared" / "data" / "counterfact_250.json", Path("/work/shared/data/counterfact_250.json")]

# Used only when no CounterFact file is found (a CI clone without shared/): CounterFact-style records.
BUILTIN_RECORDS = [
    {"prompt": "{} is located in", "subject": "Angola", "target_new": {"str": "Antarctica"}},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": {"str": "English"}},
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": {"str": "baseball"}},
    {"prompt": "{}, which is located in", "subject": "Autonomous University of Madrid", "target_new": {"str": "Sweden"}},
    {"prompt": "{} is a product of", "subject": "Toko Yasuda", "target_new": {"str": "Nokia"}},
    {"prompt": "The official religion of {} is", "subject": "Edwin of Northumbria", "target_new": {"str": "Islam"}},
    {"prompt": "{} was developed by", "subject": "Apple A5", "target_new": {"str": "Google"}},
    {"prompt": "{}'s profession is an", "subject": "Giuseppe Angeli", "target_new": {"str": "architect"}},
    {"prompt": "{} was born in", "subject": "Pierre Curie", "target_new": {"str": "Tokyo"}},
    {"prompt": "The headquarter of {} is in", "subject": "Chevrolet", "target_new": {"str": "Mumbai"}},
    {"prompt": "{} is a citizen of", "subject": "Ferdinand Tonnies", "target_new": {"str": "Argentina"}},
    {"prompt": "{} speaks the language", "subject": "Jacques Chirac", "target_new": {"str": "Russian"}},
]


def first_existing(paths) -> Path | None:
    for p in paths:
        if p and Path(p).exists():
            return Path(p)
    return None


def load_tokenizer(path=None, *, fallback_ok: bool = False):
    """The SmolLM2 tokenizer at `path` (default .device/tokenizer); with fallback_ok and none found,
    a small byte-level BPE trained here on CounterFact-style text (CI smoke runs only)."""
    from transformers import AutoTokenizer

    found = first_existing([path] if path else TOKENIZER_DIRS)
    if found is not None and ((found / "tokenizer.json").exists() or (found / "tokenizer_config.json").exists()):
        return AutoTokenizer.from_pretrained(str(found))
    if not fallback_ok:
        raise FileNotFoundError(f"no tokenizer at {path or TOKENIZER_DIRS[0]} (expected the SmolLM2 tokenizer in HF format, e.g. .device/tokenizer)")
    return fallback_tokenizer()


def fallback_tokenizer(vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r["prompt"].replace("{}", r["subject"]) + " " + r["target_new"]["str"] for r in BUILTIN_RECORDS]
    texts += [t for group in TEMPLATES for t in group] * 4
    t = Tokenizer(models.BPE(unk_token=None))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def load_records(path=None, *, fallback_ok: bool = False) -> list[dict]:
    """CounterFact `requested_rewrite` dicts from `path` (default: the first of DATA_FILES found)."""
    found = first_existing([path] if path else DATA_FILES)
    if found is None:
        if fallback_ok:
            return list(BUILTIN_RECORDS)
        raise FileNotFoundError(f"no CounterFact file at {path or DATA_FILES[0]} (copy /work/shared/data/counterfact_250.json to .device/data/)")
    records = json.loads(found.read_text())
    return [r["requested_rewrite"] if "requested_rewrite" in r else r for r in records]


def make_requests(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n requests with distinct subjects: the first len(records) are the records as they are;
    later ones keep a record's prompt and target and prefix its subject with the first word of
    another record's subject ("Danielle Angola"), about one token longer than a real subject.
    Distinct subjects mean no two requests share (prompt, subject): no conflicting pair."""
    rng = random.Random(seed)
    out, seen = [], set()
    m = len(records)
    for i in range(n):
        r = records[i % m]
        subject = r["subject"]
        tries = 0
        while subject in seen:  # another record's first word (seeded); after 50 misses, two of them
            pick = lambda: records[(i % m + 1 + rng.randrange(max(m - 1, 1))) % m]["subject"].split()[0]  # noqa: E731
            subject = f"{pick()} {r['subject']}" if tries < 50 else f"{pick()} {pick()} {r['subject']}"
            tries += 1
        seen.add(subject)
        out.append({"prompt": r["prompt"], "subject": subject, "target_new": {"str": r["target_new"]["str"]}})
    return out


def request_lengths(tok, requests: list[dict]) -> dict:
    """Mean token counts of the bare prompt (subject filled in), subject and target: to show they are realistic."""
    def mean(xs):
        return round(sum(xs) / max(len(xs), 1), 2)

    sample = requests[:: max(1, len(requests) // 500)]
    return {
        "prompt_tokens": mean([len(tok(r["prompt"].replace("{}", r["subject"]))["input_ids"]) for r in sample]),
        "subject_tokens": mean([len(tok(r["subject"])["input_ids"]) for r in sample]),
        "target_tokens": mean([len(tok(" " + r["target_new"]["str"], add_special_tokens=False)["input_ids"]) for r in sample]),
    }


@torch.no_grad()
def key_scales(model, hparams, tokens: int = 2048, seed: int = 0) -> dict[int, float]:
    """Mean of k^2 over the entries of each critical layer's keys, from one forward pass over random tokens."""
    from memit_fast.layouts import layout_for
    from memit_fast.model_access import model_device

    device = model_device(model)
    g = torch.Generator().manual_seed(seed)
    width = min(256, tokens)
    ids = torch.randint(100, 49000, (max(1, tokens // width), width), generator=g).to(device)
    scales: dict[int, float] = {}

    def read(layer, keys):
        scales[layer] = float(keys.float().pow(2).mean())

    layout_for(model, hparams).mlp_keys(ids, torch.ones_like(ids), hparams.layers, read)
    return scales


@torch.no_grad()
def synthetic_stats(model, hparams, seed: int = 0) -> dict:
    """{layer: LayerStats(C, count)} standing for cached statistics: C = s_l * X^T X / M + 1e-4 s_l I,
    X (M = 2 d_ff, d_ff) standard normal in float32 on the model's device, s_l the mean k^2 of
    the layer's keys (`key_scales`), so lambda*C and K K^T compare as with real statistics.
    float32, (d_ff, d_ff), as compute_stats returns them; the spectrum is well conditioned."""
    from memit_fast.model_access import get_module, in_features, model_device
    from memit_fast.cache import LayerStats

    device = model_device(model)
    d = in_features(get_module(model, hparams.rewrite_module_tmp.format(hparams.layers[0])))
    g = torch.Generator(device=device).manual_seed(seed)
    m = 2 * d
    x = torch.randn(m, d, device=device, generator=g)
    base = torch.addmm(torch.eye(d, device=device), x.T, x, beta=1e-4, alpha=1.0 / m)  # X^T X / M + 1e-4 I
    del x
    scales = key_scales(model, hparams)
    return {layer: LayerStats(base * scales[layer], 100_000) for layer in hparams.layers}


def random_documents(tok, n_tokens: int, *, max_length: int, mean_length: float = 440.0, fixed_length: int | None = None, seed: int = 0) -> list[str]:
    """Documents of random token ids, decoded, about n_tokens in all (before re-tokenisation).

    Lengths: `fixed_length`, else log-normal (sigma 1) with mu set so that the mean after
    clipping to [16, max_length] is `mean_length` (Wikipedia in the original: 44M tokens over
    100,000 documents cut to GPT-J's 2048, i.e. about 440)."""
    rng = random.Random(seed)
    if fixed_length:
        lengths = [fixed_length] * max(1, n_tokens // fixed_length)
    else:
        mu = _lognormal_mu(mean_length, max_length)
        lengths, total = [], 0
        while total < n_tokens:
            n = int(min(max(rng.lognormvariate(mu, 1.0), 16), max_length))
            lengths.append(n)
            total += n
    vocab = min(len(tok), 49152)
    return [tok.decode([rng.randrange(200, vocab) for _ in range(n)]) for n in lengths]


def _lognormal_mu(mean: float, cap: int) -> float:
    """mu of a log-normal (sigma 1) whose mean after clipping to [16, cap] is `mean` (bisection, seeded Monte Carlo)."""
    rng = random.Random(1)
    z = [rng.gauss(0, 1) for _ in range(20000)]
    lo, hi = 0.0, math.log(cap) + 2
    for _ in range(40):
        mid = (lo + hi) / 2
        m = sum(min(max(math.exp(mid + s), 16), cap) for s in z) / len(z)
        lo, hi = (mid, hi) if m < mean else (lo, mid)
    return (lo + hi) / 2


# ---- a FLOP model of z (matrix products only) ----

@dataclass
class ZWork:
    flops: float  # forward + backward (input gradients only) over the steps, matrix products only
    suffix_tokens: int  # unpadded tokens per step summed over requests (rows from the subject's last token on)
    head_positions: int


def block_matmul_params(model, hparams) -> int:
    """Weights in matrix products of one block (layer L+1), e.g. 4 d^2 + 2 d d_ff for GPT-J."""
    from memit_fast.model_access import get_module

    block = get_module(model, hparams.layer_module_tmp.format(min(hparams.layers[-1] + 1, hparams.v_loss_layer)))
    return sum(p.numel() for p in block.parameters() if p.dim() == 2)


def z_work(model, tok, requests, hparams, templates, steps: int | None = None) -> ZWork:
    """The work the fast z must do at the least (docs/algorithm.md section 6): per step, blocks
    L+1..v_loss_layer over each row's positions from the subject's last token on, forward and
    input-gradient backward (2 + 2 flops per weight and token), plus the vocabulary projection
    at the target positions and the KL position (forward and backward); the KL row counts only
    where the bare row cannot stand in for it (targets.py shortcut 5). Attention scores and
    element-wise work are left out. Every request runs all `steps` (default v_num_grad_steps):
    random weights never reach the early-stop loss."""
    from memit_fast.edit_requests import normalize_requests
    from memit_fast.model_access import hidden_size
    from memit_fast.targets import build_rows
    from memit_fast.templates import flatten
    from memit_fast.tokens import encode_requests

    steps = steps or hparams.v_num_grad_steps
    flat = flatten(templates)
    suffix = head = 0
    for enc in encode_requests(tok, normalize_requests(requests), flat, hparams.fact_token):
        rows = build_rows(enc)
        run = len(rows.ids) - rows.kl_in_bare  # the KL row is not run when the bare row holds it
        suffix += sum(len(ids) - s for ids, s in zip(rows.ids[:run], rows.lookup))
        head += len(flat) * len(rows.target) + 1
    layers = hparams.v_loss_layer - hparams.layers[-1]
    d, vocab = hidden_size(model), model.config.vocab_size
    per_step = 4 * suffix * layers * block_matmul_params(model, hparams) + 4 * head * d * vocab
    return ZWork(per_step * steps, suffix, head)
