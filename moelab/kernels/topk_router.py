"""Top-k routing of softmax or sigmoid scores in one Triton kernel (one program per token), with
`topk_router_ref` beside it.

scores = softmax(logits) or sigmoid(logits) over the E experts; the K largest are taken one after the other (ties
go to the lower expert id), optionally renormalized to sum to 1, then multiplied by `scale`. This replaces
softmax + topk (which itself is a gather and a sort) + renorm + scale: four to six launches per MoE layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_router_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_l, scale, K: tl.constexpr, KP: tl.constexpr,
                        BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    x = tl.load(logits_ptr + t * stride_l + offs, mask=mask, other=-float("inf")).to(tl.float32)
    if SIGMOID:
        p = 1.0 / (1.0 + tl.exp(-x))
    else:
        e = tl.exp(x - tl.max(x, axis=0))
        p = e / tl.sum(e, axis=0)
    p = tl.where(mask, p, -1.0)
    kk = tl.arange(0, KP)
    wv = tl.zeros([KP], dtype=tl.float32)
    iv = tl.zeros([KP], dtype=tl.int64)
    for k in tl.static_range(K):
        m = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == m, offs, BLOCK_E), axis=0)
        wv = tl.where(kk == k, m, wv)
        iv = tl.where(kk == k, idx.to(tl.int64), iv)
        p = tl.where(offs == idx, -2.0, p)
    if RENORM:
        wv = wv / (tl.sum(wv, axis=0) + 1e-20)
    kmask = kk < K
    tl.store(w_ptr + t * K + kk, wv * scale, mask=kmask)
    tl.store(ids_ptr + t * K + kk, iv, mask=kmask)


def topk_router(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, K] float32, ids [T, K] int64)."""
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring {scoring!r}; allowed: softmax, sigmoid")
    T, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        _topk_router_kernel[(T,)](logits, w, ids, E, logits.stride(0), scale, K=top_k,
                                  KP=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(E),
                                  SIGMOID=scoring == "sigmoid", RENORM=renormalize, num_warps=1 if E <= 128 else 2)
    return w, ids


def topk_router_ref(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
                    scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.float().sigmoid() if scoring == "sigmoid" else logits.float().softmax(-1)
    w, ids = scores.topk(top_k, dim=-1)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, ids
