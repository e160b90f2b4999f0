"""The triton MoE backend: moe_align + the fused gate_up / down grouped GEMMs of moelab/kernels/fused_moe.py.

On the CPU it runs under the Triton interpreter (TRITON_INTERPRET=1), where bf16 `tl.dot` returns garbage, so
there bf16 inputs are computed in float32 and the result cast back; bf16 itself is checked on the GPU.
"""

from __future__ import annotations

import torch

from moelab.kernels.fused_moe import fused_moe


def triton_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor, scales: object | None = None) -> torch.Tensor:
    """Same contract as naive_moe: x [T, D], topk [T, K], w13 [E, 2I, D], w2 [E, D, I] -> [T, D] in x's dtype."""
    if scales is not None:
        raise NotImplementedError("triton backend: bf16/fp16/fp32 weights only so far")
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return fused_moe(x.float(), topk_ids, topk_weights, w13.float(), w2.float()).to(x.dtype)
    return fused_moe(x, topk_ids, topk_weights, w13, w2)
