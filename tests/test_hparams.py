"""Hyper-parameters in the original JSON format, and presets per architecture."""

import json

import pytest
from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

from memit_fast import MEMITHyperParams, presets
from memit_fast.errors import HyperParamsError

# The original hparams/MEMIT/EleutherAI_gpt-j-6B.json, field for field.
GPTJ_JSON = {
    "layers": [3, 4, 5, 6, 7, 8],
    "clamp_norm_factor": 0.75,
    "layer_selection": "all",
    "fact_token": "subject_last",
    "v_num_grad_steps": 25,
    "v_lr": 5e-1,
    "v_loss_layer": 27,
    "v_weight_decay": 0.5,
    "kl_factor": 0.0625,
    "mom2_adjustment": True,
    "mom2_update_weight": 15000,
    "rewrite_module_tmp": "transformer.h.{}.mlp.fc_out",
    "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f",
    "lm_head_module": "lm_head",
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32",
}


def test_from_json_matches_the_gptj_preset(tmp_path):
    path = tmp_path / "EleutherAI_gpt-j-6B.json"
    path.write_text(json.dumps(GPTJ_JSON))
    hp = MEMITHyperParams.from_json(path)
    assert hp.to_dict() == GPTJ_JSON
    assert presets.for_config(GPTJConfig()) == hp  # GPTJConfig() is GPT-J 6B's shape


def test_gpt2_xl_preset():
    hp = presets.for_config(GPT2Config(n_layer=48, n_embd=1600, n_head=25))
    assert (hp.layers, hp.v_loss_layer, hp.mom2_update_weight, hp.v_num_grad_steps) == ([13, 14, 15, 16, 17], 47, 20000, 20)
    assert hp.rewrite_module_tmp == "transformer.h.{}.mlp.c_proj"


def test_presets_scale_to_depth():
    assert presets.for_config(LlamaConfig(num_hidden_layers=32)).layers == [4, 5, 6, 7, 8]
    assert presets.for_config(GPTNeoXConfig(num_hidden_layers=44)).layers == [6, 7, 8, 9, 10]
    small = presets.for_config(GPT2Config(n_layer=12))
    assert small.layers == [3, 4] and small.v_loss_layer == 11
    for depth in (2, 3, 6, 80):
        layers = presets.for_config(LlamaConfig(num_hidden_layers=depth)).layers
        assert layers and 0 <= layers[0] and layers[-1] < depth


def test_unknown_and_missing_fields(tmp_path):
    with pytest.raises(HyperParamsError, match="unknown hyper-parameter field.*'stats_dir'"):
        MEMITHyperParams.from_dict(GPTJ_JSON | {"stats_dir": "x"})
    with pytest.raises(HyperParamsError, match="missing.*'kl_factor'"):
        MEMITHyperParams.from_dict({k: v for k, v in GPTJ_JSON.items() if k != "kl_factor"})
    for bad in ({"layers": []}, {"layers": [5, 3]}, {"fact_token": "middle"}, {"mom2_dtype": "float16"}, {"layer_module_tmp": "transformer.h"}):
        with pytest.raises(HyperParamsError):
            MEMITHyperParams.from_dict(GPTJ_JSON | bad)


def test_unknown_architecture_says_what_to_pass():
    class Config:
        model_type = "mamba"

    with pytest.raises(HyperParamsError, match="rewrite_module_tmp"):
        presets.for_config(Config())


def test_default_model_preset():
    cfg = LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536)
    assert presets.is_default_model(cfg)
    assert presets.for_config(cfg) == presets.smollm2_135m()
