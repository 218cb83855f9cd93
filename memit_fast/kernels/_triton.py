"""Triton where it is installed (Linux, with CUDA builds of torch); elsewhere a stand-in under
which the kernel modules still import, so their plain-PyTorch twins (the CPU path) work without
Triton. `HAVE_TRITON` says which; memit_fast/ops.py registers a kernel for CUDA only with it."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

    class _NoTriton:
        """`@triton.jit` leaves the function as it is (never launched without Triton)."""

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()
    tl = TensorDescriptor = None

__all__ = ["HAVE_TRITON", "TensorDescriptor", "tl", "triton"]
