"""One layout per architecture family, resolved once per model: how memit_fast runs a model's
forward pass block by block (base.py), and the generic fallback over HF's modules (generic.py).

    layout = layout_for(model, hparams)
"""

from __future__ import annotations

from ..model_access import get_module
from .base import Context, Layout, PrefixCache, SuffixRunner
from .generic import GenericLayout
from .gpt2 import GPT2Layout
from .gptj import GPTJLayout
from .llama import LlamaLayout
from .neox import NeoXLayout

FAMILIES = {"gpt2": GPT2Layout, "gptj": GPTJLayout, "gpt_neox": NeoXLayout, "llama": LlamaLayout, "mistral": LlamaLayout, "qwen2": LlamaLayout}

__all__ = ["Context", "GenericLayout", "Layout", "PrefixCache", "SuffixRunner", "FAMILIES", "layout_for"]


def layout_for(model, hparams, *, generic: bool = False):
    """The family layout of `model` when its modules are the ones the hyper-parameters name (the
    edited W_out, the blocks, the final norm and head), else the generic layout. generic=True
    forces the generic layout."""
    cls = FAMILIES.get(getattr(model.config, "model_type", None))
    if cls is None or generic:
        return GenericLayout(model, hparams)
    layout = cls(model)
    same = all(get_module(model, hparams.rewrite_module_tmp.format(i)) is layout.w_out(i) for i in range(layout.n_layers))
    same = same and all(get_module(model, hparams.layer_module_tmp.format(i)) is layout.blocks[i] for i in range(layout.n_layers))
    same = same and get_module(model, hparams.ln_f_module) is layout.final_norm and get_module(model, hparams.lm_head_module) is layout.lm_head
    return layout if same else GenericLayout(model, hparams)
