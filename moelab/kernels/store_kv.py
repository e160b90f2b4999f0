"""Write this step's keys and values into their cache slots in one Triton kernel, with `store_kv_ref` beside it.

k [T, W] and v [T, Wv] rows go to rows slot_mapping[t] of k_cache [S, W] and v_cache [S, Wv] (the caches viewed
with every slot as one row: [num_blocks * block_size, heads * head_dim]). One program per token replaces two
index_put launches per layer; for MLA, pass v=None and the latent+rope row as k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, W, Wv, stride_k, stride_v, stride_kc, stride_vc,
                     BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, HAS_V: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    tl.store(kc_ptr + slot * stride_kc + offs, tl.load(k_ptr + t * stride_k + offs, mask=offs < W), mask=offs < W)
    if HAS_V:
        ov = tl.arange(0, BLOCK_V)
        tl.store(vc_ptr + slot * stride_vc + ov, tl.load(v_ptr + t * stride_v + ov, mask=ov < Wv), mask=ov < Wv)


def store_kv(k: torch.Tensor, v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
             slot_mapping: torch.Tensor) -> None:
    """k [T, W], v [T, Wv] or None; k_cache [S, W], v_cache [S, Wv]; slot_mapping [T] int (contiguous rows)."""
    T, W = k.shape
    if k_cache.shape[1] != W or k_cache.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"k [T, {W}] and k_cache [S, {W}] need unit last strides; got {tuple(k_cache.shape)}")
    has_v = v is not None
    if has_v and (v_cache is None or v_cache.shape[1] != v.shape[1] or v.stride(-1) != 1
                  or v_cache.stride(-1) != 1):
        raise ValueError("v and v_cache must be [T, Wv] and [S, Wv] with unit last strides")
    if T == 0:
        return
    Wv = v.shape[1] if has_v else 1
    _store_kv_kernel[(T,)](k, v if has_v else k, k_cache, v_cache if has_v else k_cache, slot_mapping, W, Wv,
                           k.stride(0), v.stride(0) if has_v else 0, k_cache.stride(0),
                           v_cache.stride(0) if has_v else 0, BLOCK=triton.next_power_of_2(W),
                           BLOCK_V=triton.next_power_of_2(Wv), HAS_V=has_v, **launch_options(k.device))


def store_kv_ref(k: torch.Tensor, v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                 slot_mapping: torch.Tensor) -> None:
    k_cache[slot_mapping.long()] = k
    if v is not None:
        v_cache[slot_mapping.long()] = v
