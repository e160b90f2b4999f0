"""The device a run takes when none is named ("auto"): CUDA where it is present and Triton compiles for it.

Under the Triton interpreter (TRITON_INTERPRET=1, as the test suite sets it) Triton kernels take CPU tensors only,
so "auto" is the CPU there even on a machine with a GPU.
"""

from __future__ import annotations

import functools
import os

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (launch heuristics); 132 (an H100's) elsewhere."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
