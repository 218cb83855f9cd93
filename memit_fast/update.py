"""The multi-layer update (docs/algorithm.md section 5): spread each request's residual z_i - cur_i over the
critical layers, lowest first, each layer solving (lam C^l + K K^T) A = K and adding R A^T."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from . import distributed
from .cache import all_finite
from .errors import SolveError
from .hparams import MEMITHyperParams
from .keys import KeyReader, key_rows
from .model_access import RewriteWeight, float_dtype, hidden_size
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
    offload: bool = False,
    progress: bool = True,
    timer=NO_TIMER,
    layer_solve: Callable[[RewriteWeight, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Edit the critical layers in place (each delta is freed once written).
    requests: encoded with `tokens.encode_requests`; layout: the model's `memit_fast.layouts` layout.
    offload: the key pass keeps its hidden states on the CPU between layers (a memory cap).
    layer_solve(weight, keys (n, d_ff), residual (n, d_model)) -> delta (d_model, d_ff): another
    per-layer solve in place of MEMIT's `layer_delta` (the projected solve of
    memit_fast.sequential); `covs` is then not read.
    Several ranks (memit_fast.distributed): each reads the keys of its share of the requests and
    the rows are gathered; layer i is solved on rank i mod N and its delta broadcast; the edited
    weights are checked bit-identical on every rank at the end. Each layer is solved on its
    W_out's device (a model split over GPUs: that layer's GPU)."""
    mine, parts = distributed.my_share([sum(len(row) for row in key_rows([r])) for r in requests])
    local = [requests[i] for i in mine]
    reader = KeyReader(model, layout, tok, key_rows(local), len(local), hparams.layers[-1], templates, batch_tokens=batch_tokens, offload=offload) if local else None
    for i, w in enumerate(tqdm(weights, desc="layer updates", disable=not progress)):
        with timer("keys and values"):
            keys, cur = distributed.agreed(f"the keys of layer {w.layer}", _read, reader, w, model)
            keys, cur = distributed.gather_rows(keys, parts), distributed.gather_rows(cur, parts)
        dev = w.param.device
        with timer("solve"), distributed.device_guard(dev):
            residual = ((z - cur) / (len(weights) - i)).to(dev)
            if layer_solve is None:
                solve = lambda: layer_delta(covs[w.layer], keys.to(dev), residual, hparams.mom2_update_weight, solve_method)  # noqa: E731
            else:
                solve = lambda: layer_solve(w, keys.to(dev), residual)  # noqa: E731
            delta = distributed.on_owner(f"the solve of layer {w.layer}", i, solve, (w.d_model, w.d_ff), torch.float64, dev)
        with timer("weight update"), distributed.device_guard(dev):
            distributed.agreed(f"the weight update of layer {w.layer}", write_layer, w, delta)
        del keys, cur, residual, delta
    distributed.check_same("the edited weights", [w.param for w in weights])


def _read(reader: KeyReader | None, w: RewriteWeight, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, cur) of this rank's requests at w's layer; empty rows when it has none."""
    if reader is None:
        dtype, device = float_dtype(model), next(model.parameters()).device
        return torch.empty(0, w.d_ff, dtype=dtype, device=device), torch.empty(0, hidden_size(model), dtype=dtype, device=device)
    return reader.read(w.layer)
