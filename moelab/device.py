"""The device a run takes when none is named ("auto"): CUDA where it is present and Triton compiles for it.

Under the Triton interpreter (TRITON_INTERPRET=1, as the test suite sets it) Triton kernels take CPU tensors only,
so "auto" is the CPU there even on a machine with a GPU.
"""

from __future__ import annotations

import os

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
