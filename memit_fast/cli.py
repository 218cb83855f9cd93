"""The `memit-fast` command (also `python -m memit_fast`): demo, stats, edit, eval, trace, info.

Every command that loads a model takes the same common options (`add_common`) and loads through
one loader (`ModelSpec`). Inputs and outputs are checked before any model work. A user error
(a missing or malformed file, a bad argument, any MemitError) prints one line
`memit-fast: error: ...` and exits with code 2 (`--debug` adds the traceback); a traceback
without --debug is a bug. Progress goes to stderr through the logger "memit_fast".

Several processes: `torchrun --nproc-per-node N -m memit_fast edit|stats|eval ...` runs data
parallel (memit_fast.distributed; one GPU per rank); rank 0 alone prints the results and writes
--out. eval: the edit is data parallel; every rank evaluates all records on its identical weights.

Benchmarks run from a checkout: `python -m benchmarks.profile_edits` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from .errors import MemitError

PROG = "memit-fast"
DTYPES = ("float32", "bfloat16", "float16", "float64")
log = logging.getLogger(__name__)

DEMO_FACTS = [
    {
        "request": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}},
        "paraphrase": "The Eiffel Tower, which towers over the river Seine, is in the city of",
        "neighbour": "The Louvre is located in the city of",
    },
    {
        "request": {"prompt": "The capital of {} is", "subject": "Japan", "target_new": {"str": "Kyoto"}},
        "paraphrase": "Japan's capital city is",
        "neighbour": "The capital of France is",
    },
    {
        "request": {"prompt": "{} is famous for the theory of", "subject": "Albert Einstein", "target_new": {"str": "evolution"}},
        "paraphrase": "Albert Einstein is best known for his theory of",
        "neighbour": "Isaac Newton is famous for the theory of",
    },
]


class UsageError(Exception):
    """A user error found by the command line itself (arguments, files): one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as UsageError, so they print as one line."""

    def error(self, message: str):
        raise UsageError(message)


# --- argument types --------------------------------------------------------------------------


def positive_gib(text: str) -> float:
    """argparse type: a finite number of GiB > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (leave the option out for no limit)")
    return value


def layer_list(text: str) -> list[int]:
    """argparse type: comma-separated layer indices."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices") from None


# --- common options and the one loader -------------------------------------------------------


def add_common(p: argparse.ArgumentParser, *, outputs: bool = False) -> None:
    """The options every model command takes, with the same names and meanings."""
    a = p.add_argument
    a("--model", metavar="DIR", help="Hugging Face model directory (default: SmolLM2-135M, the default model)")
    a("--model-gguf", metavar="FILE", help="load this GGUF file instead of --model")
    a("--hparams", metavar="JSON", help="MEMIT hyper-parameters in the original JSON format (default: the model's preset)")
    a("--corpus", help="statistics corpus: a text file (one document per line), 'model' (text sampled from the model), "
      "or a dataset name (needs the datasets package and the hub) (default: the hyper-parameters' mom2_dataset)")
    a("--n-samples", type=positive_int, metavar="N", help="statistics documents (default: the hyper-parameters' mom2_n_samples)")
    a("--cache-dir", metavar="DIR", help="statistics cache (default: $MEMIT_FAST_CACHE or ~/.cache/memit_fast)")
    a("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    a("--dtype", choices=DTYPES, help="model dtype (default: as stored)")
    a("--split-gpus", type=positive_int, metavar="N", help="split the model's layers over the first N GPUs of this process, "
      "in order (a model larger than one GPU; --model only)")
    a("--seed", type=int, default=0, help="seed of the context templates, of a corpus sampled from the model and of sampled texts (default: 0)")
    a("--quiet", action="store_true", help="no progress bars and no progress messages (transformers' too)")
    a("--debug", action="store_true", help="show the traceback of an error")
    if outputs:
        a("--overwrite", action="store_true", help="replace an existing --out directory")


@dataclass
class ModelSpec:
    """What to load, checked before anything is loaded (`model_spec`)."""

    model: str | None
    gguf: str | None
    device: str
    dtype: str | None
    hparams: object  # a MEMITHyperParams read from --hparams, or None for the model's preset
    n_samples: int | None
    quiet: bool
    split_gpus: int | None = None

    def load(self):
        """(model in eval mode on the device, tokenizer, hyper-parameters)."""
        import torch

        if self.quiet:
            import transformers

            transformers.utils.logging.disable_progress_bar()
            transformers.utils.logging.set_verbosity_error()
        dtype = getattr(torch, self.dtype) if self.dtype else None
        if self.model is None and self.gguf is None:
            from .default_model import load_default_model

            log.info("loading the default model (SmolLM2-135M) on %s", self.device)
            model, tok = load_default_model(device=self.device, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path, kw = self.model, {}
            if self.gguf:
                path, kw = os.path.dirname(os.path.abspath(self.gguf)), {"gguf_file": os.path.basename(self.gguf)}
            where = f"{self.split_gpus} GPUs" if self.split_gpus else self.device
            log.info("loading %s on %s", self.gguf or self.model, where)
            try:
                tok = AutoTokenizer.from_pretrained(path, **kw)
                if self.split_gpus:
                    from transformers import AutoConfig

                    from .distributed import balanced_device_map

                    kw["device_map"] = balanced_device_map(AutoConfig.from_pretrained(path), self.split_gpus)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or ("auto" if not self.gguf else torch.float32), **kw)
            except (OSError, ValueError, ImportError) as e:
                raise UsageError(f"cannot load the model from {self.gguf or self.model}: {e}") from e
            model = (model if self.split_gpus else model.to(self.device)).eval()
        from .presets import for_model

        hp = self.hparams or for_model(model)
        if self.n_samples:
            hp = hp.replace(mom2_n_samples=self.n_samples)
        return model, tok, hp


def model_spec(args) -> ModelSpec:
    """Check the common options (files exist and parse, device, corpus, cache) without loading anything."""
    import torch

    if args.model and args.model_gguf:
        raise UsageError("give --model or --model-gguf, not both")
    if args.model:
        if not os.path.isdir(args.model):
            raise UsageError(f"model directory not found: {args.model}" + (" (it is a file)" if os.path.isfile(args.model) else ""))
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise UsageError(f"{args.model} is not a Hugging Face model directory (no config.json)")
    if args.model_gguf and not os.path.isfile(args.model_gguf):
        raise UsageError(f"GGUF file not found: {args.model_gguf}")
    hparams = None
    if args.hparams:
        from .hparams import MEMITHyperParams

        data = read_json(args.hparams, "hyper-parameters file")
        if not isinstance(data, dict):
            raise UsageError(f"hyper-parameters file {args.hparams} must hold a JSON object, not {type(data).__name__}")
        hparams = MEMITHyperParams.from_dict(data)
    try:
        device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    from .distributed import local_device

    device = local_device(device)  # under torchrun: "cuda" is this rank's GPU
    if args.split_gpus:
        if not args.model:
            raise UsageError("--split-gpus needs --model (a Hugging Face model directory)")
        if torch.cuda.device_count() < args.split_gpus:
            raise UsageError(f"--split-gpus {args.split_gpus}: {torch.cuda.device_count()} CUDA device(s) are available")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--split-gpus runs in one process, not under torchrun")
    check_corpus(args.corpus)
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise UsageError(f"--cache-dir {args.cache_dir} exists and is not a directory")
    return ModelSpec(args.model, args.model_gguf, str(device), args.dtype, hparams, args.n_samples, args.quiet, args.split_gpus)


def check_corpus(spec: str | None) -> None:
    """A corpus that is a file must exist; a dataset name needs the datasets package."""
    if spec is None or spec == "model" or os.path.isfile(spec):
        return
    if os.path.isdir(spec):
        raise UsageError(f"--corpus {spec} is a directory; give a text file with one document per line")
    if Path(spec).suffix or spec.startswith(("/", ".", "~")):
        raise UsageError(f"corpus file not found: {spec}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise UsageError(
            f"--corpus {spec!r} is neither a file nor 'model', and a dataset name needs the datasets package "
            "(pip install 'memit_fast[datasets]')"
        ) from None


def read_json(path: str, what: str):
    """The parsed JSON file `path`; a missing or malformed file is a UsageError naming `what`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid JSON ({e})") from None


def check_out(path: str, overwrite: bool) -> None:
    """--out: a directory that does not exist yet, is empty, or may be replaced (--overwrite)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {p} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise UsageError(f"--out {p} already exists and is not empty; pass --overwrite to replace it")
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {p}: cannot write in {parent}")


@contextlib.contextmanager
def output_dir(path: str):
    """Yields a fresh directory beside `path`; on success it replaces `path` in one rename (an
    existing `path` is moved aside first and removed after), on failure it is removed."""
    out = Path(path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_requests(path: str) -> list:
    """Requests or CounterFact records from a JSON file, checked (memit_fast.edit_requests)."""
    from .edit_requests import normalize_requests

    data = read_json(path, "requests file")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UsageError(f"requests file {path} must hold a JSON list of requests, not {type(data).__name__}")
    if data and isinstance(data[0], dict) and "src" in data[0] and "answers" in data[0]:
        raise UsageError(f"requests file {path} holds zsRE records: memit-fast edit takes requests or CounterFact records "
                         "(memit-fast eval --data takes zsRE)")
    normalize_requests(data)
    return data


# --- commands --------------------------------------------------------------------------------


def _next_token(model, tok, prompt: str, target: str) -> tuple[str, float, float]:
    """(top-1 next token, its probability, probability of the first token of " " + target)."""
    import torch

    from .model_access import model_device
    from .tokens import encode_target

    with torch.no_grad():
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(model_device(model))
        probs = model(input_ids=ids).logits[0, -1].float().softmax(-1)
    p, i = probs.max(-1)
    return tok.decode(int(i)), float(p), float(probs[encode_target(tok, " " + target)[0]])


def _settings(args) -> dict:
    """apply's run settings (memit_fast.config.EditConfig fields) from the common options."""
    settings = {"corpus": args.corpus, "cache_dir": args.cache_dir, "seed": args.seed, "progress": not args.quiet}
    if getattr(args, "memory_cap_gib", None) is not None:
        settings["memory_cap_gib"] = args.memory_cap_gib
    return settings


def cmd_demo(args) -> int:
    from .api import apply, restore

    model, tok, hp = model_spec(args).load()
    rows = []
    for fact in DEMO_FACTS:
        req = fact["request"]
        target = req["target_new"]["str"]
        for kind, prompt in (("prompt", req["prompt"].replace("{}", req["subject"])), ("paraphrase", fact["paraphrase"]), ("neighbour", fact["neighbour"])):
            rows.append((target, kind, prompt, _next_token(model, tok, prompt, target)))
    start = time.perf_counter()
    _, orig = apply(model, tok, [f["request"] for f in DEMO_FACTS], hp, return_orig_weights=True, **_settings(args))
    seconds = time.perf_counter() - start
    print(f"\nEdited {len(DEMO_FACTS)} facts into {model.config.model_type} layers {hp.layers} in {seconds:.1f} s "
          f"(statistics included when not cached).\n")
    print(f"{'new target':11s} {'prompt kind':11s} {'top-1 before':>19s} {'top-1 after':>19s} {'P(new) before -> after':>23s}  prompt")
    for target, kind, prompt, (before, p_before, new_before) in rows:
        after, p_after, new_after = _next_token(model, tok, prompt, target)
        print(f"{target:11s} {kind:11s} {before!r:>13s} {p_before:5.2f} {after!r:>13s} {p_after:5.2f} {new_before:10.3f} -> {new_after:5.3f}  {prompt}")
    if args.restore:
        restore(model, orig)
    return 0


def cmd_stats(args) -> int:
    from .stats import compute_stats

    spec = model_spec(args)
    model, tok, hp = spec.load()
    cache = args.cache_dir or _default_cache()
    if args.import_path:
        from .stats_npz import import_npz

        written = import_npz(args.import_path, model, hp, layers=args.layers, corpus=args.corpus, cache_dir=cache)
        for layer, path in sorted(written.items()):
            print(f"layer {layer}: imported into {path}")
        return 0
    start = time.perf_counter()
    stats = compute_stats(model, tok, hp, args.layers, corpus=args.corpus, max_length=args.max_length, cache_dir=cache,
                          seed=args.seed, progress=not args.quiet)  # fmt: skip
    if _rank() != 0:
        return 0
    print(f"statistics for layers {sorted(stats)} in {time.perf_counter() - start:.1f} s, cache: {cache}")
    for layer, s in stats.items():
        print(f"layer {layer}: {s.count} tokens, C {tuple(s.mom2.shape)} {s.mom2.dtype}, trace {float(s.mom2.diagonal().sum()):.4g}")
    if args.export:
        from .stats_npz import export_npz

        for layer, path in sorted(export_npz(args.export, model, stats, hp).items()):
            print(f"layer {layer}: exported to {path}")
    return 0


def _rank() -> int:
    from .distributed import rank

    return rank()


def _default_cache() -> Path:
    from .config import env_setting

    return env_setting("MEMIT_FAST_CACHE")


def cmd_edit(args) -> int:
    from .api import apply

    requests = read_requests(args.requests)
    if args.limit is not None:
        if args.limit > len(requests):
            log.info("--limit %d: the file holds %d requests, all are used", args.limit, len(requests))
        requests = requests[: args.limit]
    check_out(args.out, args.overwrite)
    model, tok, hp = model_spec(args).load()
    start = time.perf_counter()
    _, orig = apply(model, tok, requests, hp, return_orig_weights=True, mode=args.mode, **_settings(args))
    if _rank() != 0:
        return 0
    print(f"edited {len(requests)} facts into layers {hp.layers} in {time.perf_counter() - start:.1f} s")
    with output_dir(args.out) as tmp:
        save_edit(tmp, args.save, model, tok, orig, hp, requests)
    print(f"saved the {dict(edits='edit', peft='PEFT adapter', model='edited model')[args.save]} to {args.out}")
    return 0


def save_edit(out: Path, save: str, model, tok, orig: dict, hp, requests: list) -> None:
    """Write the edit into the directory `out`: `edits`, the edit as an artifact (exact low-rank
    factors, or dense past break-even, with the base model's fingerprint, the hyper-parameters
    and the requests; `memit_fast.load_edits` / `apply_edits` read it); `peft`, the same as a PEFT
    LoRA adapter; `model`, the whole edited model."""
    if save == "model":
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return
    from .artifacts import save_edits

    save_edits(out, model, orig, hparams=hp, requests=requests, format="peft" if save == "peft" else "memit_fast")


def cmd_trace(args) -> int:
    """Causal tracing of facts (memit_fast.trace): trace.json, figures, and with --suggest a
    hyper-parameters file whose layers are the band of MLP layers with the largest effect."""
    from .errors import RequestError
    from .trace import causal_trace, read_facts, suggest_layers

    data = read_json(args.data, "facts file")
    try:
        facts = read_facts(data)
    except RequestError as e:
        raise UsageError(f"facts file {args.data}: {e}") from None
    if not facts:
        raise UsageError(f"facts file {args.data} holds no facts")
    for name in ("noise", "noise_std", "max_seconds"):
        value = getattr(args, name)
        if value is not None and not (value > 0 or (name == "noise" and value == 0)):
            raise UsageError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'noise' else '> 0'}, got {value}")
    if args.fact_plots < 0:
        raise UsageError(f"--fact-plots must be >= 0, got {args.fact_plots}")
    facts = facts[: args.limit] if args.limit else facts
    check_out(args.out, args.overwrite)
    if not args.no_plots:
        from .trace_plot import require_matplotlib

        require_matplotlib()
    model, tok, hp = model_spec(args).load()
    result = causal_trace(model, tok, facts, hp, samples=args.samples, noise=args.noise, noise_std=args.noise_std, window=args.window,
                          answer=args.answer, seed=args.seed, batch_tokens=args.batch_tokens, mode=args.mode,
                          progress=not args.quiet, max_seconds=args.max_seconds)  # fmt: skip
    doc = result.to_dict()
    print(f"traced {len(result.traces)} of {len(facts)} facts in {result.seconds:.1f} s "
          f"({len(result.traces) / max(result.seconds, 1e-9):.3g} facts/s; noise std {result.noise_std:.4g}, {args.samples} samples)")
    for i, reason in result.skipped[:10]:
        print(f"skipped fact {i}: {reason}")
    if len(result.skipped) > 10:
        print(f"... {len(result.skipped) - 10} more skipped (see trace.json)")
    with output_dir(args.out) as tmp:
        if args.suggest and result.traces:
            layers = suggest_layers(result, len(hp.layers))
            doc["summary"]["suggested_layers"], doc["summary"]["preset_layers"] = layers, hp.layers
            (tmp / "hparams.json").write_text(json.dumps(hp.replace(layers=layers).to_dict(), indent=2) + "\n")
            print(f"suggested layers {layers} (the hyper-parameters' {hp.layers}): {args.out}/hparams.json")
        elif args.suggest:
            print("no fact was traced: no layer suggestion")
        (tmp / "trace.json").write_text(json.dumps(doc) + "\n")
        if not args.no_plots and result.traces:
            from .trace_plot import plot_trace

            plot_trace(doc, tmp, args.fact_plots)
    print(f"wrote the trace to {args.out}")
    return 0


def cmd_info(args) -> int:
    """Versions, device, the native module, and the MEMIT_FAST_* settings in effect."""
    import importlib.metadata
    import platform

    import torch

    from . import native
    from .config import ENV, env_setting

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    print(f"memit_fast {__version__}  python {platform.python_version()}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})  transformers {version('transformers')}  triton {version('triton')}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("device: no CUDA device (PyTorch CPU path)")
    print("native: loaded" if native.available() else f"native: not used: {native.why_unavailable()}")
    for name in ENV:
        print(f"{name} = {env_setting(name)}" + ("" if os.environ.get(name, "").strip() else "  (default)"))
    return 0


# --- the parser and the error handling -------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Mass-edit facts in a transformer LM with MEMIT.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="edit a few well-known facts of the default model and show before/after")
    add_common(p)
    p.add_argument("--restore", action="store_true", help="restore the weights at the end")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("stats", help="compute (or load) the covariance statistics of the critical layers")
    add_common(p)
    p.add_argument("--layers", type=layer_list, help="comma-separated layers (default: the hyper-parameters' layers)")
    p.add_argument("--max-length", type=positive_int, help="tokens per document (default: min(context, 1024))")
    p.add_argument("--import", dest="import_path", metavar="PATH",
                   help="read the original code's {module}_{dtype}_mom2_{n}.npz statistics (a file or a folder) into the cache instead of computing")
    p.add_argument("--export", metavar="DIR", help="also write the statistics in the original code's .npz layout under DIR")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("edit", help="apply requests from a JSON file and save the edit in a directory")
    add_common(p, outputs=True)
    p.add_argument("--requests", required=True, metavar="FILE", help="JSON list of requests or CounterFact records")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N requests (default: all)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written when the edit is done, atomically)")
    p.add_argument("--save", choices=["edits", "peft", "model"], default="edits",
                   help="edits: the edit as exact low-rank factors with its base model, hparams and requests (load_edits reads it); "
                        "peft: a PEFT LoRA adapter of the same factors; model: the whole edited model")
    p.add_argument("--memory-cap-gib", type=positive_gib, metavar="GIB", help="GPU memory the edit may hold allocated in all, the model "
                   "included: z runs in smaller chunks, statistics and the key pass's hidden states wait on the CPU (default: no cap)")
    p.add_argument("--mode", choices=["fast", "reference"], default="fast",
                   help="fast: batched; reference: the original's structure, one request at a time (slow)")
    p.set_defaults(func=cmd_edit)

    from .eval import cli as eval_cli

    p = sub.add_parser("eval", help="edit the first N CounterFact or zsRE records and report the metrics before and after")
    eval_cli.add_arguments(p)
    p.set_defaults(func=eval_cli.run)

    p = sub.add_parser("trace", help="causal tracing of known facts: heatmaps, average effects, layer suggestion")
    add_common(p, outputs=True)
    p.add_argument("--data", required=True, metavar="FILE", help="JSON list of known facts (prompt, subject, attribute) or prompt/subject/answer dicts")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N facts (default: all)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory: trace.json, average.png, facts/*.png, hparams.json")
    p.add_argument("--answer", choices=["given", "model"], default="given",
                   help="given: a fact's answer (attribute / answer) must be the model's top-1 prediction, else it is skipped; "
                        "model: trace the model's own prediction (default: given)")
    p.add_argument("--samples", type=positive_int, default=10, help="noise samples per fact (default: 10)")
    p.add_argument("--noise", type=float, default=3.0, help="noise std in units of the subjects' embedding std (default: 3)")
    p.add_argument("--noise-std", type=float, help="noise std as an absolute value (overrides --noise)")
    p.add_argument("--window", type=positive_int, default=10, help="layers restored around each layer for the MLP and attention traces (default: 10)")
    p.add_argument("--mode", choices=["fast", "reference"], default="fast",
                   help="fast: batched restorations; reference: the original structure, one restoration per forward (slow)")
    p.add_argument("--batch-tokens", type=positive_int, metavar="N", help="padded tokens per forward (default: 32768 on CUDA, 4096 on CPU)")
    p.add_argument("--max-seconds", type=float, metavar="S", help="stop tracing after S seconds (the facts left are reported as skipped)")
    p.add_argument("--suggest", action="store_true", help="write hparams.json: the preset with the band of MLP layers of largest effect")
    p.add_argument("--fact-plots", type=int, default=10, metavar="N", help="heatmaps of the first N traced facts (default: 10)")
    p.add_argument("--no-plots", action="store_true", help="no figures (trace.json only)")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("info", help="versions, device, native module, MEMIT_FAST_* settings")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.set_defaults(func=cmd_info)
    return parser


def _setup_logging(quiet: bool) -> None:
    """Messages of the logger "memit_fast" to stderr (warnings only with --quiet)."""
    logger = logging.getLogger("memit_fast")
    for h in [h for h in logger.handlers if getattr(h, "_memit_fast_cli", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler._memit_fast_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _error(e: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(e)
    if isinstance(e, OSError) and e.filename:
        message = f"{e.strerror or e}: {e.filename}"
    else:
        message = " ".join(str(e).split()) or type(e).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _error(e, "--debug" in argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun
    rank = int(os.environ.get("RANK", "0"))
    if launched and args.command not in ("edit", "stats", "eval"):
        return _error(UsageError(f"{args.command} runs in one process; under torchrun only edit, stats and eval run (data parallel)"), args.debug)
    if launched and args.command == "eval" and args.sequential:
        return _error(UsageError("eval --sequential runs in one process (an Editor session is not data parallel); run it without torchrun"), args.debug)
    if launched and rank > 0:
        args.quiet = True  # the progress of rank 0 is enough
    _setup_logging(getattr(args, "quiet", False))
    created = False
    try:
        if launched:
            from . import distributed
            from .config import env_setting

            created = distributed.init_from_env(env_setting("MEMIT_FAST_DIST_TIMEOUT"))
        return args.func(args)
    except (UsageError, MemitError, OSError) as e:
        return _error(e if not launched else _ranked(e, rank), args.debug)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if created:
            distributed.shutdown()


def _ranked(e: BaseException, rank: int) -> BaseException:
    """The error with this process's rank in front (torchrun interleaves the ranks' lines)."""
    return type(e)(f"[rank {rank}] {' '.join(str(e).split())}") if isinstance(e, (UsageError, MemitError)) else e


if __name__ == "__main__":
    sys.exit(main())
