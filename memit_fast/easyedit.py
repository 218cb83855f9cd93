"""EasyEdit compatibility: its MEMIT / AlphaEdit YAML hyper-parameter files and its request lists.

An EasyEdit file (`hparams/MEMIT/gpt-j-6B.yaml`, `hparams/AlphaEdit/llama3-8b.yaml`) holds the
method's fields under the original JSON names beside run settings (alg_name, model_name,
device, stats_dir, batch_size, max_length, model_parallel, fp16, ...). `read_hparams` splits
them: the method's fields make a MEMITHyperParams, the run settings come back as a dict.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import HyperParamsError, RequestError
from .hparams import MEMITHyperParams

ALGORITHMS = ("MEMIT", "AlphaEdit")

# EasyEdit's run settings (its HyperParams base class and the MEMIT/AlphaEdit dataclasses),
# returned to the caller as they are.
RUN_FIELDS = frozenset(
    {"alg_name", "model_name", "device", "stats_dir", "batch_size", "max_length", "model_parallel", "fp16", "use_chat_template", "sequential_edit"}
)
# AlphaEdit's own fields: its null-space projection (threshold, file of the projection) and the
# L2 regulariser. memit_fast computes MEMIT's update; these are returned, never applied.
ALPHAEDIT_FIELDS = frozenset({"nullspace_threshold", "L2", "P_loc"})

_METHOD_TYPES = {f.name: f.type for f in dataclasses.fields(MEMITHyperParams)}
_NUMBER_TYPES = _METHOD_TYPES | {"nullspace_threshold": "float", "L2": "float"}


def read_hparams(source: str | Path | dict) -> tuple[MEMITHyperParams, dict]:
    """(MEMITHyperParams, run settings) from an EasyEdit YAML file, a path without its `.yaml`
    suffix (as EasyEdit's from_hparams takes it), the original's JSON file, or a dict in either format.

    The run settings dict holds the EasyEdit run fields present (alg_name, model_name, device, ...)
    and, for an AlphaEdit file, its fields nullspace_threshold / L2 / P_loc. A field that is none
    of these nor a MEMIT field raises HyperParamsError naming it; so does an alg_name other than
    MEMIT or AlphaEdit. Numbers written as strings ("5e-1": YAML 1.1 reads it as text) become numbers.
    """
    data = dict(source) if isinstance(source, dict) else _read_file(Path(source))
    alg = data.get("alg_name", "MEMIT")
    if alg not in ALGORITHMS:
        raise HyperParamsError(f"alg_name {alg!r} is not one of {ALGORITHMS}")
    allowed_extra = RUN_FIELDS | (ALPHAEDIT_FIELDS if alg == "AlphaEdit" else frozenset())
    unknown = sorted(k for k in data if k not in _METHOD_TYPES and k not in allowed_extra)
    if unknown:
        raise HyperParamsError(
            f"unknown hyper-parameter field(s) {unknown} for alg_name {alg!r}; known: the MEMIT fields "
            f"{sorted(_METHOD_TYPES)}, the run settings {sorted(RUN_FIELDS)}"
            + (f" and AlphaEdit's {sorted(ALPHAEDIT_FIELDS)}" if alg == "AlphaEdit" else "")
        )
    data = {k: _coerce(k, v) for k, v in data.items()}
    method = {k: v for k, v in data.items() if k in _METHOD_TYPES}
    run = {k: v for k, v in data.items() if k not in _METHOD_TYPES}
    return MEMITHyperParams.from_dict(method), run


def _read_file(path: Path) -> dict:
    if not path.exists() and path.suffix not in (".yaml", ".yml", ".json") and path.with_suffix(path.suffix + ".yaml").exists():
        path = path.with_suffix(path.suffix + ".yaml")
    if not path.exists():
        raise HyperParamsError(f"hyper-parameter file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise HyperParamsError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise HyperParamsError(f"{path} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def _coerce(name: str, value):
    """A number written as a string ("5e-1", "1e-3") to the field's type, as EasyEdit does."""
    kind = _NUMBER_TYPES.get(name)
    if isinstance(value, str) and kind in ("float", "int"):
        try:
            number = float(value)
        except ValueError:
            raise HyperParamsError(f"{name} must be a number, got {value!r}") from None
        if kind == "int" and number != int(number):
            raise HyperParamsError(f"{name} must be an integer, got {value!r}")
        return int(number) if kind == "int" else number
    return value


def requests_from_easyedit(prompts, target_new, subject, ground_truth=None, rephrase_prompts=None) -> list[dict]:
    """EasyEdit's editor.edit lists -> the original request dicts.

    prompts[i] holds subject[i] written inline ("Michael Jordan plays the sport of"); its first
    occurrence becomes `{}`. A prompt that already holds `{}` is kept as it is. Each argument is a
    string or a list of the same length as prompts. ground_truth[i] goes to target_true, and
    rephrase_prompts[i] to rephrase_prompt (EasyEdit's key), both as given.
    Errors (RequestError): lists of different lengths, a subject not found in its prompt.
    """
    columns = {"prompts": prompts, "target_new": target_new, "subject": subject, "ground_truth": ground_truth, "rephrase_prompts": rephrase_prompts}
    columns = {k: ([v] if isinstance(v, str) else list(v)) for k, v in columns.items() if v is not None}
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) != 1:
        raise RequestError(f"the EasyEdit lists differ in length: {lengths}")
    out = []
    for i in range(lengths["prompts"]):
        prompt, subj, target = columns["prompts"][i], columns["subject"][i], columns["target_new"][i]
        for name, value in (("prompts", prompt), ("subject", subj), ("target_new", target)):
            if not isinstance(value, str) or not value.strip():
                raise RequestError(f"request {i}: {name}[{i}] must be a non-empty string, got {value!r}")
        if "{}" not in prompt:
            at = prompt.find(subj)
            if at < 0:
                raise RequestError(f"request {i}: subject {subj!r} not found in prompt {prompt!r}")
            prompt = prompt[:at] + "{}" + prompt[at + len(subj) :]
        request = {"prompt": prompt, "subject": subj, "target_new": {"str": target}}
        if "ground_truth" in columns:
            request["target_true"] = {"str": columns["ground_truth"][i]}
        if "rephrase_prompts" in columns:
            request["rephrase_prompt"] = columns["rephrase_prompts"][i]
        out.append(request)
    return out
