"""Keys k^l (docs/algorithm.md section 3) and the current block-L outputs at the subject (section
5, step 2), read with the current weights as the update edits the layers in ascending order.

Each prompt is cut right after the subject's token (causality: nothing after it changes what is
read there). With a family layout the passes are incremental and exact: the input of block l
does not depend on block l or anything above it, so the hidden states at the input of the layer
just read are kept, and the next layer's pass starts there (GPT-J's six layers 3..8 run 4 + 5 x 2
blocks over every row instead of 6 x 9). Only the bare-prompt rows (one per request) go on to
block L for `cur`. Rows are gathered straight into preallocated buffers (`gather_rows`, a Triton
kernel on CUDA). Keys are averaged over the templates in two levels, as the original: within each
template group, then across groups; each batch adds its rows' weighted keys into the (n, d_ff)
result, so no (rows, d_ff) buffer of every template's key is held.
"""

from __future__ import annotations

from collections import Counter

import torch

from .layouts import Layout
from .model_access import float_dtype, hidden_size, in_features, model_device
from .ops import gather_rows
from .templates import group_index
from .tokens import EncodedRequest, length_batches, pad_id, pad_right


def key_rows(requests: list[EncodedRequest]) -> list[list[int]]:
    """Per request and template (request-major), the prompt's ids cut after the lookup token."""
    return [p.ids[: p.lookup + 1] for r in requests for p in r.prompts]


class KeyReader:
    """Reads (K, cur) at each critical layer in ascending order over the same key rows.

    rows: `key_rows(requests)`, n_requests x n_templates rows, request-major; the first template
    of each request is the bare prompt "{}"."""

    def __init__(self, model, layout, tok, rows: list[list[int]], n_requests: int, out_layer: int, templates: list[list[str]], *,
                 batch_tokens: int = 8192, offload: bool = False):
        """offload: keep the hidden states between layers on the CPU (a memory cap), not the model's device."""
        self.layout, self.out_layer, self.offload = layout, out_layer, offload
        self.n_requests, self.n_rows = n_requests, len(rows)
        self.device, self.dtype = model_device(model), float_dtype(model)
        self.d_model = hidden_size(model)
        self.n_t = n_t = len(rows) // n_requests
        # weight of each template's key in the request's average: 1 / (groups x the group's size)
        groups = group_index(templates)
        sizes = Counter(groups)
        template_weight = [1.0 / (len(sizes) * sizes[g]) for g in groups]
        self.batches = []
        for batch in length_batches([len(r) for r in rows], batch_tokens):
            ids, mask = pad_right([rows[i] for i in batch], pad_id(tok), self.device)
            last = mask.sum(1) - 1
            bare = [j for j, i in enumerate(batch) if i % n_t == 0]
            width = ids.shape[1]
            index = torch.tensor(batch, device=self.device)
            self.batches.append({
                "rows": index, "ids": ids, "mask": mask,
                # per template present: (positions in the batch, their requests, the template's weight);
                # within one template the requests are distinct, so adding them is deterministic
                "by_template": [(pos, index[pos] // n_t, template_weight[t]) for t in range(n_t)
                                if len(pos := (index % n_t == t).nonzero()[:, 0])],
                "bare": torch.tensor(bare, dtype=torch.long, device=self.device),  # positions in the batch
                "key_index": torch.arange(len(batch), device=self.device) * width + last,  # flat (row, last token)
                "cur_index": torch.arange(len(bare), device=self.device) * width + last[bare],  # the same over the bare rows
                "cur_rows": torch.tensor([batch[j] // n_t for j in bare], dtype=torch.long, device=self.device),  # their requests
            })  # fmt: skip
        self.incremental = isinstance(layout, Layout)
        self.read_so_far = -1

    @torch.no_grad()
    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K (n, d_ff), cur (n, d_model)) in float_dtype(model): the averaged key at `layer` and
        block L's output at the subject of the bare prompt, one row per request."""
        if layer <= self.read_so_far:
            raise ValueError(f"layers must be read in ascending order: {layer} after {self.read_so_far}")
        self.read_so_far = layer
        d_ff = in_features(self.layout.w_out(layer))
        keys = torch.zeros(self.n_requests, d_ff, device=self.device, dtype=self.dtype)
        cur = torch.empty(self.n_requests, self.d_model, device=self.device, dtype=self.dtype)
        k_buf = torch.empty(max(len(b["rows"]) for b in self.batches), d_ff, device=self.device, dtype=self.dtype)
        for b in self.batches:
            n = len(b["rows"])
            if self.incremental:
                key, out = self._read_incremental(b, layer)
            else:
                key, out = self.layout.key_and_output(b["ids"], b["mask"], layer, self.out_layer)
                out = out[b["bare"]]
            gather_rows(key, b["key_index"], out=k_buf[:n])
            for pos, req, weight in b["by_template"]:
                keys[req] += k_buf[pos] * weight
            if len(b["cur_rows"]):  # out holds the bare rows only
                v_buf = torch.empty(len(b["cur_rows"]), self.d_model, device=self.device, dtype=self.dtype)
                gather_rows(out, b["cur_index"], out=v_buf)
                cur[b["cur_rows"]] = v_buf
        return keys, cur

    @staticmethod
    def _to_host(b: dict, h: torch.Tensor) -> torch.Tensor:
        """h copied into the batch's pinned CPU buffer (allocated once)."""
        if "host" not in b:
            b["host"] = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
        return b["host"].copy_(h)

    def _read_incremental(self, b: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key of every row at `layer`, block-L output of the bare rows), from the hidden states
        kept at the input of the previously read layer (or the embeddings)."""
        lay = self.layout
        if "hidden" not in b:
            b["hidden"], b["ctx"] = lay.start(b["ids"])
            b["at"] = 0
        h, ctx = b["hidden"], b["ctx"]
        if self.offload and h.device != self.device:
            h = h.to(self.device, non_blocking=True)
        h = lay.run(h, b["at"], layer, ctx)
        # input of block `layer`: unchanged by editing it or any block above
        b["hidden"], b["at"] = (self._to_host(b, h) if self.offload and h.is_cuda else h), layer
        h, key = lay.block(layer, h, ctx, want_key=True)
        h, key = h.to(self.device), key.to(self.device)  # a model split over GPUs: back from block `layer`'s
        hb = h[b["bare"]]
        if len(hb):
            hb = lay.run(hb, layer + 1, self.out_layer + 1, lay.context(hb, ctx.positions[b["bare"]]))
        return key, hb
