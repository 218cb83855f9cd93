"""EasyEdit's YAML hyper-parameters and request lists."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPTJConfig, LlamaConfig

import memit_fast
import tiny
from memit_fast import presets
from memit_fast.easyedit import read_hparams, requests_from_easyedit
from memit_fast.edit_requests import normalize_requests
from memit_fast.errors import HyperParamsError, RequestError
from memit_fast.hparams import MEMITHyperParams

DATA = Path(__file__).parent / "data" / "easyedit"


def test_gptj_yaml_is_the_published_preset_and_run_settings_come_apart():
    hp, run = read_hparams(DATA / "gpt-j-6B.yaml")
    assert hp == presets.for_config(GPTJConfig(n_layer=28))
    assert isinstance(hp.v_lr, float) and hp.v_lr == 0.5  # "5e-1" is a string to YAML 1.1
    assert run == {"alg_name": "MEMIT", "model_name": "./hugging_cache/gpt-j-6B", "stats_dir": "./data/stats", "device": 0, "model_parallel": False}


def test_llama_yaml_and_classmethods():
    hp, run = read_hparams(DATA / "llama-7b.yaml")
    assert hp == presets.for_config(LlamaConfig(num_hidden_layers=32))
    assert hp.v_weight_decay == 1e-3
    assert run["max_length"] == 40 and run["batch_size"] == 1 and run["fp16"] is False
    assert MEMITHyperParams.from_yaml(DATA / "llama-7b.yaml") == hp
    assert MEMITHyperParams.from_hparams(str(DATA / "llama-7b")) == hp  # EasyEdit's form: no suffix
    assert MEMITHyperParams.from_hparams(yaml.safe_load((DATA / "llama-7b.yaml").read_text())) == hp


def test_alphaedit_yaml_returns_its_fields_as_run_settings():
    hp, run = read_hparams(DATA / "alphaedit-llama3-8b.yaml")
    assert hp.v_lr == 0.1 and hp.layers == [4, 5, 6, 7, 8]
    assert run["alg_name"] == "AlphaEdit"
    assert run["nullspace_threshold"] == 0.02 and run["L2"] == 10.0 and run["P_loc"] == "./null_space_project.pt"


def test_original_json_through_from_hparams(tmp_path):
    hp = presets.for_config(GPTJConfig(n_layer=28))
    path = tmp_path / "gpt-j.json"
    path.write_text(__import__("json").dumps(hp.to_dict()))
    assert MEMITHyperParams.from_hparams(path) == hp


def _yaml(tmp_path, **changes):
    data = yaml.safe_load((DATA / "gpt-j-6B.yaml").read_text()) | changes
    path = tmp_path / "h.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_errors(tmp_path):
    with pytest.raises(HyperParamsError, match="unknown hyper-parameter field.*'v_lr_typo'"):
        read_hparams(_yaml(tmp_path, v_lr_typo=0.1))
    with pytest.raises(HyperParamsError, match="'nullspace_threshold'"):  # AlphaEdit's field in a MEMIT file
        read_hparams(_yaml(tmp_path, nullspace_threshold=0.02))
    with pytest.raises(HyperParamsError, match="alg_name 'ROME'"):
        read_hparams(_yaml(tmp_path, alg_name="ROME"))
    with pytest.raises(HyperParamsError, match="v_lr must be a number"):
        read_hparams(_yaml(tmp_path, v_lr="fast"))
    with pytest.raises(HyperParamsError, match="mom2_n_samples must be an integer"):
        read_hparams(_yaml(tmp_path, mom2_n_samples="1.5e0"))
    with pytest.raises(HyperParamsError, match="not found"):
        read_hparams(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(HyperParamsError, match="mapping"):
        read_hparams(tmp_path / "list.yaml")
    data = yaml.safe_load((DATA / "gpt-j-6B.yaml").read_text())
    del data["kl_factor"]
    with pytest.raises(HyperParamsError, match="missing.*kl_factor"):
        read_hparams(data)


def test_requests_from_easyedit_lists():
    reqs = requests_from_easyedit(
        prompts=["Michael Jordan plays the sport of", "What is the capital of France? France's capital is"],
        target_new=["baseball", "Rome"],
        subject=["Michael Jordan", "France"],
        ground_truth=["basketball", "Paris"],
        rephrase_prompts=["Jordan's sport is", "France has its capital in"],
    )
    assert reqs[0] == {
        "prompt": "{} plays the sport of",
        "subject": "Michael Jordan",
        "target_new": {"str": "baseball"},
        "target_true": {"str": "basketball"},
        "rephrase_prompt": "Jordan's sport is",
    }
    assert reqs[1]["prompt"] == "What is the capital of {}? France's capital is"  # first occurrence only
    assert [r.target for r in normalize_requests(reqs)] == [" baseball", " Rome"]
    single = requests_from_easyedit("The capital of France is", "Rome", "France")
    assert single == [{"prompt": "The capital of {} is", "subject": "France", "target_new": {"str": "Rome"}}]


def test_requests_from_easyedit_errors():
    with pytest.raises(RequestError, match="subject 'Germany' not found in prompt 'The capital of France is'"):
        requests_from_easyedit(["The capital of France is"], ["Rome"], ["Germany"])
    with pytest.raises(RequestError, match="differ in length"):
        requests_from_easyedit(["a b", "c d"], ["x"], ["a", "c"])
    with pytest.raises(RequestError, match="target_new"):
        requests_from_easyedit(["a b"], [""], ["a"])


def test_easyedit_inputs_edit_a_tiny_model():
    """A YAML-format dict for the tiny Llama and EasyEdit lists drive apply end to end."""
    m = tiny.model("llama", dtype=torch.float32)
    data = yaml.safe_load((DATA / "llama-7b.yaml").read_text()) | {"layers": [2, 3], "v_loss_layer": 5, "v_num_grad_steps": 4, "mom2_adjustment": False}
    hp, _ = read_hparams(data)
    reqs = requests_from_easyedit(["Michael Jordan plays the sport of"], ["baseball"], ["Michael Jordan"])
    w = m.model.layers[3].mlp.down_proj.weight
    before = w.detach().clone()
    memit_fast.apply(m, tiny.tokenizer(), reqs, hp, context_templates=tiny.TEMPLATES, progress=False)
    assert not torch.equal(before, w)
