"""`pytest benchmarks/` collects the bench_*.py files (pytest's default pattern is test_*.py).

Without CUDA, Triton runs in its interpreter (TRITON_INTERPRET is set before any benchmark
module imports triton) and torch uses one thread. Every test starts seeded.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
