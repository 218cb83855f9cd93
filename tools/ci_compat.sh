#!/usr/bin/env bash
# CI's second job (called by .ci/run after the README's test command): the oldest transformers
# that the bounds allow (4.56.2; the newest is what the first job installs) on the tests that run
# models through memit_fast's own forward, HF's forward and the CLI, each with FutureWarning as
# an error (no deprecated call of transformers from the package).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEMIT_FAST_COMPAT_VENV:-/tmp/memit-fast-ci-transformers-oldest}
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0 "transformers==4.56.2" safetensors tqdm numpy pyyaml filelock triton pytest pytest-benchmark
MEMIT_FAST_BUILD_NATIVE=0 pip install -q --no-deps --no-build-isolation -e .
python -c "import transformers; print('transformers', transformers.__version__)"
pytest -q -p no:cacheprovider -W error::FutureWarning tests/test_layouts.py tests/test_apply.py tests/test_targets.py tests/test_optional_imports.py
