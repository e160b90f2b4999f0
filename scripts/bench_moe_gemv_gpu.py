"""One-token MoE layers on the GPU: moelab.kernels.moe_gemv (the experts as GEMVs, down reading its first weights
before the PDL wait) against fused_moe's tensor-core GEMMs at naive blocks, for the decode shapes of OLMoE,
Qwen1.5-MoE, DeepSeek-V2-Lite, Qwen3-30B-A3B and Mixtral. Rows: $OUT/moe_gemv.json, one line each on stdout.

- check: both paths in bf16 against fused_moe_ref (float32);
- alone: REPEAT layer calls back to back in one CUDA graph, each with its own random top-k ids (the experts a call
  reads are mostly not in L2 from the call before), for the tensor-core path, moe_gemv's default configs and a
  sweep of configs (best reported); us per layer and the weights' bytes over that time against the copy rate.

    PYTHONPATH=. python scripts/bench_moe_gemv_gpu.py [--budget-s 200] [--quant]

--quant: int8_channel too (rows kind=quant): the GEMVs (packed words, and the element-wise conversion) against the
tensor-core path, against bf16's GEMVs, with their errors against the dequantized and unquantized float32 results.
(Runs v9c / v9d timed the fp8 formats the same way, before moe_gemv dropped them.)
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attention_gpu import emit_to, graph_ms, machine_rates  # noqa: E402

from moelab.kernels import moe_gemv as mg  # noqa: E402
from moelab.kernels.fused_moe import fused_moe, fused_moe_ref  # noqa: E402
from moelab.layers.moe.quant import dequantize, quantize_experts  # noqa: E402

DEV = "cuda"
BF = torch.bfloat16
ROWS: list[dict] = []
QUANT = False
FORMATS = ("int8_channel",)  # the fp8 formats stay on the tensor cores (v9c, v9d)
SWEEP_8BIT = [(mg.MoeGemvConfig(gn, gk, gw), mg.MoeGemvConfig(dn, dk, dw))
              for gn, gk, gw in ((2, 1024, 4), (4, 2048, 4), (2, 2048, 4), (4, 1024, 4), (8, 1024, 8))
              for dn, dk, dw in ((8, 512, 4), (16, 512, 4), (4, 1024, 4), (8, 1024, 4))]
T0 = time.time()
REPEAT = 20
SHAPES = [("olmoe", 64, 8, 2048, 1024), ("qwen1.5", 60, 4, 2048, 1408), ("dsv2-lite", 64, 6, 2048, 1408),
          ("qwen3-30b-a3b", 128, 8, 2048, 768), ("mixtral", 8, 2, 4096, 14336)]  # (name, E, top-k, D, I)
SWEEP = [(mg.MoeGemvConfig(gn, gk, gw), mg.MoeGemvConfig(dn, dk, dw))
         for gn, gk, gw in ((1, 1024, 4), (2, 1024, 4), (2, 2048, 4), (2, 512, 2), (1, 2048, 8), (4, 512, 4))
         for dn, dk, dw in ((8, 512, 4), (4, 512, 4), (16, 256, 4), (8, 256, 2), (4, 1024, 4))]


def emit(row: dict) -> None:
    emit_to(ROWS, "moe_gemv.json", row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--quant", action="store_true", help="also the 8-bit formats against the tensor-core path")
    args = ap.parse_args()
    global QUANT, SWEEP
    QUANT = args.quant
    if QUANT:  # the bf16 pairs were swept in v9b (docs/perf/engine.md); the time goes to the 8-bit ones
        SWEEP = []
    copy, read, _ = machine_rates()
    emit({"kind": "rates", "copy_GBs": copy / 1e9, "read_GBs": read / 1e9, "device": torch.cuda.get_device_name()})
    for shape in SHAPES:
        bench_shape(*shape, read=read, budget_s=args.budget_s)


def bench_shape(name: str, E: int, K: int, D: int, I: int, read: float, budget_s: float) -> None:
    g = torch.Generator(device=DEV).manual_seed(E + K)
    w13 = torch.randn(E, 2 * I, D, device=DEV, dtype=BF, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, I, device=DEV, dtype=BF, generator=g) / I ** 0.5
    xs = [torch.randn(1, D, device=DEV, dtype=BF, generator=g) for _ in range(REPEAT)]
    ids = [torch.randperm(E, device=DEV, generator=g)[:K].view(1, K) for _ in range(REPEAT)]
    wts = [torch.rand(1, K, device=DEV, generator=g).softmax(-1) for _ in range(REPEAT)]
    want = fused_moe_ref(xs[0], ids[0], wts[0], w13, w2).float()

    def rel(y: torch.Tensor) -> float:
        return ((y.float() - want).norm() / want.norm()).item()

    got = mg.moe_gemv(xs[0], ids[0], wts[0], w13, w2).float().sum(0, keepdim=True)
    mg.set_enabled(False)
    tc = fused_moe(xs[0], ids[0], wts[0], w13, w2)
    mg.set_enabled(True)
    emit({"kind": "check", "shape": name, "gemv_rel_err": rel(got), "tensor_core_rel_err": rel(tc)})
    floor_us = K * 3 * D * I * 2 / read * 1e6  # the touched experts' bytes over the read rate

    def layer(i: int, configs=None) -> None:
        mg.moe_gemv(xs[i], ids[i], wts[i], w13, w2, configs)

    def tensor_core(i: int) -> None:
        fused_moe(xs[i], ids[i], wts[i], w13, w2, sum_topk=False)

    mg.set_enabled(False)
    t_tc = graph_ms([partial(tensor_core, i) for i in range(REPEAT)]) * 1e3
    mg.set_enabled(True)
    t_def = graph_ms([partial(layer, i) for i in range(REPEAT)]) * 1e3
    best = (t_def, "default")
    for cfg in SWEEP:
        if time.time() - T0 > budget_s:
            break
        t = graph_ms([partial(layer, i, cfg) for i in range(REPEAT)]) * 1e3
        best = min(best, (t, f"{cfg[0]}/{cfg[1]}"))
    emit({"kind": "layer", "shape": name, "floor_us": floor_us, "tensor_core_us": t_tc, "gemv_default_us": t_def,
          "gemv_best_us": best[0], "gemv_best": best[1], "pct_floor_tc": 100 * floor_us / t_tc,
          "pct_floor_gemv": 100 * floor_us / t_def})
    if QUANT:
        bench_quant(name, (E, K, D, I), w13, w2, xs, ids, wts, read, t_def, budget_s)


def bench_quant(name: str, shape: tuple, w13, w2, xs, ids, wts, read: float, t_bf16: float, budget_s: float) -> None:
    """int8_channel at one token: the GEMVs against the tensor-core path (both W8A16), errors against the
    dequantized weights' float32 result and the unquantized one; speedup over the bf16 GEMVs (the bf16 path
    fused_moe takes at one token)."""
    E, K, D, I = shape
    full = fused_moe_ref(xs[0].float(), ids[0], wts[0], w13.float(), w2.float()).float()
    for fmt in FORMATS:
        q13, q2, s = quantize_experts(w13, w2, fmt)
        d13, d2 = dequantize(q13, q2, s)
        deq = fused_moe_ref(xs[0].float(), ids[0], wts[0], d13, d2).float()
        kw = dict(quant=fmt, w13_scale=s.w13_scale, w2_scale=s.w2_scale)
        rel = lambda y, ref: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        got = mg.moe_gemv(xs[0], ids[0], wts[0], q13, q2, **kw).float().sum(0, keepdim=True)
        mg.set_enabled(False)
        tc = fused_moe(xs[0], ids[0], wts[0], q13, q2, **kw)
        t_tc = graph_ms([partial(fused_moe, xs[i], ids[i], wts[i], q13, q2, sum_topk=False, **kw)
                         for i in range(REPEAT)]) * 1e3
        mg.set_enabled(True)
        t_el = graph_ms([partial(mg.moe_gemv, xs[i], ids[i], wts[i], q13, q2, packed=False, **kw)
                         for i in range(REPEAT)]) * 1e3
        t_def = graph_ms([partial(mg.moe_gemv, xs[i], ids[i], wts[i], q13, q2, **kw) for i in range(REPEAT)]) * 1e3
        best = (t_def, "default")
        for cfg in SWEEP_8BIT:
            if time.time() - T0 > budget_s:
                break
            t = graph_ms([partial(mg.moe_gemv, xs[i], ids[i], wts[i], q13, q2, cfg, **kw)
                          for i in range(REPEAT)]) * 1e3
            best = min(best, (t, f"{cfg[0]}/{cfg[1]}"))
        floor_us = K * 3 * D * I / read * 1e6
        emit({"kind": "quant", "shape": name, "format": fmt, "floor_us": floor_us, "tensor_core_us": t_tc,
              "gemv_unpacked_us": t_el, "gemv_default_us": t_def, "gemv_best_us": best[0], "gemv_best": best[1],
              "pct_floor_gemv": 100 * floor_us / t_def, "speedup_vs_bf16_gemv": t_bf16 / t_def,
              "speedup_tc_vs_bf16_gemv": t_bf16 / t_tc, "gemv_err_vs_dequant": rel(got, deq),
              "gemv_err_vs_float": rel(got, full), "tc_err_vs_float": rel(tc, full)})


if __name__ == "__main__":
    main()
