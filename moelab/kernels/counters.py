"""Arrival counters of the kernels whose last program to arrive finishes the work (split argmax, the router's
split logits, decode attention's split reduce): zeroed int32 buffers, one per kernel and device, allocated once
so that CUDA graphs captured with them stay valid. Every launch leaves its counters at zero again. Launches of
one kernel must not run concurrently on two streams (the engine uses one).
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[str, torch.device], torch.Tensor] = {}


def arrival_counters(kernel: str, size: int, device: torch.device) -> torch.Tensor:
    """The zeroed counters of `kernel` (a name of its own) on `device`: `size` of them, allocated on first use."""
    c = _BUFFERS.get((kernel, device))
    if c is None:
        c = _BUFFERS[(kernel, device)] = torch.zeros(size, dtype=torch.int32, device=device)
    return c
