"""Triton kernels, one op per module, each beside its plain-PyTorch twin."""
