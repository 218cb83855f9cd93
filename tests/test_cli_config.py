"""The run configuration (EditConfig, the MEMIT_FAST_* settings) and apply's front door: the
original's positional order, config=, unknown settings refused, and cache_template (z per request)."""

from pathlib import Path

import pytest
import torch

import memit_fast
import tiny
from memit_fast import api, config
from memit_fast.config import ENV, EditConfig, env_setting
from memit_fast.errors import ConfigError, RequestError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_come_from_the_environment(monkeypatch, tmp_path):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    cfg = EditConfig()
    assert cfg.chunk_tokens is None and cfg.cache_dir == Path.home() / ".cache" / "memit_fast"
    assert env_setting("MEMIT_FAST_POTRF_BLOCK") == 2048 and env_setting("MEMIT_FAST_NATIVE") is True
    assert env_setting("MEMIT_FAST_DEFAULT_GGUF") is None
    monkeypatch.setenv("MEMIT_FAST_Z_CHUNK_TOKENS", "123")
    monkeypatch.setenv("MEMIT_FAST_CACHE", str(tmp_path))
    monkeypatch.setenv("MEMIT_FAST_POTRS_BLOCK", "0")
    monkeypatch.setenv("MEMIT_FAST_NATIVE", "0")
    cfg = EditConfig()
    assert cfg.chunk_tokens == 123 and cfg.cache_dir == tmp_path
    assert env_setting("MEMIT_FAST_POTRS_BLOCK") == 0 and env_setting("MEMIT_FAST_NATIVE") is False
    assert EditConfig(chunk_tokens=7, cache_dir=None).chunk_tokens == 7  # given values win; None: the environment's
    assert EditConfig(cache_dir=None).cache_dir == tmp_path


@pytest.mark.parametrize(
    "name, value",
    [("MEMIT_FAST_Z_CHUNK_TOKENS", "many"), ("MEMIT_FAST_Z_CHUNK_TOKENS", "0"), ("MEMIT_FAST_POTRF_BLOCK", "-1"), ("MEMIT_FAST_NATIVE", "yes"),
     ("MEMIT_FAST_MEMORY_CAP_GIB", "lots"), ("MEMIT_FAST_MEMORY_CAP_GIB", "0"), ("MEMIT_FAST_MEMORY_CAP_GIB", "nan")],
)
def test_a_bad_environment_value_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        env_setting(name)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mode": "quick"}, "mode must be one of"),
        ({"solve_method": "lu"}, "solve_method must be one of"),
        ({"chunk_tokens": 0}, "chunk_tokens must be a positive integer"),
        ({"keys_batch_tokens": 1.5}, "keys_batch_tokens must be a positive integer"),
        ({"seed": "0"}, "seed must be an integer"),
        ({"memory_cap_gib": -4}, "memory_cap_gib must be a positive number"),
        ({"memory_cap_gib": float("nan")}, "memory_cap_gib must be a positive number"),
        ({"memory_cap_gib": True}, "memory_cap_gib must be a positive number"),
        ({"chunk_size": 10}, r"unknown setting\(s\) \['chunk_size'\]"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        EditConfig.make(**settings)
    with pytest.raises(ConfigError, match=message):
        EditConfig().replace(**settings)


def test_the_readme_documents_every_environment_variable():
    readme = (ROOT / "README.md").read_text()
    for name in ENV:
        assert f"`{name}`" in readme, name


def _setup(arch="gpt2"):
    m = tiny.model(arch)
    hp = tiny.hparams(m)
    return m, hp, tiny.stats(m, hp)


def _params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_positional_call_config_and_keywords_agree():
    m, hp, stats = _setup()
    tok, before = tiny.tokenizer(), _params(m)
    # the original's order: (model, tok, requests, hparams, copy, return_orig_weights, cache_template)
    _, orig = memit_fast.apply(m, tok, tiny.REQUESTS, hp, False, True, None, stats=stats, context_templates=tiny.TEMPLATES, progress=False)
    assert set(orig) == {f"transformer.h.{layer}.mlp.c_proj.weight" for layer in hp.layers}
    by_keywords = _params(m)
    memit_fast.restore(m, orig)
    cfg = EditConfig(stats=stats, context_templates=tiny.TEMPLATES, progress=False, solve_method="dense")
    memit_fast.apply(m, tok, tiny.REQUESTS, hp, config=cfg, solve_method="auto")  # keywords over config
    for n, p in m.named_parameters():
        assert torch.equal(p, by_keywords[n]), n
    memit_fast.restore(m, orig)
    with pytest.raises(ConfigError, match="unknown setting"):
        memit_fast.apply(m, tok, tiny.REQUESTS, hp, stats=stats, progres=False)
    with pytest.raises(ConfigError, match="config must be an EditConfig"):
        memit_fast.apply(m, tok, tiny.REQUESTS, hp, config={"progress": False})
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


@pytest.fixture
def z_calls(monkeypatch):
    """The number of requests each compute_targets call gets."""
    calls = []
    real = api.compute_targets

    def spy(model, tok, requests, *a, **k):
        calls.append(len(requests))
        return real(model, tok, requests, *a, **k)

    monkeypatch.setattr(api, "compute_targets", spy)
    return calls


def test_cache_template_reads_and_computes_only_missing_z(tmp_path, z_calls, caplog):
    m, hp, stats = _setup("llama")
    tok = tiny.tokenizer()
    reqs = [dict(r, case_id=10 + i) for i, r in enumerate(tiny.REQUESTS)]
    template = str(tmp_path / "z" / "{}_{}" / "case_{}.safetensors")  # the original's three fields
    kw = dict(stats=stats, context_templates=tiny.TEMPLATES, progress=False, return_orig_weights=True)

    _, orig = memit_fast.apply(m, tok, reqs, hp, cache_template=template, **kw)
    edited = _params(m)
    files = [Path(template.format(hp.layers[-1], hp.clamp_norm_factor, 10 + i)) for i in range(3)]
    assert z_calls == [3] and all(f.exists() for f in files)
    memit_fast.restore(m, orig)

    memit_fast.apply(m, tok, reqs, hp, cache_template=template, **kw)  # every z from the files
    assert z_calls == [3] and all(torch.equal(p, edited[n]) for n, p in m.named_parameters())
    memit_fast.restore(m, orig)

    files[1].unlink()
    files[2].write_bytes(b"not a safetensors file")
    memit_fast.apply(m, tok, reqs, hp, cache_template=template, **kw)  # two computed again, one read
    assert z_calls == [3, 2] and files[1].exists() and "cannot be read" in caplog.text
    for n, p in m.named_parameters():
        torch.testing.assert_close(p, edited[n], rtol=1e-9, atol=1e-12)
    memit_fast.restore(m, orig)

    other = [dict(reqs[0], target_new={"str": "hockey"})] + reqs[1:]  # same case_id, another target
    memit_fast.apply(m, tok, other, hp, cache_template=template, **kw)
    assert z_calls == [3, 2, 1] and "computed for another request" in caplog.text
    memit_fast.restore(m, orig)


@pytest.mark.parametrize(
    "template, requests, settings, error, message",
    [
        ("z.safetensors", None, {}, ConfigError, "names one file for every request"),
        ("{layer}/{case}.safetensors", None, {}, ConfigError, "does not format"),
        ("{case_id}.safetensors", tiny.REQUESTS, {}, RequestError, "needs a case_id"),
        ("{case_id}.safetensors", None, {"mode": "reference"}, ConfigError, "fast mode only"),
    ],
)
def test_cache_template_errors(tmp_path, template, requests, settings, error, message):
    m, hp, stats = _setup()
    before = _params(m)
    reqs = requests or [dict(r, case_id=i) for i, r in enumerate(tiny.REQUESTS)]
    with pytest.raises(error, match=message):
        memit_fast.apply(m, tiny.tokenizer(), reqs, hp, cache_template=str(tmp_path / template), stats=stats, progress=False, **settings)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_version_module_and_no_import_cycle():
    from memit_fast._version import __version__

    assert memit_fast.__version__ == __version__
    assert "noqa: E402" not in (ROOT / "memit_fast" / "__init__.py").read_text()
    assert "from . import __version__" not in (ROOT / "memit_fast" / "stats.py").read_text()
    assert config.EditConfig is memit_fast.EditConfig


def test_a_memory_cap_on_the_cpu_says_it_changes_nothing(caplog):
    """The cap is about GPU memory: on the CPU the edit is the same and a warning says so."""
    m = tiny.model("gpt2")
    hp = tiny.hparams(m, v_num_grad_steps=2)
    kw = dict(stats=tiny.stats(m, hp), context_templates=tiny.TEMPLATES, progress=False)
    _, orig = memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS[:1], hp, **kw)
    plain = {n: p.clone() for n, p in m.named_parameters() if n in orig}
    memit_fast.restore(m, orig)
    with caplog.at_level("WARNING", logger="memit_fast.api"):
        memit_fast.apply(m, tiny.tokenizer(), tiny.REQUESTS[:1], hp, memory_cap_gib=4, **kw)
    assert "changes nothing" in caplog.text
    assert all(torch.equal(p, plain[n]) for n, p in m.named_parameters() if n in orig)
