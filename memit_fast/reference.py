"""The reference mode: MEMIT with the original code's structure, the oracle for tests and the
baseline for benchmarks. One request at a time for z, full forward passes over whole prompts
with hooks on block L and full-vocabulary logits, keys read from full prompts, and a float64
dense solve. It shares only tokenisation, templates and statistics with the fast path.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import targets
from .edit_requests import EditRequest
from .hparams import MEMITHyperParams
from .model_access import RewriteWeight, block_output, float_dtype, get_module, hooks, lm_head_params, model_device, with_block_output
from .profiling import NO_TIMER
from .templates import flatten, group_index
from .tokens import encode_prompt, encode_target, length_batches, pad_id, pad_right
from .update import layer_delta, write_layer


def reference_z(model, tok, request: EditRequest, hp: MEMITHyperParams, templates: list[list[str]]) -> torch.Tensor:
    """z (d_model,) for one request, as the original `compute_z`."""
    device = model_device(model)
    target = encode_target(tok, request.target)
    rows, lookups, starts = [], [], []
    for template in flatten(templates):
        t_before, t_after = template.split("{}")
        enc = encode_prompt(tok, t_before + request.before, request.subject, request.after + t_after, hp.fact_token)
        rows.append(enc.ids + target[:-1])
        lookups.append(enc.lookup)
        starts.append(len(enc.ids) - 1)
    kl = encode_prompt(tok, "", request.subject, " is a", hp.fact_token)
    rows.append(kl.ids)
    lookups.append(kl.lookup)
    n_rw = len(rows) - 1
    input_ids, mask = pad_right(rows, pad_id(tok), device)

    block_L = get_module(model, hp.layer_module_tmp.format(hp.layers[-1]))
    block_loss = get_module(model, hp.layer_module_tmp.format(hp.v_loss_layer))
    ln_f, lm_w, lm_b = lm_head_params(model, hp)
    delta = torch.zeros(lm_w.shape[1], device=device, dtype=float_dtype(model), requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    state: dict = {"init": None}

    def edit_output(_m, _args, output):
        h = block_output(output)
        if state["init"] is None:
            state["init"] = h[0, lookups[0]].detach().to(delta.dtype).clone()
        shift = torch.zeros_like(h)
        shift[torch.arange(len(rows)), torch.tensor(lookups)] = delta.to(h.dtype)
        return with_block_output(output, h + shift)

    def keep_output(_m, _args, output):
        state["loss_out"] = block_output(output)

    kl_init = None
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        with hooks(block_L.register_forward_hook(edit_output), block_loss.register_forward_hook(keep_output)):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        kl_log_probs = torch.log_softmax(logits[n_rw, lookups[n_rw]].to(delta.dtype), dim=-1)
        if kl_init is None:
            kl_init = kl_log_probs.detach().clone()
        full = ln_f(state["loss_out"][:n_rw]) @ lm_w.T
        if lm_b is not None:
            full = full + lm_b
        log_probs = torch.log_softmax(full.to(delta.dtype), dim=2)
        nll_each = []
        for i in range(n_rw):
            pos = torch.arange(len(target), device=device) + starts[i]
            nll_each.append(-log_probs[i, pos, torch.tensor(target, device=device)].sum() / len(target))
        nll = torch.stack(nll_each).mean()
        kl_loss = hp.kl_factor * torch.nn.functional.kl_div(kl_init, kl_log_probs, log_target=True, reduction="sum")
        decay = hp.v_weight_decay * (delta.norm() / state["init"].norm() ** 2)
        loss = nll + kl_loss + decay
        if loss < targets.STOP_LOSS or it == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        max_norm = hp.clamp_norm_factor * state["init"].norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta[...] = delta * max_norm / delta.norm()
    return state["init"] + delta.detach()


@torch.no_grad()
def _read_at(model, tok, prompts: list[tuple[list[int], int]], module, pre: bool, batch_tokens: int) -> torch.Tensor:
    """(n, width) in float_dtype(model): module's input (pre) or output at each prompt's lookup token, from full forward passes."""
    device = model_device(model)
    out = None
    for batch in length_batches([len(p) for p, _ in prompts], batch_tokens):
        ids, mask = pad_right([prompts[i][0] for i in batch], pad_id(tok), device)
        where = (torch.arange(len(batch)), torch.tensor([prompts[i][1] for i in batch]))
        got = []
        if pre:
            handle = module.register_forward_pre_hook(lambda _m, args: got.append(args[0][where]))
        else:
            handle = module.register_forward_hook(lambda _m, _a, o: got.append(block_output(o)[where]))
        with hooks(handle):
            model(input_ids=ids, attention_mask=mask)
        if out is None:
            out = torch.empty(len(prompts), got[0].shape[1], device=device, dtype=float_dtype(model))
        out[torch.tensor(batch, device=device)] = got[0].to(out.dtype)
    return out


def reference_keys_and_values(model, tok, requests, hp: MEMITHyperParams, layer: int, templates, batch_tokens: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(K (n, d_ff), cur (n, d_model)) from full prompts and full forward passes, as the original's
    `compute_ks` (all requests x templates) and its separate pass over the bare prompts."""
    rewrite = get_module(model, hp.rewrite_module_tmp.format(layer))
    block_L = get_module(model, hp.layer_module_tmp.format(hp.layers[-1]))
    flat = flatten(templates)
    encoded = []
    for r in requests:
        for t in flat:
            t_before, t_after = t.split("{}")
            enc = encode_prompt(tok, t_before + r.before, r.subject, r.after + t_after, hp.fact_token)
            encoded.append((enc.ids, enc.lookup))
    k = _read_at(model, tok, encoded, rewrite, True, batch_tokens).view(len(requests), len(flat), -1)
    groups = torch.tensor(group_index(templates), device=k.device)
    keys = torch.stack([k[:, groups == g].mean(1) for g in range(int(groups.max()) + 1)], 1).mean(1)
    bare = [encode_prompt(tok, r.before, r.subject, r.after, hp.fact_token) for r in requests]
    cur = _read_at(model, tok, [(b.ids, b.lookup) for b in bare], block_L, False, batch_tokens)
    return keys, cur


def reference_edit(model, tok, requests: list[EditRequest], hp: MEMITHyperParams, templates, covs, weights: list[RewriteWeight], *, progress: bool = True, timer=NO_TIMER) -> dict[str, torch.Tensor]:
    """The whole edit in the original's structure; returns {parameter name: delta}."""
    with timer("z"):
        z = torch.stack([reference_z(model, tok, r, hp, templates) for r in tqdm(requests, desc="z (reference)", disable=not progress)])
    deltas = {}
    for i, w in enumerate(tqdm(weights, desc="layer updates (reference)", disable=not progress)):
        with timer("keys and values"):
            keys, cur = reference_keys_and_values(model, tok, requests, hp, w.layer, templates)
        with timer("solve"):
            delta = layer_delta(covs[w.layer], keys, (z - cur) / (len(weights) - i), hp.mom2_update_weight, "dense")
        with timer("weight update"):
            write_layer(w, delta)
        deltas[w.name] = delta
    return deltas
