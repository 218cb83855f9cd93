"""The commands end to end on a tiny model saved as a Hugging Face directory: edit writes its
directory atomically and refuses to overwrite it, --quiet silences transformers too, the log
says what happened, and eval writes results.json and report.md into its --out directory."""

import json

import pytest
import transformers

import tiny
from memit_fast import cli
from memit_fast.artifacts import load_edits


def _edit_files(out):
    """{parameter name: dense delta} of the edit saved in `out` (memit_fast's artifact format)."""
    return {e.name: e.delta() for e in load_edits(out).layers}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    m = tiny.model("gpt2", dtype=__import__("torch").float32)
    m.save_pretrained(d / "model")
    tiny.tokenizer().save_pretrained(d / "model")
    hp = tiny.hparams(m, mom2_n_samples=60, mom2_dataset="model")
    (d / "hp.json").write_text(json.dumps(hp.to_dict()))
    (d / "corpus.txt").write_text("\n".join(tiny.corpus_lines(60)))
    (d / "reqs.json").write_text(json.dumps([dict(r, case_id=i) for i, r in enumerate(tiny.REQUESTS)]))
    zsre = [{"src": f"What sport does {r['subject']} play?", "subject": r["subject"], "answers": [r["target_new"]["str"]],
             "rephrase": f"{r['subject']} plays which sport?", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
            for r in tiny.REQUESTS[:2]]  # fmt: skip
    (d / "zsre.json").write_text(json.dumps(zsre))
    return d


@pytest.fixture(autouse=True)
def transformers_bars_back():
    yield
    transformers.utils.logging.enable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()


def _common(d, *extra):
    return ["--model", str(d / "model"), "--hparams", str(d / "hp.json"), "--corpus", str(d / "corpus.txt"),
            "--cache-dir", str(d / "cache"), "--device", "cpu", *extra]  # fmt: skip


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_edit_writes_its_directory_once_and_refuses_to_overwrite(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "edit"
    argv = ["edit", "--requests", str(setup / "reqs.json"), "--out", str(out), "--limit", "2", *_common(setup)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "edited 2 facts" in captured.out
    assert "memit_fast.api: statistics: corpus" in captured.err and "memit_fast.api: update: solve method auto" in captured.err
    deltas = _edit_files(out)
    assert len(deltas) == 2 and any(t.abs().max() > 0 for t in deltas.values())
    assert _leftovers(tmp_path) == []

    def no_load(self):
        raise AssertionError("the model was loaded although --out exists")

    with monkeypatch.context() as mp:
        mp.setattr(cli.ModelSpec, "load", no_load)
        assert cli.main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert _edit_files(out).keys() == deltas.keys()

    def broken_save(out_dir, *a):
        (out_dir / "edits.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device", str(out_dir / "edits.safetensors"))

    monkeypatch.setattr(cli, "save_edit", broken_save)
    code = cli.main([*argv, "--overwrite", "--quiet"])
    assert code == 2 and capsys.readouterr().err.startswith("memit-fast: error: No space left on device: ")
    assert _edit_files(out).keys() == deltas.keys()  # the old result is intact
    assert _leftovers(tmp_path) == []


def test_edit_passes_the_memory_cap_to_apply(setup, tmp_path, capsys):
    """--memory-cap-gib reaches apply: on the CPU it says that it changes nothing (and edits)."""
    out = tmp_path / "edit"
    assert cli.main(["edit", "--requests", str(setup / "reqs.json"), "--out", str(out), "--limit", "1", "--memory-cap-gib", "4", *_common(setup)]) == 0
    assert "changes nothing" in capsys.readouterr().err
    assert (out / "edits.json").exists()


def test_quiet_silences_transformers_and_the_log(setup, tmp_path, capsys):
    out = tmp_path / "edit"
    assert cli.main(["edit", "--requests", str(setup / "reqs.json"), "--out", str(out), "--quiet", *_common(setup)]) == 0
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert transformers.utils.logging.get_verbosity() == transformers.logging.ERROR
    assert capsys.readouterr().err == ""
    assert (out / "edits.json").exists()


def test_edit_saves_a_peft_adapter_and_stats_export_import_round_trip(setup, tmp_path, capsys):
    out = tmp_path / "peft"
    assert cli.main(["edit", "--requests", str(setup / "reqs.json"), "--out", str(out), "--save", "peft", "--quiet", *_common(setup)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (out / "adapter_model.safetensors").exists()
    npz = tmp_path / "npz"
    assert cli.main(["stats", "--export", str(npz), "--quiet", *_common(setup)]) == 0
    assert "exported to" in capsys.readouterr().out
    common = _common(setup)
    common[common.index("--cache-dir") + 1] = str(tmp_path / "fresh-cache")
    assert cli.main(["stats", "--import", str(npz), "--quiet", *common]) == 0
    assert capsys.readouterr().out.count("imported into") == 2


def test_eval_writes_its_out_directory(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--data", str(setup / "zsre.json"), "--out", str(out), "--quiet", *_common(setup)]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "zsre" and res["n_records"] == 2 and res["after"] is not None
    assert (out / "report.md").read_text() in capsys.readouterr().out
    assert cli.main(argv) == 2  # exists
    assert cli.main([*argv, "--overwrite", "--no-edit"]) == 0
    assert json.loads((out / "results.json").read_text())["after"] is None
    assert _leftovers(tmp_path) == []
