"""The naive MoE backend: a loop over experts in float32. The oracle every other backend is tested against,
for every weight format: quantized experts are dequantized (only those the routing touches), and for the W8A8
formats the activations x and h go through the same per-token fp8 rounding as the fused kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.layers.moe.quant import QuantScales, dequantize_weight, fake_quant_per_token, is_w8a8


def _expert_weights(e: int, w13: torch.Tensor, w2: torch.Tensor, scales: QuantScales | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (w13[e] [2I, D], w2[e] [D, I]), dequantized when scales are given."""
    if scales is None:
        return w13[e].float(), w2[e].float()
    s13, s2 = scales.w13_scale[e:e + 1], scales.w2_scale[e:e + 1]
    return (dequantize_weight(w13[e:e + 1], s13, scales.format, halves=2)[0],
            dequantize_weight(w2[e:e + 1], s2, scales.format)[0])


def naive_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, scales: QuantScales | None = None) -> torch.Tensor:
    """x [T, D], topk_ids/topk_weights [T, K], w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I] -> [T, D].

    out[t] = sum_k w[t,k] * W2[e] (silu(G[e] x[t]) * (U[e] x[t])), e = topk_ids[t,k]; W = Q * S when scales are
    given, and for fp8 formats x and h are replaced by fake_quant_per_token(x), fake_quant_per_token(h)."""
    if scales is not None:
        scales.check(w13, w2)
    act_quant = scales is not None and is_w8a8(scales.format)
    xf = fake_quant_per_token(x) if act_quant else x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.where(topk_ids == e)
        g13, g2 = _expert_weights(e, w13, w2, scales)
        gate, up = (xf[tok] @ g13.T).chunk(2, dim=-1)
        h = F.silu(gate) * up
        if act_quant:  # the fused kernel writes h in x's dtype, then quantizes each row
            h = fake_quant_per_token(h.to(x.dtype))
        out.index_add_(0, tok, (h @ g2.T) * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)
