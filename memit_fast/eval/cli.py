"""`memit-fast eval`: edit the first N records of a data file, print before/after, write JSON.

Wiring into the main CLI:  p = subparsers.add_parser("eval"); add_arguments(p);
p.set_defaults(func=run)  ->  exit code run(args). Standalone: `python -m memit_fast.eval ...`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys

import torch

from .report import markdown_report, write_json
from .run import KINDS, load_records, run_evaluation

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default=None, help="Hugging Face model directory (default: the default model)")
    a("--model-gguf", default=None, metavar="PATH", help="load this GGUF file instead of --model")
    a("--data", required=True, metavar="FILE", help="CounterFact or zsRE (zsre_mem_eval) JSON file")
    a("--kind", choices=(*KINDS, "auto"), default="auto", help="record format (default: from the keys)")
    a("--edits", type=int, default=None, metavar="N", help="use the first N records (default: all)")
    a("--batch-size", type=int, default=64, metavar="B", help="(prompt, target) pairs per forward")
    a("--edit-batch", type=int, default=None, metavar="E", help="edit in batches of E (default: all N)")
    a("--sequential", action="store_true", help="apply the edit batches one after another, then evaluate")
    a("--no-edit", action="store_true", help="evaluate the unedited model only")
    a("--hparams", default=None, metavar="JSON", help="MEMIT hyper-parameters in the original format (default: the model's preset)")
    a("--n-samples", type=int, default=None, help="statistics documents (default: the hyper-parameters' mom2_n_samples)")
    a("--corpus", default=None, help="statistics corpus passed to memit_fast.apply (text file, or 'model')")
    a("--cache-dir", default=None, help="statistics cache directory passed to memit_fast.apply")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    a("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default: as loaded)")
    a("--no-fluency", action="store_true", help="skip generation and n-gram entropy (CounterFact)")
    a("--gen-length", type=int, default=100, metavar="T", help="tokens per generated text with its prompt")
    a("--seed", type=int, default=0, help="seed of the fluency sampling and of the edit")
    a("--out", default=None, metavar="FILE", help="write the results (with per-record values) as JSON")
    a("--markdown", default=None, metavar="FILE", help="write the report as Markdown")


def load_model(model: str | None, model_gguf: str | None, device: str | None, dtype: str | None):
    """(model, tok): a GGUF file, an HF directory, or memit_fast.load_default_model()."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = DTYPES[dtype] if dtype else None
    if model is None and model_gguf is None:
        from memit_fast import load_default_model

        return load_default_model(device=device, dtype=dt)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_gguf:
        kw = dict(gguf_file=os.path.basename(model_gguf))
        model = os.path.dirname(os.path.abspath(model_gguf))
    else:
        kw = {}
    tok = AutoTokenizer.from_pretrained(model, **kw)
    lm = AutoModelForCausalLM.from_pretrained(model, **kw).to(device=device, dtype=dt)
    return lm.eval(), tok


def _commit() -> str | None:
    """Short commit of this checkout, with "-dirty" when the package's tracked files have changes."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # memit_fast/
    try:
        def git(*a):
            return subprocess.run(["git", "-C", here, *a], capture_output=True, text=True).stdout.strip()

        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "-uno", "--", here)
    except OSError:
        return None
    return (head + ("-dirty" if dirty else "")) or None


def _meta(args, model, kind: str, load_at_start: float) -> dict:
    import transformers

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = (
            f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"load average {load_at_start:.1f} at start)"
        )
    return {
        "model": args.model_gguf or args.model or "default (memit_fast.load_default_model)",
        "data": args.data,
        "device": name,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "fluency": "off" if args.no_fluency or kind != "counterfact" else f"{args.gen_length} tokens per text",
        "seed": args.seed,
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}",
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run(args) -> int:
    records = load_records(args.data)
    if args.edits is not None:
        records = records[: args.edits]
    if not records:
        print("no records to evaluate", file=sys.stderr)
        return 2
    model, tok = load_model(args.model, args.model_gguf, args.device, args.dtype)
    load_at_start = os.getloadavg()[0]
    opts = {k: v for k, v in (("corpus", args.corpus), ("cache_dir", args.cache_dir)) if v is not None}
    from memit_fast import MEMITHyperParams, presets

    hparams = MEMITHyperParams.from_json(args.hparams) if args.hparams else presets.for_model(model)
    if args.n_samples:
        hparams = hparams.replace(mom2_n_samples=args.n_samples)
    result = run_evaluation(
        model,
        tok,
        records,
        kind=args.kind,
        edit=not args.no_edit,
        edit_batch=args.edit_batch,
        sequential=args.sequential,
        batch_size=args.batch_size,
        fluency=not args.no_fluency,
        gen_length=args.gen_length,
        seed=args.seed,
        hparams=hparams,
        apply_options=opts | {"seed": args.seed},
    )
    result["meta"] = _meta(args, model, result["kind"], load_at_start) | {
        "statistics_corpus": args.corpus or hparams.mom2_dataset,
        "hparams": hparams.to_dict(),
    }
    text = markdown_report(result)
    print(text)
    if args.out:
        write_json(args.out, result)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0
