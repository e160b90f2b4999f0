"""The device a run takes when none is named ("auto"): CUDA where it is present and Triton compiles for it.

Under the Triton interpreter (TRITON_INTERPRET=1, as the test suite sets it) Triton kernels take CPU tensors only,
so "auto" is the CPU there even on a machine with a GPU.
"""

from __future__ import annotations

import functools
import os
import re

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def is_gpu(t: torch.Tensor) -> bool:
    """Is t on a CUDA device: the first condition of every GPU-only fast path's predicate, asked here so that the
    CPU tests can check the predicates' other conditions (strides, dtypes, rows, autograd) by patching this."""
    return t.is_cuda


def check_device_name(device: str) -> str:
    """auto, cpu, cuda or cuda:N; a clear error for anything else (whether the GPU is there: check_device)."""
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise ValueError(f"device {device!r}; allowed: auto, cpu, cuda, cuda:N")
    return device


def check_device(device: str) -> str:
    """A device name a run can take here: check_device_name, and a CUDA device must exist on this machine."""
    check_device_name(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA GPU on this machine (use cpu or auto)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (launch heuristics); 132 (an H100's) elsewhere."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
