"""Triton kernels, one op per module, each beside its plain-PyTorch twin; memit_fast/ops.py declares the ops."""
