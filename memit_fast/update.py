"""The multi-layer update (docs/algorithm.md section 5): spread each request's residual z_i - cur_i over the
critical layers, lowest first, each layer solving (lam C^l + K K^T) A = K and adding R A^T."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .cache import all_finite
from .errors import SolveError
from .hparams import MEMITHyperParams
from .keys import KeyReader, key_rows
from .model_access import RewriteWeight
from .profiling import NO_TIMER
from .solve import solve_delta_weights


def write_layer(weight: RewriteWeight, delta: torch.Tensor) -> None:
    """W^l += delta (d_model, d_ff), added in float32 (float64 for a float64 model) as the original
    does, then cast to W's dtype. The delta and the cast result are checked finite on their
    device (one sync) before W is written: a delta finite in float64 that overflows a bfloat16 or
    float16 weight raises SolveError and leaves W as it was."""
    with torch.no_grad():
        p = weight.param
        wide = torch.promote_types(p.dtype, torch.float32)
        update = weight.as_update(delta).to(p.device)
        new = (p.to(wide) + update.to(wide)).to(p.dtype)
        if not all_finite(update, new):
            if not all_finite(update):
                raise SolveError(f"the update of {weight.name} contains NaN or inf")
            raise SolveError(
                f"the update of {weight.name} overflows its dtype {p.dtype}: W + delta would contain NaN or inf "
                f"(largest |delta| {update.abs().max().item():.3g}, largest finite {p.dtype} {torch.finfo(p.dtype).max:.3g})"
            )
        p.copy_(new)


def layer_delta(cov: torch.Tensor, keys: torch.Tensor, residual: torch.Tensor, lam: float, method: str) -> torch.Tensor:
    """Delta W = R A^T with A = (lam C + K K^T)^{-1} K (float64); keys (n, d_ff), residual (n, d_model) -> (d_model, d_ff)."""
    return solve_delta_weights(cov.to(keys.device), keys.T, residual.T.contiguous(), lam, method=method)


def apply_update(
    model,
    tok,
    requests,
    hparams: MEMITHyperParams,
    z: torch.Tensor,
    templates: list[list[str]],
    covs: dict[int, torch.Tensor],
    weights: list[RewriteWeight],
    layout,
    *,
    solve_method: str = "auto",
    batch_tokens: int = 8192,
    progress: bool = True,
    timer=NO_TIMER,
    layer_solve: Callable[[RewriteWeight, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Edit the critical layers in place; returns {parameter name: delta (d_model, d_ff) float64}.
    requests: encoded with `tokens.encode_requests`; layout: the model's `memit_fast.layouts` layout.
    layer_solve(weight, keys (n, d_ff), residual (n, d_model)) -> delta (d_model, d_ff): another
    per-layer solve in place of MEMIT's `layer_delta` (the projected solve of
    memit_fast.sequential); `covs` is then not read."""
    reader = KeyReader(model, layout, tok, key_rows(requests), len(requests), hparams.layers[-1], templates, batch_tokens=batch_tokens)
    deltas = {}
    for i, w in enumerate(tqdm(weights, desc="layer updates", disable=not progress)):
        with timer("keys and values"):
            keys, cur = reader.read(w.layer)
        with timer("solve"):
            resid = (z - cur) / (len(weights) - i)
            if layer_solve is None:
                delta = layer_delta(covs[w.layer], keys, resid, hparams.mom2_update_weight, solve_method)
            else:
                delta = layer_solve(w, keys, resid)
        with timer("weight update"):
            write_layer(w, delta)
        deltas[w.name] = delta
    return deltas
