"""Triton kernels, each beside its plain-torch `*_ref` twin. Importing a kernel module needs triton."""
