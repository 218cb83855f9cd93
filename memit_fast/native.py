"""The compiled module `memit_fast._native`: cuSOLVER / cuBLAS calls on device pointers.

Loaded lazily, on the first call of `available()`, `why_unavailable()` or `lib()`. The module
itself needs no CUDA toolkit to build; it dlopen()s libcublas and libcusolver at run time, taking
the copies this process already mapped (torch's), else those of the nvidia-cublas /
nvidia-cusolver wheels, else the sonames on the loader path. `MEMIT_FAST_NATIVE=0` switches it off.
Without it memit_fast runs its PyTorch path; only an explicit native call raises, saying why.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

from .errors import MemitError

ABI_VERSION = 1  # must equal _native.ABI_VERSION (csrc/bindings.cpp)
BUILD_HINT = "build it with `MEMIT_FAST_BUILD_NATIVE=1 python -m pip install --no-build-isolation --no-deps -e .`"

_module = None
_reason: str | None = None
_loaded = False


class NativeUnavailableError(MemitError, RuntimeError):
    """A native function was called but memit_fast._native cannot be used here."""


def _library_paths(stem: str, majors: tuple[int, ...]) -> list[str]:
    """Candidates for lib<stem>.so.<major>: mapped already, then nvidia wheels, then sonames."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith(f"lib{stem}.so.") and path not in found:
                    found.append(path)
    except OSError:
        pass
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for major in majors:  # CUDA 13 wheels: nvidia/cu13/lib; CUDA 12 wheels: nvidia/<lib>/lib
            found += sorted(glob.glob(os.path.join(base, "cu*", "lib", f"lib{stem}.so.{major}")))
            found += sorted(glob.glob(os.path.join(base, stem, "lib", f"lib{stem}.so.{major}")))
    return found + [f"lib{stem}.so.{major}" for major in majors]


def _load() -> None:
    global _module, _reason, _loaded
    if _loaded:
        return
    _loaded = True
    if os.environ.get("MEMIT_FAST_NATIVE", "1") == "0":
        _reason = "switched off by MEMIT_FAST_NATIVE=0"
        return
    try:
        from . import _native as mod
    except ImportError as e:
        _reason = f"memit_fast._native is not built or does not import ({e}); {BUILD_HINT}"
        return
    if getattr(mod, "ABI_VERSION", None) != ABI_VERSION:
        _reason = f"memit_fast._native is stale (ABI {getattr(mod, 'ABI_VERSION', None)}, need {ABI_VERSION}); {BUILD_HINT}"
        return
    if not torch.cuda.is_available():
        _reason = "no CUDA device (torch.cuda.is_available() is False)"
        return
    torch.cuda.init()
    errors = []
    for cublas in _library_paths("cublas", (13, 12)):
        for cusolver in _library_paths("cusolver", (12, 11)):
            try:
                mod.load_cuda_libs(cublas, cusolver)
                _module = mod
                return
            except RuntimeError as e:
                errors.append(str(e))
    _reason = "cuBLAS/cuSOLVER could not be loaded: " + "; ".join(dict.fromkeys(errors))


def available() -> bool:
    """True if the native module is built, a CUDA device exists and cuSOLVER/cuBLAS loaded."""
    _load()
    return _module is not None


def why_unavailable() -> str | None:
    """None if `available()`, else the reason in one line."""
    _load()
    return _reason


def lib():
    """The loaded module; raises NativeUnavailableError with the reason otherwise."""
    _load()
    if _module is None:
        raise NativeUnavailableError(f"memit_fast native module unavailable: {_reason}")
    return _module


def call_args(t: torch.Tensor) -> dict:
    """The stream and device keywords of a native call on t's device (current torch stream)."""
    return {"stream": torch.cuda.current_stream(t.device).cuda_stream, "device": t.device.index}
