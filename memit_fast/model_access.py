"""Access to the parts of a HF causal LM that MEMIT reads and writes, by the hparams' module templates."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import HyperParamsError
from .hparams import MEMITHyperParams
from .presets import num_layers


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise HyperParamsError(
            f"module {name!r} not found in {type(model).__name__}; check the *_module_tmp / *_module "
            "hyper-parameters against model.named_modules()"
        ) from None


@dataclass
class RewriteWeight:
    """The edited matrix W_out^l of one layer. `conv1d`: stored (d_ff, d_model) as GPT-2's Conv1D."""

    layer: int
    name: str  # parameter name, e.g. "model.layers.4.mlp.down_proj.weight"
    param: nn.Parameter
    conv1d: bool

    @property
    def d_ff(self) -> int:
        return self.param.shape[0] if self.conv1d else self.param.shape[1]

    @property
    def d_model(self) -> int:
        return self.param.shape[1] if self.conv1d else self.param.shape[0]

    def as_update(self, delta: torch.Tensor) -> torch.Tensor:
        """delta (d_model, d_ff) in the parameter's storage layout."""
        return delta.T if self.conv1d else delta


def rewrite_weights(model: nn.Module, hparams: MEMITHyperParams) -> list[RewriteWeight]:
    """The W_out^l of every critical layer, after checking hparams against the model."""
    check_hparams(model, hparams)
    out = []
    for layer in hparams.layers:
        module_name = hparams.rewrite_module_tmp.format(layer)
        module = get_module(model, module_name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise HyperParamsError(f"{module_name} has no 2-D weight; rewrite_module_tmp must name the MLP output projection")
        conv1d = not isinstance(module, nn.Linear) and type(module).__name__ == "Conv1D"
        out.append(RewriteWeight(layer, f"{module_name}.weight", weight, conv1d))
    d_model = hidden_size(model)
    for w in out:
        if w.d_model != d_model:
            raise HyperParamsError(
                f"{w.name} has shape {tuple(w.param.shape)}: no side equals d_model={d_model} in the expected place; "
                "rewrite_module_tmp must name the MLP output projection (d_ff -> d_model)"
            )
    return out


def in_features(module: nn.Module) -> int:
    """Input width of a Linear (weight (out, in)) or a GPT-2 Conv1D (weight (in, out))."""
    return module.weight.shape[1] if isinstance(module, nn.Linear) else module.weight.shape[0]


def hidden_size(model: nn.Module) -> int:
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    raise HyperParamsError(f"cannot read d_model from {type(config).__name__}")


def check_hparams(model: nn.Module, hparams: MEMITHyperParams) -> None:
    """Layer indices in range and every module template resolving to a module of the model."""
    depth = num_layers(model.config)
    bad = [layer for layer in hparams.layers if not 0 <= layer < depth]
    if bad:
        raise HyperParamsError(f"layers {bad} out of range: the model has {depth} layers (0..{depth - 1})")
    if not 0 <= hparams.v_loss_layer < depth:
        raise HyperParamsError(f"v_loss_layer {hparams.v_loss_layer} out of range 0..{depth - 1}")
    if hparams.v_loss_layer < hparams.layers[-1]:
        raise HyperParamsError(f"v_loss_layer {hparams.v_loss_layer} is below the last critical layer {hparams.layers[-1]}")
    for layer in hparams.layers:
        for tmp in (hparams.rewrite_module_tmp, hparams.layer_module_tmp):
            get_module(model, tmp.format(layer))
    get_module(model, hparams.layer_module_tmp.format(hparams.v_loss_layer))
    get_module(model, hparams.ln_f_module)
    get_module(model, hparams.lm_head_module)


def block_output(output):
    """The hidden states of a transformer block's output (a tensor, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_block_output(output, hidden: torch.Tensor):
    """`output` with its hidden states replaced by `hidden`, in the same structure."""
    if isinstance(output, (tuple, list)):
        return (hidden, *output[1:])
    return hidden


@contextlib.contextmanager
def hooks(*handles_or_none):
    """Remove the given hook handles on exit."""
    handles = [h for h in handles_or_none if h is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lm_head_params(model: nn.Module, hparams: MEMITHyperParams) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """(final norm module, lm_head weight (vocab, d_model), lm_head bias or None)."""
    ln_f = get_module(model, hparams.ln_f_module)
    head = get_module(model, hparams.lm_head_module)
    return ln_f, head.weight, getattr(head, "bias", None)


def cache_arg(module: nn.Module, cache) -> dict:
    """The key/value cache as the keyword this transformers version's forward takes: `cache`
    (transformers 5.2x, where `past_key_values` is deprecated) or `past_key_values` (before)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values": cache}


def returned_cache(output):
    """The cache a forward returned, under either name (its output's field, or attribute)."""
    fields = getattr(output, "__dataclass_fields__", None) or vars(output)
    return getattr(output, "cache" if "cache" in fields else "past_key_values")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def float_dtype(model: nn.Module) -> torch.dtype:
    """float32, or float64 for a float64 model: the dtype of keys, values and z."""
    return torch.promote_types(next(model.parameters()).dtype, torch.float32)
