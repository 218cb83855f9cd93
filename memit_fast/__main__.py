"""`python -m memit_fast`: versions, CUDA device, and whether the native module loaded (or why not)."""

import importlib.metadata
import platform

import torch

from . import __version__, native


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    print(f"memit_fast {__version__}  python {platform.python_version()}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})  transformers {_version('transformers')}  triton {_version('triton')}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("device: no CUDA device (PyTorch CPU path)")
    print("native: loaded" if native.available() else f"native: not used: {native.why_unavailable()}")


if __name__ == "__main__":
    main()
