"""Programmatic dependent launch (Hopper and newer): a kernel launched with it may be scheduled while the kernel before
it in the stream is still running, and waits (`griddepcontrol.wait`) before touching memory that kernel writes. At
decode a step is ~170 kernels of a few microseconds each, and the launch gap between two of them is a visible share
of each.

Every moelab kernel that takes part calls `gdc_prologue(USE_PDL)`: wait for the previous kernel's memory, then let
the next kernel be scheduled. Nothing that a kernel of the forward pass writes is read before the wait, and nothing
is written before it, so the order of memory effects is the same as without it. Most kernels call it first; a few
read, before it, what no kernel of the step writes: the GEMV its first weight chunk, `router_topk` its first weight
chunk, `qk_rope_store` the positions, slots and RoPE rows, paged attention the step's metadata (copied in before
the step, except a decode graph's int32 context lengths, which the graph's first kernel writes: the embedding, a
torch launch without PDL, runs after it and before any kernel that reads them early, so that order is kept; a change
that makes the first PDL kernel of the step follow it directly must move those reads after the wait). One more
rule allows reads of data written two launches back: the launch in front has passed its own wait before this one
can start, so everything before that launch is complete (`moe_gemv`'s down kernel the routing, its gate_up too
when a shared expert ran after the router, `routing_settled`; `add_rms_norm` and the router's
folded norm read the residual early when the caller says it is that old, `residual_settled`, and no copy of it was
launched in between; `add_rms_norm` reads its norm weight early always, the router its norm weight with the
residual).
`launch_options(device)`
gives the launch keyword (empty on the CPU / interpreter and on GPUs before Hopper). `set_enabled(False)` turns it
off (for A/B timings; CUDA graphs must be recaptured).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_ENABLED = True
try:  # Triton's CUDA launcher takes launch_pdl since 3.3
    from triton.backends.nvidia.compiler import CUDAOptions

    _LAUNCHER_HAS_PDL = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
except ImportError:  # a Triton without the CUDA backend
    _LAUNCHER_HAS_PDL = False


_EARLY = True


def set_enabled(on: bool) -> None:
    global _ENABLED
    _ENABLED = bool(on)


def set_early_reads(on: bool) -> None:
    """Off: kernels that may read a residual written two launches back before their wait read it after (A/B
    timings; CUDA graphs must be recaptured)."""
    global _EARLY
    _EARLY = bool(on)


def early_reads() -> bool:
    return _EARLY


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    if not (_ENABLED and _LAUNCHER_HAS_PDL and device.type == "cuda"):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict:
    """{"USE_PDL": bool, and "launch_pdl": True where it applies}: spread into a kernel launch."""
    on = use_pdl(device)
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


@triton.jit
def gdc_prologue(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
