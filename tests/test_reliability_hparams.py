"""Hyper-parameters: every field is type- and range-checked at creation (constructor, from_dict,
from_json, replace); the error names the field and the value."""

import json
import math

import numpy as np
import pytest
import torch

import memit_fast
import tiny
from memit_fast import MEMITHyperParams
from memit_fast.errors import HyperParamsError
from test_hparams import GPTJ_JSON

NAN, INF = float("nan"), float("inf")

# (field, bad value, what the message says)
BAD = [
    ("layers", "23", "must be a list of layer indices"),
    ("layers", 5, "must be a list of layer indices"),
    ("layers", [3, "4"], r"layers\[1\] must be an integer"),
    ("layers", [3.0, 4], r"layers\[0\] must be an integer"),
    ("layers", [True, 4], r"layers\[0\] must be an integer"),
    ("layers", [-1, 4], r"layers\[0\] must be >= 0"),
    ("v_num_grad_steps", "25", "must be an integer"),
    ("v_num_grad_steps", 2.5, "must be an integer"),
    ("v_num_grad_steps", True, "must be an integer"),
    ("v_num_grad_steps", 0, "must be >= 1"),
    ("mom2_n_samples", 0, "must be >= 1"),
    ("mom2_n_samples", 1e5, "must be an integer"),
    ("v_loss_layer", "27", "must be an integer"),
    ("v_loss_layer", -1, "must be >= 0"),
    ("v_lr", NAN, "must be finite"),
    ("v_lr", INF, "must be finite"),
    ("v_lr", 0, "must be > 0"),
    ("v_lr", -0.5, "must be > 0"),
    ("v_lr", "0.5", "must be a number"),
    ("clamp_norm_factor", 0.0, "must be > 0"),
    ("clamp_norm_factor", NAN, "must be finite"),
    ("kl_factor", -0.1, "must be >= 0"),
    ("kl_factor", INF, "must be finite"),
    ("v_weight_decay", -1e-3, "must be >= 0"),
    ("v_weight_decay", NAN, "must be finite"),
    ("mom2_update_weight", -1, "must be >= 0"),
    ("mom2_update_weight", INF, "must be finite"),
    ("mom2_update_weight", "15000", "must be a number"),
    ("mom2_update_weight", False, "must be a number"),
    ("mom2_adjustment", "false", "must be true or false"),
    ("mom2_adjustment", 0, "must be true or false"),
    ("mom2_adjustment", None, "must be true or false"),
    ("fact_token", "middle", "is not one of"),
    ("fact_token", 1, "must be a non-empty string"),
    ("layer_selection", None, "must be a non-empty string"),
    ("rewrite_module_tmp", "transformer.h.mlp", "must contain '{}' once"),
    ("rewrite_module_tmp", "h.{}.{}", "must contain '{}' once"),
    ("rewrite_module_tmp", 7, "must be a non-empty string"),
    ("ln_f_module", "", "must be a non-empty string"),
    ("lm_head_module", ["lm_head"], "must be a non-empty string"),
    ("mom2_dataset", 3, "must be a non-empty string"),
    ("mom2_dtype", "float16", "must be 'float32' or 'float64'"),
]


def _check(exc, field, value, said):
    import re

    msg = str(exc.value)
    assert re.search(said, msg), msg
    assert field in msg, msg
    if not isinstance(value, list):
        assert repr(value) in msg or repr(float(value)) in msg, msg


@pytest.mark.parametrize("field,value,said", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_field_refused_by_every_constructor(field, value, said, tmp_path):
    good = MEMITHyperParams.from_dict(GPTJ_JSON)
    with pytest.raises(HyperParamsError) as e:
        MEMITHyperParams.from_dict(GPTJ_JSON | {field: value})
    _check(e, field, value, said)
    with pytest.raises(HyperParamsError) as e:
        MEMITHyperParams(**(GPTJ_JSON | {field: value}))
    _check(e, field, value, said)
    with pytest.raises(HyperParamsError) as e:
        good.replace(**{field: value})
    _check(e, field, value, said)
    path = tmp_path / "hp.json"
    path.write_text(json.dumps(GPTJ_JSON | {field: value}))  # NaN/Infinity: Python's JSON reads them back
    with pytest.raises(HyperParamsError) as e:
        MEMITHyperParams.from_json(path)
    _check(e, field, value, said)
    assert good.to_dict() == GPTJ_JSON  # the original is untouched


def test_accepted_conversions_keep_the_original_format():
    hp = MEMITHyperParams.from_dict(GPTJ_JSON | {"layers": (np.int64(3), 4), "v_lr": 1, "mom2_update_weight": np.float32(15000)})
    assert hp.layers == [3, 4] and all(type(v) is int for v in hp.layers)
    assert type(hp.v_lr) is float and hp.v_lr == 1.0 and type(hp.mom2_update_weight) is float
    assert MEMITHyperParams.from_dict(json.loads(json.dumps(hp.to_dict()))) == hp
    for preset in (memit_fast.presets.smollm2_135m(),):
        assert MEMITHyperParams.from_dict(preset.to_dict()) == preset
    assert math.isfinite(hp.kl_factor)


def test_malformed_json_and_non_object(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text('{"layers": [3, 4],')
    with pytest.raises(HyperParamsError, match=r"hp\.json is not valid JSON"):
        MEMITHyperParams.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(HyperParamsError, match="must be a JSON object / dict of fields, got list"):
        MEMITHyperParams.from_json(path)


@pytest.mark.parametrize("arch", tiny.ARCHS)
@pytest.mark.parametrize("field,value,said", [("layers", "23", "must be a list"), ("mom2_adjustment", "false", "true or false"), ("v_lr", NAN, "finite")])
def test_bad_hparams_for_a_model_leave_weights_alone(arch, field, value, said):
    m = tiny.model(arch, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(HyperParamsError, match=said) as e:
        memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS, tiny.hparams(m, **{field: value}), context_templates=tiny.TEMPLATES, progress=False)
    assert field in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
