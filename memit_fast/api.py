"""`apply` and `restore`: the drop-in for the original `apply_memit_to_model`."""

from __future__ import annotations

import contextlib
import copy as copy_module

import torch

from .edit_requests import normalize_requests
from .errors import StatsError
from .hparams import MEMITHyperParams
from .layouts import layout_for
from .model_access import rewrite_weights
from .presets import for_model
from .profiling import NO_TIMER
from .reference import reference_edit
from .stats import LayerStats, check_stats, compute_stats
from .targets import compute_targets
from .templates import flatten, generate_context_templates, normalize_templates
from .tokens import encode_requests
from .update import apply_update

MODES = ("fast", "reference")


def apply(
    model,
    tok,
    requests,
    hparams: MEMITHyperParams | None = None,
    *,
    copy: bool = False,
    return_orig_weights: bool = False,
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
        preset of the model's architecture. copy: edit a deep copy. return_orig_weights: return
        {parameter name: CPU copy of the original tensor} (else {}).
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
    if copy:
        model = copy_module.deepcopy(model)
    weights = rewrite_weights(model, hparams)
    layout = layout_for(model, hparams)
    timer = timer or NO_TIMER
    with _eval_no_param_grads(model):
        with timer("templates"):
            templates = normalize_templates(context_templates or generate_context_templates(model, tok, seed=seed))
        with timer("tokenise"):  # errors (subject not in the prompt's tokens) before any work
            encoded = encode_requests(tok, reqs, flatten(templates), hparams.fact_token)
        with timer("statistics"):
            covs = _covariances(model, tok, hparams, weights, stats, corpus, cache_dir, seed, progress, mode, layout)
        backup = {w.name: w.param.detach().clone() for w in weights}  # on the weights' device: a fast rollback
        try:
            if mode == "reference":
                reference_edit(model, tok, reqs, hparams, templates, covs, weights, progress=progress, timer=timer)
            else:
                with timer("z"):
                    z = compute_targets(model, tok, encoded, hparams, chunk_tokens=chunk_tokens, progress=progress, layout=layout)
                apply_update(model, tok, encoded, hparams, z, templates, covs, weights, layout, solve_method=solve_method, progress=progress, timer=timer)
        except BaseException:
            restore(model, backup)
            raise
    return model, ({name: w.to("cpu") for name, w in backup.items()} if return_orig_weights else {})


def restore(model, orig_weights: dict[str, torch.Tensor]) -> None:
    """Put the original weights back, bit for bit."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in orig_weights.items():
            params[name].copy_(value)


def _covariances(model, tok, hparams, weights, stats, corpus, cache_dir, seed, progress, mode, layout) -> dict[int, torch.Tensor]:
    """{layer: C^l} from `stats` as given, else from compute_stats (one pass per layer in reference
    mode); the identity for every layer when hparams.mom2_adjustment is off."""
    if not hparams.mom2_adjustment:
        return {w.layer: torch.eye(w.d_ff) for w in weights}
    if stats is None:
        stats = compute_stats(
            model, tok, hparams, corpus=corpus, cache_dir=cache_dir, seed=seed, progress=progress, one_pass_per_layer=mode == "reference", layout=layout
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
