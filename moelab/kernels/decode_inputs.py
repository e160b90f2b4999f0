"""The first kernel of a captured decode step: the ids of sequences whose last token is still in flight, read from
the previous step's sampled ids on the device, and the context lengths as int32.

A decode CUDA graph reads its inputs from one int64 staging buffer [5, B] that a single host-to-device copy fills
per step: rows ids, positions, slots, feed, context lengths. feed[i] >= 0 means row i's token is the previous
step's sampled id number feed[i] (the host does not have it yet: overlapped steps), written over ids[i] here.
Doing this inside the graph replaces the half-dozen small copies and index kernels that ran before each replay.
`feed_decode_inputs` (Triton) and `feed_decode_inputs_ref` (torch) do the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options

BLOCK = 256


@triton.jit
def _feed_inputs_kernel(staging_ptr, tokens_ptr, seq_lens_ptr, n, BLOCK_: tl.constexpr,
                        USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)
    offs = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    live = offs < n
    feed = tl.load(staging_ptr + 3 * n + offs, mask=live, other=-1)
    fed = live & (feed >= 0)
    prev = tl.load(tokens_ptr + tl.maximum(feed, 0), mask=fed, other=0)
    tl.store(staging_ptr + offs, prev, mask=fed)
    lens = tl.load(staging_ptr + 4 * n + offs, mask=live, other=1)
    tl.store(seq_lens_ptr + offs, lens.to(tl.int32), mask=live)


def _check(staging: torch.Tensor, tokens: torch.Tensor, seq_lens: torch.Tensor) -> int:
    if staging.dim() != 2 or staging.shape[0] != 5 or staging.dtype != torch.int64 or not staging.is_contiguous():
        raise ValueError(f"staging must be a contiguous int64 [5, n] (ids, positions, slots, feed, lengths), got "
                         f"{staging.dtype} {tuple(staging.shape)}")
    n = staging.shape[1]
    if tokens.dim() != 1 or tokens.dtype != torch.int64 or tokens.stride(0) != 1:
        raise ValueError(f"tokens must be a unit-stride int64 vector, got {tokens.dtype} {tuple(tokens.shape)}")
    if seq_lens.shape != (n,) or seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        raise ValueError(f"seq_lens must be a contiguous int32 [{n}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if not staging.device == tokens.device == seq_lens.device:
        raise ValueError(f"staging, tokens and seq_lens must share a device, got {staging.device}, {tokens.device}, "
                         f"{seq_lens.device}")
    return n


def feed_decode_inputs(staging: torch.Tensor, tokens: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """In place: staging[0, i] = tokens[staging[3, i]] where staging[3, i] >= 0; seq_lens[:] = staging[4] (int32).
    No host sync (feed indices are trusted to lie inside tokens: the runner builds them)."""
    n = _check(staging, tokens, seq_lens)
    if n:
        _feed_inputs_kernel[(triton.cdiv(n, BLOCK),)](staging, tokens, seq_lens, n, BLOCK_=BLOCK, num_warps=4,
                                                       **launch_options(staging.device))


def feed_decode_inputs_ref(staging: torch.Tensor, tokens: torch.Tensor, seq_lens: torch.Tensor) -> None:
    _check(staging, tokens, seq_lens)
    feed = staging[3]
    staging[0].copy_(torch.where(feed >= 0, tokens[feed.clamp_min(0)], staging[0]))
    seq_lens.copy_(staging[4])
