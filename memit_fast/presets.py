"""Hyper-parameters per architecture, detected from the model's config.

Published settings (docs/algorithm.md section 7): GPT-2 XL layers 13..17, lambda 20000; GPT-J layers 3..8,
lambda 15000; GPT-NeoX-20B layers 6..10; Llama family layers 4..8 with weight decay 1e-3 and
clamp factor 4. A model of another depth in a known family gets the published layer range
scaled to its depth (`scaled_layers`). SmolLM2-135M, the default model, has its own tuned entry.
"""

from __future__ import annotations

from .errors import HyperParamsError
from .hparams import MEMITHyperParams

# Module path templates per HF `config.model_type`.
_LLAMA_MODULES = dict(
    rewrite_module_tmp="model.layers.{}.mlp.down_proj",
    layer_module_tmp="model.layers.{}",
    mlp_module_tmp="model.layers.{}.mlp",
    attn_module_tmp="model.layers.{}.self_attn",
    ln_f_module="model.norm",
    lm_head_module="lm_head",
)
MODULES = {
    "gpt2": dict(
        rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
        layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp",
        attn_module_tmp="transformer.h.{}.attn",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
    ),
    "gptj": dict(
        rewrite_module_tmp="transformer.h.{}.mlp.fc_out",
        layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp",
        attn_module_tmp="transformer.h.{}.attn",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
    ),
    "gpt_neox": dict(
        rewrite_module_tmp="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        layer_module_tmp="gpt_neox.layers.{}",
        mlp_module_tmp="gpt_neox.layers.{}.mlp",
        attn_module_tmp="gpt_neox.layers.{}.attention",
        ln_f_module="gpt_neox.final_layer_norm",
        lm_head_module="lm_head",  # "embed_out" before transformers 5
    ),
    "llama": _LLAMA_MODULES,
    "mistral": _LLAMA_MODULES,
    "qwen2": _LLAMA_MODULES,
}

_PUBLISHED_STATS = dict(mom2_dataset="wikipedia", mom2_n_samples=100000, mom2_dtype="float32")
_COMMON = dict(layer_selection="all", fact_token="subject_last", v_lr=0.5, kl_factor=0.0625, mom2_adjustment=True)

# (published depth, published layers, settings) per family.
_FAMILIES = {
    "gpt2": (48, range(13, 18), dict(v_num_grad_steps=20, v_weight_decay=0.5, clamp_norm_factor=0.75, mom2_update_weight=20000)),
    "gptj": (28, range(3, 9), dict(v_num_grad_steps=25, v_weight_decay=0.5, clamp_norm_factor=0.75, mom2_update_weight=15000)),
    "gpt_neox": (44, range(6, 11), dict(v_num_grad_steps=25, v_weight_decay=0.5, clamp_norm_factor=0.75, mom2_update_weight=15000)),
    "llama": (32, range(4, 9), dict(v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4, mom2_update_weight=15000)),
}
_FAMILY_OF = {"gpt2": "gpt2", "gptj": "gptj", "gpt_neox": "gpt_neox", "llama": "llama", "mistral": "llama", "qwen2": "llama"}


def num_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    raise HyperParamsError(f"cannot read the number of layers from {type(config).__name__}")


def scaled_layers(published: range, published_depth: int, depth: int) -> list[int]:
    """The published layer range moved to a model of `depth` layers, keeping its relative place."""
    if depth == published_depth:
        return list(published)
    lo = int(published.start * depth / published_depth)
    hi = max(lo, int((published.stop - 1) * depth / published_depth))
    hi = min(hi, depth - 2) if depth > 2 else 0
    return list(range(min(lo, hi), hi + 1))


def is_default_model(config) -> bool:
    """SmolLM2-135M: Llama layout, 30 layers, d_model 576, d_ff 1536."""
    return (
        getattr(config, "model_type", None) == "llama"
        and getattr(config, "num_hidden_layers", None) == 30
        and getattr(config, "hidden_size", None) == 576
        and getattr(config, "intermediate_size", None) == 1536
    )


def smollm2_135m() -> MEMITHyperParams:
    """Tuned for SmolLM2-135M (README.md, "Hyper-parameters and presets", says how): the Llama-family settings with
    lambda 2000, and statistics from 300 documents of 64 tokens sampled from the model itself,
    so the default model edits offline with no corpus at hand."""
    return MEMITHyperParams(
        layers=[4, 5, 6, 7, 8],
        v_num_grad_steps=25,
        v_loss_layer=29,
        v_weight_decay=1e-3,
        clamp_norm_factor=4,
        mom2_update_weight=2000,
        **_COMMON,
        **_LLAMA_MODULES,
        mom2_dataset="model",
        mom2_n_samples=300,
        mom2_dtype="float32",
    )


def for_config(config) -> MEMITHyperParams:
    """The preset for a HF config: the tuned default-model entry, else the family's published one."""
    if is_default_model(config):
        return smollm2_135m()
    model_type = getattr(config, "model_type", None)
    family = _FAMILY_OF.get(model_type)
    if family is None:
        raise HyperParamsError(
            f"no preset for model_type {model_type!r} (presets: {sorted(_FAMILY_OF)}). Pass a "
            "MEMITHyperParams with the module templates of your model: rewrite_module_tmp (the MLP "
            "output projection of layer {}), layer_module_tmp (the transformer block), mlp_module_tmp, "
            "attn_module_tmp, ln_f_module (final norm) and lm_head_module."
        )
    depth = num_layers(config)
    published_depth, published_layers, settings = _FAMILIES[family]
    return MEMITHyperParams(
        layers=scaled_layers(published_layers, published_depth, depth),
        v_loss_layer=depth - 1,
        **settings,
        **_COMMON,
        **MODULES[model_type],
        **_PUBLISHED_STATS,
    )


def for_model(model) -> MEMITHyperParams:
    """The preset for a loaded HF model (see `for_config`)."""
    hparams = for_config(model.config)
    names = dict(model.named_modules())
    if hparams.lm_head_module not in names and "embed_out" in names:  # GPT-NeoX in transformers 4
        hparams = hparams.replace(lm_head_module="embed_out")
    return hparams
