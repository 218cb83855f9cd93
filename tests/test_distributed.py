"""Data parallel over two gloo processes (memit_fast.distributed) equals one process, and a rank
that fails makes every rank fail with the same error, weights untouched.

One group of two processes (torch.multiprocessing.spawn) runs every check, so the processes
start once; each rank writes what it found to a file that the test reads."""

import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

import memit_fast
import tiny
from memit_fast import distributed
from memit_fast.cache import LayerStats

WORLD = 2
N_LINES = 60


def _requests():
    return tiny.REQUESTS + [
        {"prompt": "{} was born in", "subject": "Pierre Curie", "target_new": {"str": "Tokyo"}},
        {"prompt": "{} speaks the language", "subject": "Jacques Chirac", "target_new": {"str": "Russian"}},
    ]


def _edit(m, hp, stats):
    m_before = {n: p.detach().clone() for n, p in m.named_parameters()}
    memit_fast.apply(m, tiny.tokenizer(), _requests(), hp, stats=stats, context_templates=tiny.TEMPLATES, progress=False, return_orig_weights=False)
    return {n: (p - m_before[n]).detach().clone() for n, p in m.named_parameters() if not torch.equal(p, m_before[n])}


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return type(e).__name__, str(e)
    return None


def _worker(rank: int, rdzv: str, out: str, given: dict) -> None:
    """One rank: statistics, edits of every family, then injected failures; results to out/rank.pt."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    found = {}
    try:
        for arch in tiny.ARCHS:
            m = tiny.model(arch)
            hp = tiny.hparams(m, mom2_dtype="float64")
            stats = memit_fast.compute_stats(m, tiny.tokenizer(), hp, corpus=tiny.corpus_lines(N_LINES), cache_dir=os.path.join(out, "cache"), progress=False)
            found[f"stats/{arch}"] = {layer: (s.mom2, s.count) for layer, s in stats.items()}
            found[f"delta/{arch}"] = _edit(m, tiny.hparams(m), given[arch])
        # failures on rank 1 only: in z, and in the solve of the second layer (the first is written by then)
        from memit_fast import api, update
        from memit_fast.errors import RequestError, SolveError, TargetError

        m = tiny.model("gptj")
        hp = tiny.hparams(m)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        real_targets, real_delta = api.compute_targets, update.layer_delta

        def bad_targets(*a, **k):
            if rank == 1:
                raise TargetError("injected z failure")
            return real_targets(*a, **k)

        calls = []

        def bad_delta(*a, **k):
            calls.append(1)
            if rank == 1:
                raise SolveError("injected solve failure")
            return real_delta(*a, **k)

        real_encode = api.encode_requests

        def bad_encode(*a, **k):
            if rank == 1:
                raise RequestError("injected tokeniser failure")
            return real_encode(*a, **k)

        api.encode_requests = bad_encode
        found["tokenise_error"] = _error_of(lambda: _edit(m, hp, given["gptj"]))
        api.encode_requests = real_encode
        found["tokenise_untouched"] = all(torch.equal(p, before[n]) for n, p in m.named_parameters())
        api.compute_targets = bad_targets
        found["z_error"] = _error_of(lambda: _edit(m, hp, given["gptj"]))
        api.compute_targets = real_targets
        found["z_untouched"] = all(torch.equal(p, before[n]) for n, p in m.named_parameters())
        update.layer_delta = bad_delta
        found["solve_error"] = _error_of(lambda: _edit(m, hp, given["gptj"]))
        update.layer_delta = real_delta
        found["solve_calls"] = len(calls)
        found["solve_untouched"] = all(torch.equal(p, before[n]) for n, p in m.named_parameters())
        found["after_failures"] = _edit(m, hp, given["gptj"])  # the group still works
        # the command line as torchrun starts it (the group exists already: main joins it)
        import contextlib
        import io

        from memit_fast import cli

        os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            found["cli_rc"] = cli.main(["edit", *_cli_args(out), "--out", os.path.join(out, "cli_two"), "--cache-dir", os.path.join(out, "cli_cache2")])
        found["cli_stdout"] = printed.getvalue()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            found["eval_rc"] = cli.main(["eval", *_eval_args(out), "--out", os.path.join(out, "eval_two"), "--cache-dir", os.path.join(out, "cli_cache2")])
        found["eval_stdout"] = printed.getvalue()
    finally:
        torch.save(found, os.path.join(out, f"{rank}.pt"))
        torch.distributed.destroy_process_group()


def _cli_args(d) -> list[str]:
    return ["--model", os.path.join(d, "model"), "--hparams", os.path.join(d, "hp.json"), "--corpus", os.path.join(d, "corpus.txt"),
            "--device", "cpu", "--requests", os.path.join(d, "reqs.json"), "--quiet"]  # fmt: skip


def _eval_args(d) -> list[str]:
    return ["--model", os.path.join(d, "model"), "--hparams", os.path.join(d, "hp.json"), "--corpus", os.path.join(d, "corpus.txt"),
            "--device", "cpu", "--data", os.path.join(d, "zsre.json"), "--quiet"]  # fmt: skip


ZSRE = [  # two zsRE records in the original format (the tiny model knows none of them)
    {"subject": "Tokyo Tower", "src": "When was Tokyo Tower built?", "pred": "1958", "rephrase": "In which year was Tokyo Tower finished?",
     "alt": "1972", "answers": ["1958"], "loc": "nq question: who wrote the river song", "loc_ans": "the river band"},
    {"subject": "Danube", "src": "Which sea does the Danube flow into?", "pred": "Black Sea", "rephrase": "The Danube ends in which sea?",
     "alt": "North Sea", "answers": ["Black Sea"], "loc": "nq question: how many legs does a spider have", "loc_ans": "eight"},
]  # fmt: skip


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks found, and the statistics given to their edits."""
    import json

    tmp = tmp_path_factory.mktemp("dist")
    m = tiny.model("gpt2", dtype=torch.float32)
    m.save_pretrained(tmp / "model")
    tiny.tokenizer().save_pretrained(tmp / "model")
    (tmp / "hp.json").write_text(json.dumps(tiny.hparams(m, mom2_n_samples=N_LINES).to_dict()))
    (tmp / "corpus.txt").write_text("\n".join(tiny.corpus_lines(N_LINES)))
    (tmp / "reqs.json").write_text(json.dumps(_requests()))
    (tmp / "zsre.json").write_text(json.dumps(ZSRE))
    given = {}
    for arch in tiny.ARCHS:
        m = tiny.model(arch)
        given[arch] = tiny.stats(m, tiny.hparams(m), N_LINES)
    mp.spawn(_worker, args=(str(tmp / "rdzv"), str(tmp), given), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(WORLD)], given, tmp


def _shard_stats(m, hp) -> dict[int, torch.Tensor]:
    """The two ranks' shares computed one at a time in this process and added."""
    lines = tiny.corpus_lines(N_LINES)
    parts = distributed.shard([len(t) for t in lines], WORLD)
    sums, counts = {}, {}
    for p in parts:
        s = memit_fast.compute_stats(m, tiny.tokenizer(), hp, corpus=[lines[i] for i in p], use_cache=False, progress=False)
        for layer, v in s.items():
            sums[layer] = sums.get(layer, 0) + v.mom2 * v.count
            counts[layer] = counts.get(layer, 0) + v.count
    return {layer: (sums[layer] / counts[layer], counts[layer]) for layer in sums}


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_statistics_equal_one_process(ranks, arch):
    found, given, tmp = ranks
    m = tiny.model(arch)
    hp = tiny.hparams(m, mom2_dtype="float64")  # the means kept in float64: the all-reduce's rounding is seen
    shares = _shard_stats(m, hp)
    for layer in hp.layers:
        mom2, count = found[0][f"stats/{arch}"][layer]
        mom2_1, count_1 = found[1][f"stats/{arch}"][layer]
        assert torch.equal(mom2, mom2_1) and count == count_1 == given[arch][layer].count
        ref, ref_count = shares[layer]
        assert count == ref_count
        assert (mom2 - ref).norm() / ref.norm() < 1e-12  # the all-reduce: float64 rounding
        one = given[arch][layer].mom2  # one process over all documents, float32: other float32 partial sums
        assert (mom2 - one).norm() / one.norm() < 1e-6
    # the cache was written once (rank 0), and loads as the same statistics
    cached = memit_fast.compute_stats(m, tiny.tokenizer(), hp, corpus=tiny.corpus_lines(N_LINES), cache_dir=tmp / "cache", progress=False)
    assert all(torch.equal(cached[layer].mom2, found[0][f"stats/{arch}"][layer][0]) for layer in hp.layers)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_deltas_equal_one_process(ranks, arch):
    found, given, _ = ranks
    m = tiny.model(arch)
    one = _edit(m, tiny.hparams(m), given[arch])
    assert len(one) == 2
    for r in range(WORLD):
        assert found[r][f"delta/{arch}"].keys() == one.keys()
        for name, d in one.items():
            assert (found[r][f"delta/{arch}"][name] - d).norm() / d.norm() < 1e-8, (r, name)
    assert all(torch.equal(found[0][f"delta/{arch}"][n], found[1][f"delta/{arch}"][n]) for n in one)


def test_a_failing_rank_fails_every_rank_and_weights_stay(ranks):
    found, _, _ = ranks
    for r in range(WORLD):
        assert found[r]["tokenise_error"] == ("RequestError", "rank 1 of 2 failed in tokenise: RequestError: injected tokeniser failure")
        assert found[r]["tokenise_untouched"]
        assert found[r]["z_error"] == ("TargetError", "rank 1 of 2 failed in z: TargetError: injected z failure")
        assert found[r]["z_untouched"]
        assert found[r]["solve_error"] == ("SolveError", "rank 1 of 2 failed in the solve of layer 3: SolveError: injected solve failure")
        assert found[r]["solve_untouched"]
        assert found[r]["after_failures"]
    assert [found[r]["solve_calls"] for r in range(WORLD)] == [1, 1]  # layer 2 on rank 0, layer 3 on rank 1


def test_shard_balances_costs():
    parts = distributed.shard([10, 1, 1, 1, 1, 9, 2], 2)
    assert sorted(i for p in parts for i in p) == list(range(7))
    loads = [sum([10, 1, 1, 1, 1, 9, 2][i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 1
    assert distributed.shard([1, 2], 3) == [[1], [0], []]


def test_one_process_is_a_pass_through():
    assert not distributed.active() and distributed.world() == 1 and distributed.rank() == 0
    x = torch.arange(6.0).view(3, 2)
    assert distributed.gather_rows(x, None) is x
    assert distributed.agreed("x", lambda a: a + 1, 1) == 2
    assert distributed.union([3, 1]) == [1, 3]


def test_checksum_sees_one_bit():
    a = torch.randn(1000, dtype=torch.bfloat16)
    b = a.clone()
    b.view(torch.int16)[517] ^= 1
    assert distributed.checksum([a]) == distributed.checksum([a.clone()]) != distributed.checksum([b])
    assert distributed.checksum([a, a]) != distributed.checksum([a])


def test_the_command_line_on_two_ranks_equals_one_process(ranks):
    """`memit-fast edit` on each rank of the group (as `torchrun --nproc-per-node 2 -m memit_fast
    edit` runs it): rank 0 alone prints and writes the edit, equal to one process's up to the
    float32 rounding of the statistics' partial sums."""
    from memit_fast import cli
    from memit_fast.artifacts import load_edits

    found, _, tmp = ranks
    assert [f["cli_rc"] for f in found] == [0, 0]
    assert found[0]["cli_stdout"].count("edited 5 facts") == 1 and found[1]["cli_stdout"] == ""
    assert cli.main(["edit", *_cli_args(str(tmp)), "--out", str(tmp / "cli_one"), "--cache-dir", str(tmp / "cli_cache1")]) == 0
    one, two = ({e.name: e.delta() for e in load_edits(tmp / d).layers} for d in ("cli_one", "cli_two"))
    assert one.keys() == two.keys() and len(one) == 2
    for name, d in one.items():
        assert (two[name] - d).norm() / d.norm() < 1e-4, name


def test_eval_on_two_ranks_equals_one_process(ranks):
    """`memit-fast eval` under torchrun: the edit is data parallel, every rank evaluates, rank 0
    alone prints and writes the report; the metrics equal one process's (the edits differ by the
    float32 rounding of the statistics' partial sums, far below a token's argmax)."""
    import json

    from memit_fast import cli

    found, _, tmp = ranks
    assert [f["eval_rc"] for f in found] == [0, 0]
    assert "| metric | unedited | edited |" in found[0]["eval_stdout"] and found[1]["eval_stdout"] == ""
    assert cli.main(["eval", *_eval_args(str(tmp)), "--out", str(tmp / "eval_one"), "--cache-dir", str(tmp / "cli_cache1")]) == 0
    one, two = (json.loads((tmp / d / "results.json").read_text()) for d in ("eval_one", "eval_two"))
    for phase in ("before", "after"):
        for metric, v in one[phase]["metrics"].items():
            assert abs(two[phase]["metrics"][metric]["mean"] - v["mean"]) < 1e-6, (phase, metric)


def test_eval_sequential_under_torchrun_is_refused(monkeypatch, capsys):
    from memit_fast import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["eval", "--data", "x.json", "--sequential"]) == 2
    assert "runs in one process" in capsys.readouterr().err


def test_balanced_device_map_keeps_order_and_the_ends_on_the_first_gpu():
    for arch in tiny.ARCHS:
        m = tiny.model(arch)
        hp = tiny.hparams(m)
        dm = distributed.balanced_device_map(m, [3, 5], hparams=hp)
        blocks = [dm[hp.layer_module_tmp.format(i)] for i in range(6)]
        assert blocks == sorted(blocks) and set(blocks) == {3, 5}
        assert {dm[k] for k in dm if not k.startswith(hp.layer_module_tmp.split("{}")[0])} == {3}
        names = {n for n, _ in m.named_parameters()}
        assert all(any(n == k or n.startswith(k + ".") for k in dm) for n in names)  # every parameter placed


def test_a_split_with_the_head_elsewhere_is_refused():
    from memit_fast.errors import ConfigError
    from memit_fast.layouts import layout_for

    m = tiny.model("gpt2")
    layout = layout_for(m, tiny.hparams(m))
    distributed.check_split(layout)
    m.lm_head.to("meta")
    with pytest.raises(ConfigError, match="share one device"):
        distributed.check_split(layout)


def test_balanced_device_map_follows_the_capacity():
    m = tiny.model("gptj", layers=12)
    hp = tiny.hparams(m)
    blocks = lambda dm: [dm[hp.layer_module_tmp.format(i)] for i in range(12)]  # noqa: E731
    assert blocks(distributed.balanced_device_map(m, 2, hparams=hp, capacity=[1, 3])).count(0) < blocks(distributed.balanced_device_map(m, 2, hparams=hp)).count(0)
    with pytest.raises(ValueError, match="one positive value per device"):
        distributed.balanced_device_map(m, 2, hparams=hp, capacity=[1])


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_build_on_devices_makes_every_weight_where_the_map_says(arch):
    """benchmarks/synthetic.build_on_devices (the NeoX-20B and Llama-3-70B benchmark models):
    built on the meta device, each parameter then made on its device (here the CPU) in the dtype
    asked: matrices normal(0, initializer_range), biases zero, norms one, tied weights tied,
    seeded; the model runs."""
    synthetic = _load_benchmark_module("synthetic")
    config = tiny.model(arch).config
    device_map = distributed.balanced_device_map(config, ["cpu", "cpu"])
    m, _ = synthetic.build_on_devices(config, device_map, dtype=torch.bfloat16, seed=3)
    named = dict(m.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in named.values())
    assert not any(t.is_meta for t in m.buffers())
    for name, p in named.items():
        if p.dim() >= 2:
            assert abs(p.float().std().item() - config.initializer_range) < 0.2 * config.initializer_range, name
        else:
            assert torch.all(p == (0 if name.endswith("bias") else 1)), name
    head, embed = m.get_output_embeddings().weight, m.get_input_embeddings().weight
    assert (head is embed) == bool(getattr(config, "tie_word_embeddings", False))
    again, _ = synthetic.build_on_devices(config, device_map, dtype=torch.bfloat16, seed=3)
    other, _ = synthetic.build_on_devices(config, device_map, dtype=torch.bfloat16, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters()))
    assert not torch.equal(embed, other.get_input_embeddings().weight)
    assert torch.isfinite(m(torch.randint(1, m.config.vocab_size, (2, 7))).logits).all()


def _load_benchmark_module(name: str):
    """benchmarks/NAME.py loaded by its path (benchmarks/ is a folder of scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # registered first: its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def _alternating_map(m, hp) -> dict:
    """Block i on cuda:(i % 2), the rest on cuda:0: every block's input crosses a device."""
    dm = distributed.balanced_device_map(m, 2, hparams=hp)
    prefix = hp.layer_module_tmp.split("{}")[0]
    return {k: (int(k[len(prefix):]) % 2 if k.startswith(prefix) else 0) for k in dm}


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("split", ["balanced", "alternating"])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_a_model_split_over_two_gpus_edits_as_on_one(arch, split):
    """Blocks over cuda:0 and cuda:1, in order (balanced: the critical layers on cuda:1) or
    alternating (each block on the other GPU than the one before): the model's own forward (the
    evaluation's path), statistics (on each layer's GPU), z, the keys of each layer, and the
    deltas of `apply` equal the same model's on cuda:0."""
    from accelerate import dispatch_model

    from memit_fast.edit_requests import normalize_requests
    from memit_fast.keys import KeyReader, key_rows
    from memit_fast.layouts import layout_for
    from memit_fast.targets import compute_targets
    from memit_fast.templates import flatten
    from memit_fast.tokens import encode_requests

    one, m = tiny.model(arch).to("cuda:0"), tiny.model(arch)
    hp = tiny.hparams(one)
    device_map = distributed.balanced_device_map(m, 2, hparams=hp) if split == "balanced" else _alternating_map(m, hp)
    skip = getattr(m, "_skip_keys_device_placement", None)  # as from_pretrained(device_map=...) dispatches
    m = dispatch_model(m, device_map, skip_keys=sorted(skip) if skip else None)
    assert {p.device.index for p in m.parameters()} == {0, 1}
    if split == "alternating":
        assert [m.get_submodule(hp.rewrite_module_tmp.format(layer)).weight.device.index for layer in hp.layers] == [0, 1]
    ids = torch.randint(1, m.config.vocab_size, (3, 9), device="cuda:0")
    torch.testing.assert_close(m(ids).logits.to("cuda:0"), one(ids).logits, rtol=1e-9, atol=1e-9)
    stats_one, stats_split = tiny.stats(one, hp), tiny.stats(m, hp)
    for layer in hp.layers:
        assert stats_split[layer].mom2.device == m.get_submodule(hp.rewrite_module_tmp.format(layer)).weight.device
        assert stats_split[layer].count == stats_one[layer].count
        torch.testing.assert_close(stats_split[layer].mom2.cpu(), stats_one[layer].mom2.cpu(), rtol=1e-6, atol=1e-12)
    tok = tiny.tokenizer()
    enc = encode_requests(tok, normalize_requests(_requests()), flatten(tiny.TEMPLATES), hp.fact_token)
    z_one, z_split = (compute_targets(x, tok, enc, hp, progress=False) for x in (one, m))
    assert z_split.device == torch.device("cuda:0")
    torch.testing.assert_close(z_split, z_one, rtol=1e-8, atol=1e-10)
    readers = [KeyReader(x, layout_for(x, hp), tok, key_rows(enc), len(enc), hp.layers[-1], tiny.TEMPLATES) for x in (one, m)]
    for layer in hp.layers:
        (k1, c1), (k2, c2) = (r.read(layer) for r in readers)
        torch.testing.assert_close(k2, k1, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(c2, c1, rtol=1e-9, atol=1e-12)
    d_one, d_split = _edit(one, hp, stats_one), _edit(m, hp, stats_one)
    assert d_one.keys() == d_split.keys() and len(d_one) == 2
    for name, d in d_one.items():
        assert (d_split[name].to(d.device) - d).norm() / d.norm() < 1e-8, name


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_build_on_devices_over_two_gpus(arch):
    """The benchmark models' build over cuda:0 and cuda:1: every parameter on its mapped GPU, none
    on the CPU or the meta device, and the model runs."""
    synthetic = _load_benchmark_module("synthetic")
    config = tiny.model(arch).config
    hp = tiny.hparams(tiny.model(arch))
    device_map = _alternating_map(tiny.model(arch), hp)
    m, _ = synthetic.build_on_devices(config, device_map, dtype=torch.bfloat16)
    for name, p in m.named_parameters():
        assert p.device == synthetic._device_of(name, device_map), name
    assert {t.device.type for t in m.buffers()} <= {"cuda"}
    assert torch.isfinite(m(torch.randint(1, m.config.vocab_size, (2, 7), device="cuda:0")).logits.float()).all()


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_every_block_goes_through_its_device_move(arch, monkeypatch):
    """A model split over GPUs needs each block's input on the block's device: every way through
    a block (run, the statistics pass, the key pass, z's prefix and suffix) calls on_block_device."""
    from memit_fast.layouts import Layout, layout_for

    m = tiny.model(arch)
    hp = tiny.hparams(m)
    layout = layout_for(m, hp)
    seen = []
    real = Layout.on_block_device

    def spy(self, i, h, ctx):
        seen.append(i)
        return real(self, i, h, ctx)

    monkeypatch.setattr(Layout, "on_block_device", spy)
    ids = torch.randint(1, m.config.vocab_size, (2, 7))
    h, ctx = layout.start(ids)
    layout.run(h, 0, 6, ctx)
    assert seen == list(range(6))
    seen.clear()
    layout.mlp_keys(ids, torch.ones_like(ids), [2, 3], lambda i, k: None)
    assert seen == [0, 1, 2, 3]
    seen.clear()
    layout.key_and_output(ids, torch.ones_like(ids), 2, 4)
    assert seen == list(range(5))
    seen.clear()
    runner = layout.suffix_runner(ids[:, :3], torch.ones_like(ids[:, :3]), ids[:, 3:], torch.ones_like(ids[:, 3:]),
                                  torch.arange(3, 7).expand(2, -1), 3, 5)  # fmt: skip
    runner.forward(runner.hidden)
    assert seen == list(range(6)) + list(range(4)) + [4, 5]
