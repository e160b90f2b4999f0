"""One-row dense projections on the GPU: moelab's PDL GEMV (moelab.kernels.gemv) against cuBLAS (F.linear), for
the decode shapes of OLMoE, Qwen1.5-MoE, DeepSeek-V2-Lite and Mixtral. Rows: $OUT/gemv.json, one line each on
stdout.

- check: bf16 GEMV vs F.linear and vs the float32 product;
- alone: REPEAT back-to-back calls in one CUDA graph, each on its own weight copy (copies > L2), for cuBLAS, the
  default config with and without PDL, and a sweep of configs (the best is reported);
- chain: 16 x (RMSNorm -> qkv -> RMSNorm -> o) in one graph, the norms being moelab's PDL kernels, as in a decode
  layer: cuBLAS vs GEMV (whether the GEMV's early weight reads overlap the kernel in front of it).

    PYTHONPATH=. python scripts/bench_gemv_gpu.py [--budget-s 240]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_attention_gpu import emit_to, graph_ms, machine_rates  # noqa: E402
from bench_decode_kernels_gpu import copies_for, rel  # noqa: E402

from moelab.kernels import pdl  # noqa: E402
from moelab.kernels.gemv import GemvConfig, default_config, gemv  # noqa: E402
from moelab.kernels.rms_norm import rms_norm  # noqa: E402

DEV = "cuda"
BF = torch.bfloat16
ROWS: list[dict] = []
T0 = time.time()
REPEAT = 20
SHAPES = [  # (model, projection, N, K, bias)
    ("olmoe", "qkv", 6144, 2048, False), ("olmoe", "o", 2048, 2048, False), ("olmoe", "lm_head", 50304, 2048, False),
    ("qwen1.5", "qkv", 6144, 2048, True), ("qwen1.5", "shared_gate_up", 11264, 2048, False),
    ("qwen1.5", "shared_down", 2048, 5632, False), ("qwen1.5", "shared_gate", 1, 2048, False),
    ("qwen1.5", "lm_head", 151936, 2048, False),
    ("dsv2-lite", "q", 3072, 2048, False), ("dsv2-lite", "kv_a", 576, 2048, False),
    ("dsv2-lite", "dense_gate_up", 21888, 2048, False), ("dsv2-lite", "dense_down", 2048, 10944, False),
    ("dsv2-lite", "shared_gate_up", 5632, 2048, False), ("dsv2-lite", "shared_down", 2048, 2816, False),
    ("mixtral", "qkv", 6144, 4096, False), ("mixtral", "o", 4096, 4096, False),
]
SWEEP = [GemvConfig(bn, bk, w) for bn in (1, 2, 4, 8, 16) for bk in (512, 1024, 2048, 4096) for w in (2, 4, 8)
         if 1024 <= bn * bk <= 32768]


def emit(row: dict) -> None:
    emit_to(ROWS, "gemv.json", row)


def left(budget: float) -> bool:
    return time.time() - T0 < budget


def alone(copy_bw: float, budget: float) -> None:
    for model, proj, N, K, has_bias in SHAPES:
        if not left(budget):
            return
        nbytes = N * K * 2
        ws = [torch.randn(N, K, dtype=BF, device=DEV) * 0.02 for _ in range(copies_for(nbytes))]
        b = torch.randn(N, dtype=BF, device=DEV) if has_bias else None
        x = torch.randn(1, K, dtype=BF, device=DEV)
        y = gemv(x, ws[0], b)
        ref32 = (x.float() @ ws[0].float().T + (b.float() if b is not None else 0))
        check = dict(vs_cublas=rel(y, F.linear(x, ws[0], b)), vs_fp32=rel(y, ref32),
                     cublas_vs_fp32=rel(F.linear(x, ws[0], b), ref32))

        def calls(fn, x=x, ws=ws, b=b):
            return [partial(fn, x, ws[i % len(ws)], b) for i in range(REPEAT)]
        floor_us = nbytes / copy_bw * 1e6
        cub = graph_ms(calls(F.linear)) * 1e3
        dflt = graph_ms(calls(gemv)) * 1e3
        pdl.set_enabled(False)
        try:
            nopdl = graph_ms(calls(gemv)) * 1e3
        finally:
            pdl.set_enabled(True)
        best, best_cfg, sweep = dflt, default_config(N, K), {}
        for cfg in SWEEP:
            if not left(budget):
                break
            if cfg.block_k > 2 * max(K, 512) or (N + cfg.block_n - 1) // cfg.block_n < 32 and cfg.block_n > 1:
                continue
            t = graph_ms([partial(gemv, x, ws[i % len(ws)], b, cfg) for i in range(REPEAT)]) * 1e3
            sweep[f"{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}"] = round(t, 2)
            if t < best:
                best, best_cfg = t, cfg
        emit(dict(kind="alone", model=model, proj=proj, N=N, K=K, floor_us=floor_us, cublas_us=cub,
                  gemv_us=dflt, gemv_nopdl_us=nopdl, best_us=best, best_cfg=f"{best_cfg.block_n}x{best_cfg.block_k}"
                  f"w{best_cfg.num_warps}", default_cfg=str(default_config(N, K)), speedup=cub / dflt,
                  pct_floor_gemv=100 * floor_us / dflt, pct_floor_cublas=100 * floor_us / cub,
                  ok=check["vs_fp32"] < 1e-2, sweep=sweep, **check))


def chain(budget: float) -> None:
    for model, D, NQKV, K_O in (("olmoe", 2048, 6144, 2048), ("dsv2-lite-ish", 2048, 3072, 2048),
                                ("mixtral", 4096, 6144, 4096)):
        if not left(budget):
            return
        L = 16
        wq = [torch.randn(NQKV, D, dtype=BF, device=DEV) * 0.02 for _ in range(L)]
        wo = [torch.randn(D, K_O, dtype=BF, device=DEV) * 0.02 for _ in range(L)]
        nw = torch.ones(D, dtype=BF, device=DEV)
        nw2 = torch.ones(K_O, dtype=BF, device=DEV)
        x = torch.randn(1, D, dtype=BF, device=DEV)

        def step(lin, x=x, wq=wq, wo=wo, nw=nw, nw2=nw2, K_O=K_O):
            h = x
            for i in range(len(wq)):
                qkv = lin(rms_norm(h, nw, 1e-6), wq[i])
                h = lin(rms_norm(qkv[:, :K_O], nw2, 1e-6), wo[i])
            return h
        nbytes = L * (NQKV * D + D * K_O) * 2
        err = rel(step(gemv), step(F.linear))
        cub = graph_ms([partial(step, F.linear)]) * 1e3
        gv = graph_ms([partial(step, gemv)]) * 1e3
        emit(dict(kind="chain", model=model, layers=L, MB=nbytes / 1e6, cublas_us=cub, gemv_us=gv, speedup=cub / gv,
                  saved_us_per_layer=(cub - gv) / L, gemv_vs_cublas=err, ok=err < 5e-2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no new timing after this many seconds")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    rates = machine_rates()
    emit(dict(kind="machine", copy_gbps=rates[0] * 1e-9, read_gbps=rates[1] * 1e-9))
    chain(args.budget_s * 0.2)
    alone(rates[1], args.budget_s)
    print(json.dumps({"rows": len(ROWS), "failed_checks": sum(1 for r in ROWS if r.get("ok") is False),
                      "seconds": round(time.time() - T0, 1)}))


if __name__ == "__main__":
    main()
