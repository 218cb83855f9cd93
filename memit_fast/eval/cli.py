"""`memit-fast eval`: edit the first N records of a data file, print before/after, and write
results.json (with per-record values) and report.md into the --out directory.

Wiring into the main CLI:  p = subparsers.add_parser("eval"); add_arguments(p);
p.set_defaults(func=run)  ->  exit code run(args). Standalone: `python -m memit_fast.eval ...`.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import subprocess

import torch

from ..cli import UsageError, add_common, check_out, model_spec, output_dir, positive_int, read_json
from .report import markdown_report, write_json
from .run import KINDS, run_evaluation

log = logging.getLogger(__name__)

# Keys each record of a kind needs (fluency also reads CounterFact's generation_prompts).
REQUIRED = {
    "counterfact": ("requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"),
    "zsre": ("src", "subject", "answers", "rephrase", "loc", "loc_ans"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, outputs=True)
    a = parser.add_argument
    a("--data", required=True, metavar="FILE", help="CounterFact or zsRE (zsre_mem_eval) JSON file")
    a("--kind", choices=(*KINDS, "auto"), default="auto", help="record format (default: from the keys)")
    a("--edits", "--limit", dest="edits", type=positive_int, default=None, metavar="N", help="use the first N records (default: all)")
    a("--batch-size", type=positive_int, default=64, metavar="B", help="(prompt, target) pairs per forward")
    a("--edit-batch", type=positive_int, default=None, metavar="E", help="edit in batches of E (default: all N)")
    a("--sequential", action="store_true", help="edit the batches one after another with memit_fast.Editor and evaluate after every "
      "batch: the records edited so far, the first batch, fluency GE (docs/sequential.md); writes curves.png into --out")
    a("--method", type=_methods, default=None, metavar="M[,M]", help="with --sequential: memit, alphaedit or both, comma-separated (default memit)")
    a("--nullspace-threshold", type=float, default=None, metavar="T", help="alphaedit: eigenvalues of C^l below T span the null space (default 2e-2)")
    a("--l2", type=float, default=None, metavar="L", help="alphaedit: the ridge term of the projected solve (default 10)")
    a("--fluency-records", type=positive_int, default=10, metavar="F", help="with --sequential: GE on the first F records' generation prompts")
    a("--no-plot", action="store_true", help="with --sequential: no curves.png (python -m memit_fast.eval.sequential draws it later)")
    a("--no-edit", action="store_true", help="evaluate the unedited model only")
    a("--no-fluency", action="store_true", help="skip generation and n-gram entropy (CounterFact)")
    a("--gen-length", type=positive_int, default=100, metavar="T", help="tokens per generated text with its prompt")
    a("--out", default=None, metavar="DIR", help="write results.json (with per-record values) and report.md into DIR")


def _methods(text: str) -> list[str]:
    """argparse type of --method: a comma-separated list of memit_fast.sequential.METHODS."""
    from ..sequential import METHODS

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in METHODS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more distinct methods of {', '.join(METHODS)}, comma-separated")
    return names


def check_records(path: str, kind: str) -> tuple[list[dict], str]:
    """(records, kind) of a data file: a non-empty JSON list of records that all have the keys of
    `kind` (detected from the first record when "auto")."""
    records = read_json(path, "data file")
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise UsageError(f"data file {path} must hold a non-empty JSON list of records")
    found = next((k for k, keys in REQUIRED.items() if all(key in records[0] for key in keys)), None)
    if kind == "auto":
        if found is None:
            raise UsageError(f"data file {path}: records are neither CounterFact nor zsRE (keys: {sorted(records[0])})")
        kind = found
    elif found is not None and found != kind:
        raise UsageError(f"data file {path} holds {found} records, not {kind}: pass --kind {found} or leave --kind out")
    for i, r in enumerate(records):
        missing = [key for key in REQUIRED[kind] if key not in r]
        if missing:
            raise UsageError(f"data file {path}: record {i} is not a {kind} record (missing {', '.join(missing)})")
    return records, kind


def _commit() -> str | None:
    """MEMIT_FAST_COMMIT when set, else the short commit of this checkout, with "-dirty" when the
    package's tracked files have changes."""
    from ..config import env_setting

    if env_setting("MEMIT_FAST_COMMIT"):
        return env_setting("MEMIT_FAST_COMMIT")
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
    records, kind = check_records(args.data, args.kind)
    if args.edits is not None:
        records = records[: args.edits]
    if not args.sequential and (args.method or args.nullspace_threshold is not None or args.l2 is not None):
        raise UsageError("--method, --nullspace-threshold and --l2 go with --sequential")
    if args.sequential and args.no_edit:
        raise UsageError("--sequential edits: it does not go with --no-edit")
    plot = args.sequential and args.out and not args.no_plot
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--sequential draws curves.png with matplotlib, which is not installed: pip install matplotlib, or pass --no-plot") from None
    if args.out:
        check_out(args.out, args.overwrite)
    spec = model_spec(args)
    model, tok, hparams = spec.load()
    if args.sequential:
        return _run_sequential(args, records, kind, model, tok, hparams, plot)
    load_at_start = os.getloadavg()[0]
    result = run_evaluation(
        model,
        tok,
        records,
        kind=kind,
        edit=not args.no_edit,
        edit_batch=args.edit_batch,
        sequential=args.sequential,
        batch_size=args.batch_size,
        fluency=not args.no_fluency,
        gen_length=args.gen_length,
        seed=args.seed,
        hparams=hparams,
        apply_options={"corpus": args.corpus, "cache_dir": args.cache_dir, "seed": args.seed, "progress": not args.quiet},
        log=log.info,
    )
    result["meta"] = _meta(args, model, result["kind"], load_at_start) | {
        "statistics_corpus": args.corpus or hparams.mom2_dataset,
        "hparams": hparams.to_dict(),
    }
    _report(args.out, result, markdown_report(result))
    return 0


def _run_sequential(args, records, kind, model, tok, hparams, plot: bool) -> int:
    """--sequential: the curves of each --method (memit_fast.eval.sequential), report and results.json."""
    from .sequential import markdown_sequential, plot_curves, run_sequential

    load_at_start = os.getloadavg()[0]
    tuning = {k: v for k, v in (("nullspace_threshold", args.nullspace_threshold), ("l2", args.l2)) if v is not None}
    result = run_sequential(
        model, tok, records, kind=kind, methods=args.method or ["memit"], edit_batch=args.edit_batch or len(records),
        hparams=hparams, batch_size=args.batch_size, fluency=not args.no_fluency, fluency_records=args.fluency_records,
        gen_length=args.gen_length, seed=args.seed, log=log.info,
        editor_options=tuning | {"corpus": args.corpus, "cache_dir": args.cache_dir, "seed": args.seed, "progress": not args.quiet},
    )  # fmt: skip
    result["meta"] = _meta(args, model, kind, load_at_start) | {"statistics_corpus": args.corpus or hparams.mom2_dataset, "hparams": hparams.to_dict()}
    _report(args.out, result, markdown_sequential(result), (lambda tmp: plot_curves([result], str(tmp / "curves.png"))) if plot else None)
    return 0


def _report(out: str | None, result: dict, text: str, also=None) -> None:
    """Print the report; with --out, write results.json and report.md there (and also(folder)).
    Several ranks (torchrun): rank 0 alone."""
    from ..distributed import rank

    if rank() != 0:
        return
    print(text)
    if out:
        with output_dir(out) as tmp:
            write_json(tmp / "results.json", result)
            (tmp / "report.md").write_text(text, encoding="utf-8")
            if also is not None:
                also(tmp)
