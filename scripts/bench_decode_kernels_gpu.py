"""The decode-path kernels on the GPU, each against the path it replaces: checks in bf16, then timings and launch
config sweeps. Rows: $OUT/decode_kernels.json; one line per row on stdout. Small kernels are timed as REPEAT
back-to-back calls in one CUDA graph (one call per graph would time the graph launch).

- router GEMM + top-k in one kernel (D split over programs at decode) vs the float32 GEMM + the top-k kernel;
- q/k norm + RoPE + KV store in one kernel vs the four kernels before it;
- greedy argmax with the finiteness check (one split kernel) vs torch's argmax, at the studied vocabularies;
- decode attention at B = 64 / 256 (--attn-batches), 150-token contexts: launch configs and key splits (at B = 1
  key splits 1-8 for each config).

    PYTHONPATH=. python scripts/bench_decode_kernels_gpu.py [--budget-s 400] [--sections router,qk,argmax,attn]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attention_gpu import Batch, emit_to, graph_ms, machine_rates  # noqa: E402

from moelab.kernels.argmax import argmax_rows, argmax_rows_ref, default_splits  # noqa: E402
from moelab.kernels.paged_attention import PagedAttentionConfig as ACfg  # noqa: E402
from moelab.kernels.paged_attention import default_config  # noqa: E402
from moelab.kernels.qk_rope_store import qk_rope_store, qk_rope_store_ref  # noqa: E402
from moelab.kernels.rms_norm import rms_norm  # noqa: E402
from moelab.kernels.rotary import rotary  # noqa: E402
from moelab.kernels.store_kv import store_kv  # noqa: E402
from moelab.kernels.topk_router import router_topk, topk_router, topk_router_ref  # noqa: E402

DEV = "cuda"
BF = torch.bfloat16
ROWS: list[dict] = []
T0 = time.time()
REPEAT = 20


def emit(row: dict) -> None:
    emit_to(ROWS, "decode_kernels.json", row)


def left(budget: float) -> bool:
    return time.time() - T0 < budget


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def copies_for(nbytes: int) -> int:
    return max(1, min(64, math.ceil((256 << 20) / nbytes)))


def router_section(budget: float) -> None:
    for E, K, D in ((64, 8, 2048), (60, 4, 2048), (64, 6, 2048), (128, 8, 2048)):
        w = torch.randn(E, D, dtype=BF, device=DEV) * 0.02
        w32 = w.float()
        for T in (1, 8, 64, 256, 2048):
            if not left(budget):
                return
            x = torch.randn(T, D, dtype=BF, device=DEV)
            gw, gi = router_topk(x, w, K, "softmax", False)
            rw, ri = topk_router_ref(x.float() @ w32.T, K, "softmax", False)
            same = (gi.sort(1).values == ri.sort(1).values).all(1).float().mean().item()

            def old(x=x, w32=w32, K=K):
                return topk_router(x.float() @ w32.T, K, "softmax", False)
            emit(dict(kind="router", E=E, K=K, T=T, fused_ms=graph_ms([partial(router_topk, x, w, K)] * REPEAT),
                      old_ms=graph_ms([old] * REPEAT), same_experts=same, weight_err=(gw - rw).abs().max().item(),
                      ok=same > 0.99))


def qk_section(budget: float) -> None:
    for name, H, KV, hd, norm in (("olmoe", 16, 16, 128, "full"), ("qwen1.5", 16, 16, 128, None),
                                  ("qwen3", 32, 4, 128, "per_head")):
        P, S = 4096, 8192
        inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, device=DEV).float() / hd)
        f = torch.arange(P, device=DEV).float()[:, None] * inv
        cos, sin = f.cos().contiguous(), f.sin().contiguous()
        qw = torch.rand(H * hd if norm == "full" else hd, dtype=BF, device=DEV) + 0.5
        kw = torch.rand(KV * hd if norm == "full" else hd, dtype=BF, device=DEV) + 0.5
        for T in (1, 64, 256, 2048):
            if not left(budget):
                return
            qkv = torch.randn(T, (H + 2 * KV) * hd, dtype=BF, device=DEV)
            pos = torch.randint(0, P, (T,), device=DEV)
            slots = torch.randperm(S, device=DEV)[:T]
            kc, vc = torch.zeros(S, KV * hd, dtype=BF, device=DEV), torch.zeros(S, KV * hd, dtype=BF, device=DEV)
            kc2, vc2 = kc.clone(), vc.clone()
            args = (norm, qw if norm else None, kw if norm else None, 1e-6, False)
            got = qk_rope_store(qkv, H, KV, pos, cos, sin, kc, vc, slots, *args)
            want = qk_rope_store_ref(qkv, H, KV, pos, cos, sin, kc2, vc2, slots, *args)
            err = max(rel(got, want), rel(kc, kc2), rel(vc, vc2))

            def old(qkv=qkv, pos=pos, slots=slots, kc=kc, vc=vc, H=H, KV=KV, hd=hd, T=T, norm=norm, qw=qw, kw=kw,
                    cos=cos, sin=sin):
                q, k, v = qkv.split([H * hd, KV * hd, KV * hd], -1)
                if norm == "full":
                    q, k = rms_norm(q, qw, 1e-6), rms_norm(k, kw, 1e-6)
                q, k, v = q.view(T, H, hd), k.view(T, KV, hd), v.view(T, KV, hd)
                if norm == "per_head":
                    q, k = rms_norm(q, qw, 1e-6), rms_norm(k, kw, 1e-6)
                q, k = rotary(q, k, pos, cos, sin)
                store_kv(k.reshape(T, -1), v.reshape(T, -1), kc, vc, slots)
                return q
            emit(dict(kind="qk_rope_store", shape=name, T=T, fused_ms=graph_ms(
                [partial(qk_rope_store, qkv, H, KV, pos, cos, sin, kc, vc, slots, *args)] * REPEAT),
                old_ms=graph_ms([old] * REPEAT),
                rel_err=err, ok=err < 1e-2))


def attn_section(rates, budget: float, batches: tuple[int, ...] = (64, 256)) -> None:
    for shape in ("olmoe", "mla16"):
        for B in batches:
            mla = shape == "mla16"
            lens = [150] * B
            per_copy = sum(lens) * (576 if mla else 16 * 256) * 2
            batch = Batch(shape, [1] * B, lens, copies=max(1, min(32, math.ceil((256 << 20) / per_copy))))
            ref = batch.ref()
            floor_ms = (batch.kv_bytes() + 2 * batch.q.numel() * 2) / rates[0] * 1e3
            H, KV, Dk = batch.H, batch.KV, batch.Dk
            base = default_config(1, H // KV, Dk, batch.Dv, B * KV)
            cands = [base] + ([ACfg(1, 16, n, w, s) for n, w, s in ((16, 4, 3), (32, 4, 3), (64, 8, 2), (32, 8, 2))]
                              if mla else [ACfg(1, 1, n, w, s) for n, w, s in
                                           ((32, 4, 3), (32, 2, 2), (32, 2, 3), (32, 2, 5), (16, 2, 4), (16, 1, 4),
                                            (32, 1, 3), (32, 1, 4), (64, 2, 4), (64, 2, 2))])
            for cfg in cands:
                for splits in ((1, 2, 3, 4, 6, 8) if B == 1 else (1, 2) if cfg == base else (1,)):
                    if not left(budget):
                        return
                    kw = dict(config=cfg, num_splits=splits, max_seq_len=4096)
                    try:
                        fns = batch.calls(**kw)
                        fns[0]()
                        err = rel(batch.out, ref)
                        ms = graph_ms(fns)
                    except Exception as e:  # noqa: BLE001
                        emit(dict(kind="attn", shape=shape, B=B, config=tuple(cfg), splits=splits,
                                  error=str(e).splitlines()[0][:100]))
                        continue
                    emit(dict(kind="attn", shape=shape, B=B, ctx=150, config=tuple(cfg), splits=splits, ms=ms,
                              pct_floor=100 * floor_ms / ms, default=cfg == base and splits == 1, rel_err=err,
                              ok=err < 2e-2))

def argmax_section(budget: float, sweep: bool = True) -> None:
    """Default launch vs torch's argmax, and a sweep of parts x values per load x warps."""
    for V in (50304, 102400, 151936):  # OLMoE, DeepSeek-V2-Lite, Qwen1.5-MoE
        for N in (1, 8, 64, 256, 512):
            if not left(budget):
                return
            x = torch.randn(N, V, dtype=BF, device=DEV)
            if N > 1:
                x[N // 2, V // 3] = float("nan")
            same = torch.equal(argmax_rows(x), argmax_rows_ref(x))
            times = {f"s{s}b{b}w{w}": round(graph_ms([partial(argmax_rows, x, s, b, w)] * REPEAT) * 1e3, 2)
                     for s in (1, 2, 4, 8, 16, 32) for b in (1024, 2048, 4096) for w in (4, 8)
                     if sweep and s <= max(1, V // 2048) and left(budget)}
            emit(dict(kind="argmax", V=V, N=N, moelab_ms=graph_ms([partial(argmax_rows, x)] * REPEAT),
                      torch_ms=graph_ms([partial(torch.argmax, x, -1)] * REPEAT),
                      default_splits=default_splits(N, V, torch.cuda.get_device_properties(0).multi_processor_count),
                      best=min(times.items(), key=lambda kv: kv[1]) if times else None, sweep_us=times, ok=same))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=400.0, help="start no new timing after this many seconds")
    ap.add_argument("--sections", default="qk,router,argmax,attn")
    ap.add_argument("--no-argmax-sweep", action="store_true", help="argmax: the default launch and torch only")
    ap.add_argument("--attn-batches", default="64,256", help="decode batch sizes of the attention sweep")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    rates = machine_rates()
    emit(dict(kind="machine", copy_gbps=rates[0] * 1e-9, read_gbps=rates[1] * 1e-9, matmul_tflops=rates[2] * 1e-12))
    sections = args.sections.split(",")
    share = args.budget_s / len(sections)
    for i, s in enumerate(sections):
        budget = share * (i + 1)
        try:
            attn = partial(attn_section, rates, batches=tuple(int(b) for b in args.attn_batches.split(",")))
            argmax = partial(argmax_section, sweep=not args.no_argmax_sweep)
            {"router": router_section, "qk": qk_section, "argmax": argmax, "attn": attn}[s](budget)
        except Exception as e:  # noqa: BLE001 (one section failing must not lose the others)
            import traceback

            traceback.print_exc()
            emit(dict(kind="section_error", section=s, error=str(e)[:300]))
    print(json.dumps({"rows": len(ROWS), "failed_checks": sum(1 for r in ROWS if r.get("ok") is False),
                      "seconds": round(time.time() - T0, 1)}))


if __name__ == "__main__":
    main()
