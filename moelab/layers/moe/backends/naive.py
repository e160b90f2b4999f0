"""The naive MoE backend: a loop over experts in float32. The oracle every other backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, scales: object | None = None) -> torch.Tensor:
    """x [T, D], topk_ids/topk_weights [T, K], w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I] -> [T, D].

    out[t] = sum_k w[t,k] * W2[e] (silu(G[e] x[t]) * (U[e] x[t])), e = topk_ids[t,k]."""
    if scales is not None:
        raise NotImplementedError("naive backend: quantized weights arrive with the quantization formats")
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.where(topk_ids == e)
        gate, up = (x[tok].float() @ w13[e].float().T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2[e].float().T
        out.index_add_(0, tok, y * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)
