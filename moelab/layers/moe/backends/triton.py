"""The triton MoE backend: moe_align + the fused gate_up / down grouped GEMMs of moelab/kernels/fused_moe.py,
for bf16/fp16/fp32 experts and the quantized formats of moelab/layers/moe/quant.py.

On the CPU it runs under the Triton interpreter (TRITON_INTERPRET=1), where bf16 `tl.dot` returns garbage, so
there bf16 activations are computed in float32 and the result cast back; bf16 itself is checked on the GPU.
"""

from __future__ import annotations

import torch

from moelab.kernels.fused_moe import fused_moe
from moelab.layers.moe.quant import QuantScales


def triton_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor, scales: QuantScales | None = None, sum_topk: bool = True,
               routing_settled: bool = False) -> torch.Tensor:
    """Same contract as naive_moe: x [T, D], topk [T, K], w13 [E, 2I, D], w2 [E, D, I] -> [T, D] in x's dtype.
    With scales, w13/w2 hold the quantized weights (fp8 formats: W8A8 with dynamic per-token activations).
    sum_topk=False (a backend with `defers_topk_sum`): the [T*K, D] rows before the top-k sum instead. (On the CPU in
    bf16, where the interpreter computes in float32, those rows are rounded to bf16 one by one, so their sum is not
    bit-identical to the summed call's; on the GPU it is.) routing_settled: topk_ids was written at least two
    launches before (see fused_moe)."""
    cpu_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    xa = x.float() if cpu_bf16 else x
    if scales is None:
        out = fused_moe(xa, topk_ids, topk_weights, w13.float() if cpu_bf16 else w13,
                        w2.float() if cpu_bf16 else w2, sum_topk=sum_topk, routing_settled=routing_settled)
    else:
        scales.check(w13, w2)
        out = fused_moe(xa, topk_ids, topk_weights, w13, w2, quant=scales.format, w13_scale=scales.w13_scale,
                        w2_scale=scales.w2_scale, sum_topk=sum_topk, routing_settled=routing_settled)
    return out.to(x.dtype)


triton_moe.defers_topk_sum = True
triton_moe.takes_settled_routing = True
