"""`pytest benchmarks/` collects the bench_*.py files (pytest's default pattern is test_*.py).

Without CUDA, Triton runs in its interpreter (TRITON_INTERPRET is set before any benchmark
module imports triton) and torch uses one thread. Every test starts seeded. `--records FILE`
appends each benchmark's median and rates to FILE as records (benchmarks/results_store.py).
"""

import datetime
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
STARTED = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seeded; on CPU one thread (the smoke runs are tiny), restored after the benchmark so a
    session that also runs tests/ keeps its threads."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption("--records", default=None, metavar="FILE",
                     help="append each benchmark result as records (benchmarks/results_store.py) to FILE")


@pytest.fixture(autouse=True)
def _records(request):
    """After a benchmark ran (not with --benchmark-disable), its median and rates as records."""
    yield
    path = request.config.getoption("--records")
    bench = request.node.funcargs.get("benchmark")
    stats = getattr(bench, "stats", None)
    if path and stats is not None:
        import results_store

        callspec = getattr(request.node, "callspec", None)
        entry = {"name": request.node.name, "params": dict(callspec.params) if callspec else {}, "extra_info": dict(bench.extra_info),
                 "stats": {"median": stats.stats.median, "rounds": stats.stats.rounds}}
        ctx = results_store.context("pytest-benchmark", "pytest " + " ".join(request.config.invocation_params.args))
        ctx["run_id"] = f"pytest-benchmark {STARTED}"  # one run_id for the whole session
        results_store.append(results_store.pytest_benchmark_records(entry, ctx), path)
