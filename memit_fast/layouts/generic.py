"""Any other causal LM, through its Hugging Face modules: the only layout that reads layers with
forward hooks (and stops a pass early with an exception). Slower than a family layout, but it
needs nothing beyond the hyper-parameters' module templates."""

from __future__ import annotations

import torch

from ..model_access import block_output, cache_arg, get_module, hooks, returned_cache, with_block_output
from ..presets import num_layers
from .base import HeadAccess, patch_rows


class _Stop(Exception):
    """Raised by a hook to end a forward pass once everything needed has been read."""


def _until_stop(fn, **kwargs) -> None:
    try:
        fn(**kwargs)
    except _Stop:
        pass


class GenericLayout(HeadAccess):
    """The stage operations of `Layout` (mlp_keys, key_and_output, suffix_runner, final_norm,
    lm_head) over HF's own forward, located by the hyper-parameters' module templates."""

    family = "generic"

    def __init__(self, model, hparams):
        self.model, self.hparams = model, hparams
        self.base = model.base_model
        self.final_norm = get_module(model, hparams.ln_f_module)
        self.lm_head = get_module(model, hparams.lm_head_module)

    def w_out(self, i: int):
        return get_module(self.model, self.hparams.rewrite_module_tmp.format(i))

    def block_module(self, i: int):
        return get_module(self.model, self.hparams.layer_module_tmp.format(i))

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(h))

    @torch.no_grad()
    def mlp_keys(self, ids, mask, layers, consume) -> None:
        last = max(layers)

        def hook(layer):
            def read(_m, args):
                consume(layer, args[0])
                if layer == last:
                    raise _Stop

            return read

        with hooks(*[self.w_out(i).register_forward_pre_hook(hook(i)) for i in layers]):
            _until_stop(self.base, input_ids=ids, attention_mask=mask, use_cache=False)

    @torch.no_grad()
    def key_and_output(self, ids, mask, key_layer: int, out_layer: int):
        got = {}

        def read_key(_m, args):
            got["key"] = args[0]

        def read_out(_m, _args, out):
            got["out"] = block_output(out)
            raise _Stop

        with hooks(self.w_out(key_layer).register_forward_pre_hook(read_key), self.block_module(out_layer).register_forward_hook(read_out)):
            _until_stop(self.base, input_ids=ids, attention_mask=mask, use_cache=False)
        return got["key"], got["out"]

    def suffix_runner(self, prefix_ids, prefix_mask, suffix_ids, suffix_mask, suffix_pos, layer: int, stop: int) -> "_HooksRunner":
        return _HooksRunner(self, prefix_ids, prefix_mask, suffix_ids, suffix_mask, suffix_pos, layer, stop)

    # ---- causal tracing (memit_fast/trace.py): Layout.patched_forward through forward hooks ----
    @property
    def n_layers(self) -> int:
        return num_layers(self.model.config)

    @torch.no_grad()
    def patched_forward(self, ids, last, *, noise=None, patches=None, record: bool = False, enter=None):
        """Layout.patched_forward over HF's forward: the noise is added to the input embedding
        module's output, the patches replace the outputs of the block, attention and MLP modules
        (hparams' layer/attn/mlp_module_tmp). Every row starts at the embeddings (no `enter`)."""
        if enter is not None:
            raise ValueError("the generic layout runs every row from the embeddings (enter=None)")
        patches = patches or {}
        templates = {"hidden": self.hparams.layer_module_tmp, "attn": self.hparams.attn_module_tmp, "mlp": self.hparams.mlp_module_tmp}
        kept = {name: [None] * self.n_layers for name in templates}

        def hook(name, layer):
            def run(_m, _args, out):
                h = patch_rows(block_output(out), patches.get(layer, {}).get(name))
                if record:
                    kept[name][layer] = h
                if name == "hidden" and layer == self.n_layers - 1:
                    kept["last"] = h
                return with_block_output(out, h)

            return run

        handles = [get_module(self.model, tmp.format(i)).register_forward_hook(hook(name, i))
                   for name, tmp in templates.items() for i in range(self.n_layers)]
        if noise is not None:
            handles.append(self.model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out + noise.to(out.dtype)))
        with hooks(*handles):
            self.base(input_ids=ids, use_cache=False)
        h = kept.pop("last")
        logits = self.finish(h[torch.arange(len(h), device=h.device), last])
        return (logits, {k: torch.stack(v) for k, v in kept.items()}) if record else logits


class _HooksRunner:
    """SuffixRunner's contract through HF's forward: the prefix as a transformers cache (rebuilt
    for the selected rows on every call), blocks 0..layer bypassed by patched forwards that hand
    the injected hidden states on, a hook that stops the pass after block `stop`."""

    def __init__(self, layout: GenericLayout, prefix_ids, prefix_mask, suffix_ids, suffix_mask, suffix_pos, layer, stop):
        self.layout, self.layer, self.stop = layout, layer, stop
        self.blocks = [layout.block_module(i) for i in range(stop + 1)]
        self.suffix = (suffix_ids, suffix_mask, suffix_pos, prefix_mask)
        self.rows = torch.arange(len(suffix_ids), device=suffix_ids.device)
        self.as_tuple = False
        with torch.no_grad():
            self.kv = []
            if prefix_ids.shape[1]:
                out = layout.base(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True)
                self.kv = [(lay.keys, lay.values) for lay in returned_cache(out).layers]
            got = {}

            def read(_m, _args, out):
                self.as_tuple = isinstance(out, (tuple, list))
                got["h"] = block_output(out)
                raise _Stop

            with hooks(self.blocks[layer].register_forward_hook(read)):
                _until_stop(layout.base, **self._inputs())
        self.hidden = got["h"]

    def _inputs(self) -> dict:
        from transformers import DynamicCache

        ids, mask, pos, prefix_mask = (t[self.rows] for t in self.suffix)
        cache = None
        if self.kv:
            mask = torch.cat([prefix_mask, mask], dim=1)
            cache = DynamicCache(config=self.layout.model.config)
            for i, (k, v) in enumerate(self.kv):
                cache.update(k[self.rows], v[self.rows], i)
        return dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=bool(self.kv), **cache_arg(self.layout.base, cache))

    def select(self, rows: torch.Tensor) -> None:
        self.rows = self.rows[rows]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        wrap = (lambda x: (x,)) if self.as_tuple else (lambda x: x)
        got = {}

        def read(_m, _args, out):
            got["h"] = block_output(out)
            raise _Stop

        for i in range(self.layer):
            self.blocks[i].forward = lambda *a, **k: wrap(a[0] if a else k["hidden_states"])
        self.blocks[self.layer].forward = lambda *a, **k: wrap(h)
        try:
            with hooks(self.blocks[self.stop].register_forward_hook(read)):
                _until_stop(self.layout.base, **self._inputs())
        finally:
            for i in range(self.layer + 1):
                del self.blocks[i].forward
        return got["h"]
