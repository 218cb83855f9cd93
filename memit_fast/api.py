"""`apply` and `restore`: the drop-in for the original `apply_memit_to_model`."""

from __future__ import annotations

import contextlib
import copy as copy_module

import torch

from .corpus import check_corpus_spec
from .edit_requests import normalize_requests
from .errors import RestoreError, StatsError
from .hparams import MEMITHyperParams
from .model_access import rewrite_weights
from .presets import for_model
from .profiling import NO_TIMER
from .reference import reference_edit
from .cache import LayerStats, check_stats
from .stats import compute_stats
from .targets import compute_targets
from .templates import flatten, generate_context_templates, normalize_templates
from .tokens import check_context, encode_requests
from .update import apply_update

MODES = ("fast", "reference")


def apply(
    model,
    tok,
    requests,
    hparams: MEMITHyperParams | None = None,
    *,
    copy: bool = False,
    return_orig_weights: bool = True,
    mode: str = "fast",
    stats: dict | None = None,
    corpus=None,
    cache_dir=None,
    context_templates=None,
    seed: int = 0,
    solve_method: str = "auto",
    chunk_tokens: int | None = None,
    progress: bool = True,
    timer=None,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Write `requests` into `model` with MEMIT; returns (model, orig_weights).

    requests: the original dicts {"prompt": "{} plays the sport of", "subject": ..., "target_new":
        {"str": ...}} (a CounterFact record works as is). hparams: a MEMITHyperParams, None for the
        preset of the model's architecture. copy: edit a deep copy. return_orig_weights (default
        True): return {parameter name: CPU copy of the original tensor} of the edited MLP output
        matrices only, for `restore`; False returns {} and saves that host memory and copy (the
        original code's default), and `restore({})` is then refused.
    mode: "fast" (batched, single-pass) or "reference" (the original's structure, the oracle).
    stats: {layer: LayerStats or (d_ff, d_ff) tensor}, else computed or loaded from the cache in
        cache_dir, over `corpus` (default hparams.mom2_dataset; see memit_fast.corpus).
    context_templates: groups of templates [["{}"], [...]], else sampled from the model with `seed`.
    timer: a memit_fast.profiling.PhaseTimer to record time and peak memory per phase.
    On any error the weights are left as they were.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    reqs = normalize_requests(requests)
    hparams = hparams or for_model(model)
    if stats is None and hparams.mom2_adjustment:
        check_corpus_spec(hparams.mom2_dataset if corpus is None else corpus)
    if copy:
        model = copy_module.deepcopy(model)
    weights = rewrite_weights(model, hparams)
    timer = timer or NO_TIMER
    with _eval_no_param_grads(model):
        with timer("templates"):
            templates = normalize_templates(context_templates or generate_context_templates(model, tok, seed=seed))
        with timer("tokenise"):  # errors (subject not in the prompt's tokens) before any work
            encoded = encode_requests(tok, reqs, flatten(templates), hparams.fact_token)
            check_context(reqs, encoded, model.config)
        with timer("statistics"):
            covs = _covariances(model, tok, hparams, weights, stats, corpus, cache_dir, seed, progress, mode)
        backup = {w.name: w.param.detach().clone() for w in weights}  # on the weights' device: a fast rollback
        try:
            if mode == "reference":
                reference_edit(model, tok, reqs, hparams, templates, covs, weights, progress=progress, timer=timer)
            else:
                with timer("z"):
                    z = compute_targets(model, tok, encoded, hparams, chunk_tokens=chunk_tokens, progress=progress)
                apply_update(model, tok, encoded, hparams, z, templates, covs, weights, solve_method=solve_method, progress=progress, timer=timer)
        except BaseException:
            restore(model, backup)
            raise
    return model, ({name: w.to("cpu") for name, w in backup.items()} if return_orig_weights else {})


def restore(model, orig_weights: dict[str, torch.Tensor]) -> None:
    """Put the original weights back, bit for bit: orig_weights as returned by `apply`.

    All or nothing: every name must be a parameter of `model`, every value a tensor of the
    parameter's shape and dtype, on the CPU or on the parameter's device; all are checked and
    moved to their devices before the first is written. Raises RestoreError.
    """
    if not isinstance(orig_weights, dict):
        raise RestoreError(f"restore needs the dict of original weights that apply returns, got {type(orig_weights).__name__}")
    if not orig_weights:
        raise RestoreError(
            "restore got no original weights (an empty dict): apply was called with return_orig_weights=False, "
            "so there is nothing to put back; call apply with return_orig_weights=True (the default)"
        )
    params = dict(model.named_parameters())
    problems = []
    for name, value in orig_weights.items():
        p = params.get(name)
        if p is None:
            problems.append(f"{name!r} is not a parameter of the model")
        elif not isinstance(value, torch.Tensor):
            problems.append(f"{name}: expected a tensor, got {type(value).__name__}")
        elif value.shape != p.shape:
            problems.append(f"{name}: shape {tuple(value.shape)} != the parameter's {tuple(p.shape)}")
        elif value.dtype != p.dtype:
            problems.append(f"{name}: dtype {value.dtype} != the parameter's {p.dtype}")
        elif value.device != p.device and value.device.type != "cpu":
            problems.append(f"{name}: on {value.device}, the parameter is on {p.device} (originals must be on the CPU or the parameter's device)")
    if problems:
        raise RestoreError(f"restore wrote nothing: {len(problems)} of {len(orig_weights)} original weights do not fit the model: " + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))
    staged = {name: value.to(params[name].device) for name, value in orig_weights.items()}  # may fail (memory) before any write
    with torch.no_grad():
        for name, value in staged.items():
            params[name].copy_(value)


def _covariances(model, tok, hparams, weights, stats, corpus, cache_dir, seed, progress, mode) -> dict[int, torch.Tensor]:
    """{layer: C^l} from `stats` as given, else from compute_stats (one pass per layer in reference
    mode); the identity for every layer when hparams.mom2_adjustment is off."""
    if not hparams.mom2_adjustment:
        return {w.layer: torch.eye(w.d_ff) for w in weights}
    if stats is None:
        stats = compute_stats(
            model, tok, hparams, corpus=corpus, cache_dir=cache_dir, seed=seed, progress=progress, one_pass_per_layer=mode == "reference"
        )
    covs = {}
    for w in weights:
        if w.layer not in stats:
            raise StatsError(f"no statistics for layer {w.layer}")
        s = stats[w.layer]
        mom2, count = (s.mom2, s.count) if isinstance(s, LayerStats) else (s, 1)
        check_stats(mom2, count, f"statistics of layer {w.layer}")
        if mom2.shape[0] != w.d_ff:
            raise StatsError(f"statistics of layer {w.layer} are {tuple(mom2.shape)}, the layer's keys have d_ff={w.d_ff}")
        covs[w.layer] = mom2
    return covs


@contextlib.contextmanager
def _eval_no_param_grads(model):
    """Eval mode and no parameter gradients while editing; the caller's settings come back after."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
