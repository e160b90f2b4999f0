"""The grouped MoE backend: sort the (token, slot) pairs by expert, then one grouped GEMM per projection.

Uses `torch._grouped_mm` where the installed torch has it for this device and dtype (no host sync), and a
loop of per-expert matmuls over the sorted segments otherwise. A plain-torch point between naive and Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _has_grouped_mm(x: torch.Tensor, w13: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    # CUDA grouped GEMM: bf16 only, rows 16-byte aligned
    return x.dtype == torch.bfloat16 and w13.shape[-1] % 8 == 0 and w13.shape[1] % 16 == 0


def _gmm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor, fused: bool) -> torch.Tensor:
    """a [N, k] rows grouped by expert, b_t [E, k, n] -> [N, n]; group e spans rows offs[e-1]:offs[e]."""
    if fused:
        return torch._grouped_mm(a, b_t, offs=offs)
    out = a.new_empty(a.shape[0], b_t.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ b_t[e]
        start = end
    return out


def grouped_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, scales: object | None = None) -> torch.Tensor:
    """Same contract as naive_moe: x [T, D], topk [T, K], w13 [E, 2I, D], w2 [E, D, I] -> [T, D]."""
    if scales is not None:  # quantized experts: no grouped GEMM for them here; the oracle computes them
        from moelab.layers.moe.backends.naive import naive_moe

        return naive_moe(x, topk_ids, topk_weights, w13, w2, scales)
    T, K = topk_ids.shape
    flat = topk_ids.flatten()  # [T*K]
    order = flat.argsort(stable=True)
    token = order // K  # [T*K] token of each sorted row
    offs = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)  # [E]
    fused = _has_grouped_mm(x, w13)
    gate, up = _gmm(x[token], w13.transpose(1, 2), offs, fused).chunk(2, dim=-1)  # [T*K, I] each
    y = _gmm((F.silu(gate.float()) * up.float()).to(x.dtype), w2.transpose(1, 2), offs, fused)  # [T*K, D]
    y = y.float() * topk_weights.flatten()[order, None].float()
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token, y).to(x.dtype)
