"""Keys k^l (MEMIT.md section 3) and the current block-L outputs at the subject (section 5, step 2),
read in one forward pass per layer with the current weights, gathered straight from the hooks
into preallocated buffers (`gather_rows`, a Triton kernel on CUDA).

Each prompt is cut right after the subject's token (causality: nothing after it changes what is
read there), and the pass stops after block L. Keys are averaged over the templates in two
levels, as the original: within each template group, then across groups.
"""

from __future__ import annotations

import torch

from .hparams import MEMITHyperParams
from .ops import gather_rows
from .model_access import StopForward, block_output, float_dtype, get_module, hidden_size, hooks, in_features, model_device, run_until_stop
from .templates import group_index
from .tokens import EncodedRequest, length_batches, pad_id, pad_right


def key_rows(requests: list[EncodedRequest]) -> list[list[int]]:
    """Per request and template (request-major), the prompt's ids cut after the lookup token."""
    return [p.ids[: p.lookup + 1] for r in requests for p in r.prompts]


@torch.no_grad()
def compute_keys_and_values(
    model,
    tok,
    rows: list[list[int]],
    n_requests: int,
    hparams: MEMITHyperParams,
    layer: int,
    templates: list[list[str]],
    *,
    batch_tokens: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K (n, d_ff), cur (n, d_model)) in float_dtype(model): the averaged key at `layer` and block L's output at
    the subject of the bare prompt ("{}", the first template), one row per request."""
    device, dtype = model_device(model), float_dtype(model)
    L = hparams.layers[-1]
    rewrite = get_module(model, hparams.rewrite_module_tmp.format(layer))
    block_L = get_module(model, hparams.layer_module_tmp.format(L))
    n_t = len(rows) // n_requests
    k_buf = torch.empty(len(rows), in_features(rewrite), device=device, dtype=dtype)
    v_buf = torch.empty(len(rows), hidden_size(model), device=device, dtype=dtype)
    state = {}

    def grab_key(_m, args):
        gather_rows(args[0], state["index"], out=k_buf[state["slice"]])

    def grab_value(_m, _args, output):
        gather_rows(block_output(output), state["index"], out=v_buf[state["slice"]])
        raise StopForward

    batches = length_batches([len(r) for r in rows], batch_tokens)
    with hooks(rewrite.register_forward_pre_hook(grab_key), block_L.register_forward_hook(grab_value)):
        start = 0
        for batch in batches:
            ids, mask = pad_right([rows[i] for i in batch], pad_id(tok), device)
            state["index"] = torch.arange(len(batch), device=device) * ids.shape[1] + mask.sum(1) - 1
            state["slice"] = slice(start, start + len(batch))
            run_until_stop(model.base_model, input_ids=ids, attention_mask=mask, use_cache=False)
            start += len(batch)
    order = torch.tensor([i for b in batches for i in b], device=device)
    k_all, v_all = torch.empty_like(k_buf), torch.empty_like(v_buf)
    k_all[order], v_all[order] = k_buf, v_buf
    k_all, v_all = k_all.view(n_requests, n_t, -1), v_all.view(n_requests, n_t, -1)
    groups = torch.tensor(group_index(templates), device=device)
    n_groups = int(groups.max()) + 1
    k = torch.stack([k_all[:, groups == g].mean(1) for g in range(n_groups)], 1).mean(1)
    return k, v_all[:, 0]
