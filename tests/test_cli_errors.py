"""Every user error of the command line prints one line `memit-fast: error: ...` and exits with
code 2, before any model is loaded; --debug adds the traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from memit_fast import cli
from memit_fast.errors import StatsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path):
    """Good inputs to spoil one at a time, and a model loader that must not be called."""
    (tmp_path / "reqs.json").write_text(json.dumps(tiny.REQUESTS))
    (tmp_path / "zsre.json").write_text(json.dumps([{"src": "What is the capital of France?", "subject": "France", "answers": ["Rome"],
                                                     "rephrase": "France's capital?", "loc": "nq question: who sang x", "loc_ans": "y"}]))
    (tmp_path / "bad.json").write_text('[{"prompt": "{} is", ')
    (tmp_path / "model").mkdir()  # a directory without config.json
    (tmp_path / "corpus.txt").write_text("one document\nanother document\n")
    return tmp_path


@pytest.fixture(autouse=True)
def no_model_work(monkeypatch):
    def load(self):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(cli.ModelSpec, "load", load)


def _run(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    return code, lines


def put(path: Path, text: str) -> None:
    path.write_text(text)


def _edit(f, *extra):
    return ["edit", "--requests", str(f / "reqs.json"), "--out", str(f / "out"), "--device", "cpu", *extra]


CASES = {
    "missing requests file": (lambda f: ["edit", "--requests", str(f / "nope.json"), "--out", str(f / "out")], "requests file not found"),
    "malformed JSON": (lambda f: ["edit", "--requests", str(f / "bad.json"), "--out", str(f / "out")], "is not valid JSON"),
    "requests file is a directory": (lambda f: ["edit", "--requests", str(f / "model"), "--out", str(f / "out")], "is a directory"),
    "RequestError": (lambda f: put(f / "reqs.json", json.dumps([{"prompt": "no slot", "subject": "x", "target_new": {"str": "y"}}]))
                     or _edit(f), "prompt must contain"),
    "zsRE records given to edit": (lambda f: ["edit", "--requests", str(f / "zsre.json"), "--out", str(f / "out")], "holds zsRE records"),
    "--limit 0": (lambda f: _edit(f, "--limit", "0"), "argument --limit: must be >= 1"),
    "--limit negative": (lambda f: _edit(f, "--limit", "-3"), "argument --limit: must be >= 1"),
    "--limit not a number": (lambda f: _edit(f, "--limit", "all"), "is not an integer"),
    "existing --out": (lambda f: (f / "out").mkdir() or put(f / "out" / "x", "") or _edit(f), "pass --overwrite"),
    "--out is a file": (lambda f: put(f / "out", "") or _edit(f, "--overwrite"), "is not a directory"),
    "missing --model directory": (lambda f: _edit(f, "--model", str(f / "no-such-model")), "model directory not found"),
    "--model without config.json": (lambda f: _edit(f, "--model", str(f / "model")), "no config.json"),
    "missing --model-gguf": (lambda f: _edit(f, "--model-gguf", str(f / "m.gguf")), "GGUF file not found"),
    "--model and --model-gguf": (lambda f: _edit(f, "--model", str(f / "model"), "--model-gguf", "m.gguf"), "not both"),
    "missing --hparams": (lambda f: _edit(f, "--hparams", str(f / "hp.json")), "hyper-parameters file not found"),
    "malformed --hparams": (lambda f: _edit(f, "--hparams", str(f / "bad.json")), "is not valid JSON"),
    "HyperParamsError": (lambda f: put(f / "hp.json", '{"layerz": [1]}') or _edit(f, "--hparams", str(f / "hp.json")),
                         "unknown hyper-parameter field"),
    "missing --corpus file": (lambda f: _edit(f, "--corpus", str(f / "wiki.txt")), "corpus file not found"),
    "--corpus directory": (lambda f: _edit(f, "--corpus", str(f / "model")), "is a directory"),
    "bad --device": (lambda f: _edit(f, "--device", "gpu7"), "is not a device"),
    "bad --dtype": (lambda f: _edit(f, "--dtype", "int8"), "invalid choice"),
    "--n-samples 0": (lambda f: _edit(f, "--n-samples", "0"), "argument --n-samples: must be >= 1"),
    "--memory-cap-gib 0": (lambda f: _edit(f, "--memory-cap-gib", "0"), "must be a positive number of GiB"),
    "--memory-cap-gib nan": (lambda f: _edit(f, "--memory-cap-gib", "nan"), "must be a positive number of GiB"),
    "--memory-cap-gib text": (lambda f: _edit(f, "--memory-cap-gib", "lots"), "is not a number"),
    "unknown option": (lambda f: _edit(f, "--frobnicate"), "unrecognized arguments"),
    "missing --out": (lambda f: ["edit", "--requests", str(f / "reqs.json")], "required: --out"),
    "unknown command": (lambda f: ["frobnicate"], "invalid choice"),
    "zsRE file as --kind counterfact": (lambda f: ["eval", "--data", str(f / "zsre.json"), "--kind", "counterfact"],
                                        "holds zsre records, not counterfact"),
    "eval data not a list": (lambda f: put(f / "d.json", '{"a": 1}') or ["eval", "--data", str(f / "d.json")], "non-empty JSON list"),
    "eval data empty": (lambda f: put(f / "d.json", "[]") or ["eval", "--data", str(f / "d.json")], "non-empty JSON list"),
    "eval data of unknown records": (lambda f: ["eval", "--data", str(f / "reqs.json")], "neither CounterFact nor zsRE"),
    "eval record missing a key": (lambda f: put(f / "d.json", json.dumps(json.loads((f / "zsre.json").read_text()) * 2 + [{"src": "x"}]))
                                  or ["eval", "--data", str(f / "d.json")], "record 2 is not a zsre record"),
    "eval --edits 0": (lambda f: ["eval", "--data", str(f / "zsre.json"), "--edits", "0"], "must be >= 1"),
    "eval existing --out": (lambda f: (f / "out").mkdir() or put(f / "out" / "results.json", "{}")
                            or ["eval", "--data", str(f / "zsre.json"), "--out", str(f / "out")], "pass --overwrite"),
    "eval missing --data": (lambda f: ["eval", "--data", str(f / "nope.json")], "data file not found"),
    "eval --method without --sequential": (lambda f: ["eval", "--data", str(f / "zsre.json"), "--method", "alphaedit"], "go with --sequential"),
    "eval unknown --method": (lambda f: ["eval", "--data", str(f / "zsre.json"), "--sequential", "--method", "rome"], "distinct methods of memit, alphaedit"),
    "eval --sequential --no-edit": (lambda f: ["eval", "--data", str(f / "zsre.json"), "--sequential", "--no-edit"], "does not go with --no-edit"),
    "stats bad --layers": (lambda f: ["stats", "--layers", "2,x"], "not a comma-separated list"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_and_exit_code_2(files, capsys, case):
    make_argv, expected = CASES[case]
    code, lines = _run(capsys, make_argv(files))
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("memit-fast: error: ") and expected in lines[0], lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(files, capsys):
    code, lines = _run(capsys, _edit(files, "--device", "cuda"))
    assert code == 2 and lines == ["memit-fast: error: --device cuda: no CUDA device is available"]


def test_memit_error_after_loading_is_one_line(files, capsys, monkeypatch):
    """A MemitError from the library (here StatsError from apply) is a user error too; --debug shows its traceback."""
    import memit_fast.api

    m = tiny.model("gpt2")
    monkeypatch.setattr(cli.ModelSpec, "load", lambda self: (m, tiny.tokenizer(), tiny.hparams(m)))

    def fail(*a, **k):
        raise StatsError("statistics of layer 2 are (3, 3),\n the layer's keys have d_ff=256")

    monkeypatch.setattr(memit_fast.api, "apply", fail)
    code, lines = _run(capsys, _edit(files))
    assert code == 2 and lines == ["memit-fast: error: statistics of layer 2 are (3, 3), the layer's keys have d_ff=256"]
    assert not (files / "out").exists()

    code, lines = _run(capsys, _edit(files, "--debug"))
    assert code == 2 and lines[0] == "Traceback (most recent call last):" and any(line.startswith("memit_fast.errors.StatsError") for line in lines)
    assert lines[-1].startswith("memit-fast: error: statistics of layer 2")


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: memit-fast" in capsys.readouterr().err


def test_every_option_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_common_options_are_the_same_on_every_model_command():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices

    def options(p):
        return {s: (a.dest, a.choices, a.type, a.help) for a in p._actions for s in a.option_strings}

    common = {"--model", "--model-gguf", "--hparams", "--corpus", "--n-samples", "--cache-dir", "--device", "--dtype",
              "--seed", "--quiet", "--debug"}  # fmt: skip
    ref = options(sub["edit"])
    for name in ("demo", "stats", "eval"):
        got = options(sub[name])
        assert {o: got[o] for o in common} == {o: ref[o] for o in common}, name
    assert "--overwrite" in options(sub["eval"]) and options(sub["eval"])["--out"][0] == "out"


def _subprocess(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_python_m_memit_fast_help_version_and_error():
    r = _subprocess("memit_fast", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: memit-fast") and "info" in r.stdout
    from memit_fast import __version__

    r = _subprocess("memit_fast", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"memit-fast {__version__}"
    r = _subprocess("memit_fast", "edit", "--requests", "no-such-file.json", "--out", "no-such-dir")
    assert r.returncode == 2 and r.stderr.splitlines() == ["memit-fast: error: requests file not found: no-such-file.json"]


def test_python_m_memit_fast_eval_error():
    r = _subprocess("memit_fast.eval", "--data", "no-such-file.json")
    assert r.returncode == 2 and r.stderr.splitlines() == ["memit-fast: error: data file not found: no-such-file.json"]
