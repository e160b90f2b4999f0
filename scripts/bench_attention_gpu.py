"""Paged attention on the GPU: the bf16 kernel against the fp32 reference (and CUDA-graph replay against eager),
then decode and prefill timings against the floors measured in the same run (device-to-device copy bandwidth,
bf16 matmul rate), with torch SDPA on the same data laid out contiguously as a sanity number.
Rows: $OUT/bench_attention.json (OUT defaults to ./out); a table on stdout, one JSON summary line last.

    PYTHONPATH=. python scripts/bench_attention_gpu.py [--sweep] [--budget-s 270]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from moelab.kernels.paged_attention import PagedAttentionConfig as Cfg
from moelab.kernels.paged_attention import paged_attention, paged_attention_ref

DEV = "cuda"
BS = 16  # the engine's block size
SHAPES = {  # name: (H, KV, Dk, Dv, mla)
    "olmoe": (16, 16, 128, 128, False), "mixtral": (32, 8, 128, 128, False), "qwen3": (32, 4, 128, 128, False),
    "mla16": (16, 1, 576, 512, True), "mla128": (128, 1, 576, 512, True)}
TIMED = ["olmoe", "mixtral", "mla16"]
DECODE = [(B, ctx) for B in (1, 16, 64, 256) for ctx in (128, 1024, 4096)]
PREFILL = {"1x2048": ([2048], [2048]), "16x128": ([128] * 16, [128] * 16), "4x512+1536": ([512] * 4, [2048] * 4)}
ROWS: list[dict] = []
T0 = time.time()


class Batch:
    """bf16 queries and `copies` paged caches (same shuffled block tables, different data) of one shape."""

    def __init__(self, shape: str, qlens: list[int], lens: list[int], copies: int = 1, pad_row: bool = False):
        H, KV, Dk, Dv, mla = SHAPES[shape]
        self.H, self.KV, self.Dk, self.Dv, self.mla, self.lens = H, KV, Dk, Dv, mla, lens
        need = [-(-n // BS) for n in lens]
        N = max(1, sum(need))
        perm, tables = torch.randperm(N).int(), torch.zeros(len(lens) + pad_row, max(need) + 1, dtype=torch.int32)
        for b, n in enumerate(need):
            tables[b, :n], perm = perm[:n], perm[n:]
        self.caches = []
        for _ in range(copies):
            if mla:
                latent = torch.randn(N, BS, Dk, dtype=torch.bfloat16, device=DEV)
                self.caches.append((latent.view(N, BS, 1, Dk), latent[..., :Dv].unsqueeze(2)))
            else:
                kv = torch.randn(2, N, BS, KV, Dk, dtype=torch.bfloat16, device=DEV)
                self.caches.append((kv[0], kv[1]))
        qlens, lens = (qlens + [1], lens + [1]) if pad_row else (qlens, lens)
        self.qlens, self.max_q = qlens, max(qlens)
        self.cu = torch.tensor([0] + qlens, device=DEV).cumsum(0).int()
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        self.tables = tables.to(DEV)
        self.q = torch.randn(sum(qlens), H, Dk, dtype=torch.bfloat16, device=DEV)
        self.out = torch.empty(sum(qlens), H, Dv, dtype=torch.bfloat16, device=DEV)
        self.scale = Dk ** -0.5

    def calls(self, **kw) -> list[Callable]:
        return [partial(paged_attention, self.q, k, v, self.cu, self.seq_lens, self.tables, self.scale, self.max_q,
                        self.out, **kw) for k, v in self.caches]

    def ref(self) -> torch.Tensor:
        k, v = self.caches[0]
        return paged_attention_ref(self.q.float(), k.float(), v.float(), self.cu, self.seq_lens, self.tables,
                                   self.scale)

    def kv_bytes(self) -> int:  # MLA reads V inside K
        return sum(self.lens) * (self.Dk if self.mla else self.KV * (self.Dk + self.Dv)) * 2

    def flops(self) -> int:
        pairs = sum(q * (n - q) + q * (q + 1) // 2 for q, n in zip(self.qlens, self.lens))
        return 2 * self.H * (self.Dk + self.Dv) * pairs

    def sdpa_calls(self) -> list[Callable]:
        """Torch SDPA on contiguous [B, heads, L, D] copies (uniform lengths only)."""
        B, Q, L, rep = len(self.lens), self.qlens[0], self.lens[0], self.H // self.KV
        q = self.q.view(B, Q, self.H, self.Dk).transpose(1, 2)
        mask = None if Q in (1, L) else causal_lower_right(Q, L)
        fns = []
        for k, v in self.caches:
            dense = [c[self.tables[:B]].flatten(1, 2)[:, :L].transpose(1, 2).contiguous() for c in (k, v)]
            if Q > 1 and rep > 1:  # the causal-bias path takes no enable_gqa
                dense = [d.repeat_interleave(rep, 1) for d in dense]
            fns.append(partial(F.scaled_dot_product_attention, q, *dense, attn_mask=mask, scale=self.scale,
                               is_causal=Q == L and Q > 1, enable_gqa=Q == 1 and rep > 1))
        return fns


def graph_ms(fns: list[Callable], reps: int = 25) -> float:
    """Median ms per call of fns run back to back as one CUDA-graph replay (after an eager warm-up)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times) / len(fns)


def machine_rates() -> tuple[float, float, float]:
    """(device copy bytes/s counting read + write, read-only bytes/s of a sum, bf16 matmul FLOP/s), measured now."""
    src = torch.randn(1 << 29, dtype=torch.bfloat16, device=DEV)
    dst = torch.empty_like(src)
    copy = 2 * 2 * src.numel() / (graph_ms([partial(dst.copy_, src)]) * 1e-3)
    read = 2 * src.numel() / (graph_ms([partial(torch.sum, src, dtype=torch.float32)]) * 1e-3)
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV) for _ in range(2))
    c = torch.empty_like(a)
    mm = 2 * 8192 ** 3 / (graph_ms([partial(torch.mm, a, b, out=c)], reps=10) * 1e-3)
    return copy, read, mm


def emit_to(rows: list[dict], name: str, row: dict) -> None:
    """Append row, rewrite $OUT/name (OUT defaults to ./out) with all rows, print the row on one line."""
    rows.append(row)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(rows, indent=1))
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def emit(row: dict) -> None:
    emit_to(ROWS, "bench_attention.json", row)


def check(shape: str, name: str, qlens: list[int], lens: list[int], pad_row: bool = False, **kw) -> None:
    """bf16 kernel vs the fp32 reference; CUDA-graph replay vs eager."""
    batch = Batch(shape, qlens, lens, pad_row=pad_row)
    fn = batch.calls(**kw)[0]
    out = fn().float()
    ref = batch.ref()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    batch.out.zero_()
    graph.replay()
    emit(dict(kind="check", shape=shape, case=name, rel_err=((out - ref).norm() / ref.norm()).item(),
              nan=bool(out.isnan().any()), graph_diff=(batch.out.float() - out).abs().max().item(),
              ok=bool(((out - ref).norm() / ref.norm()).item() < 2e-2 and not out.isnan().any())))


def bench(kind: str, shape: str, qlens: list[int], lens: list[int], rates: tuple[float, float, float],
          sdpa: bool = True, **kw) -> dict:
    """Time one case; floor = max(bytes moved / copy bandwidth, FLOPs / matmul rate), as docs/MEASURING.md
    defines it, and the same with the read-only bandwidth (a read-only kernel can beat a copy's rate)."""
    H, KV, Dk, Dv, mla = SHAPES[shape]
    per_copy = sum(lens) * (Dk if mla else KV * (Dk + Dv)) * 2
    copies = max(1, min(32, math.ceil((256 << 20) / per_copy)))  # rotate caches so that L2 does not hold them
    batch = Batch(shape, qlens, lens, copies=copies)
    ms = graph_ms(batch.calls(max_seq_len=max(lens), **kw))
    io = batch.kv_bytes() + 2 * batch.q.numel() * 2
    floor_ms = max(io / rates[0], batch.flops() / rates[2]) * 1e3
    read_floor_ms = max(io / rates[1], batch.flops() / rates[2]) * 1e3
    sdpa_ms = None
    if sdpa:
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                sdpa_ms = graph_ms(batch.sdpa_calls())
        except Exception as e:  # noqa: BLE001 (a backend refusing the shape is a result, not an error)
            sdpa_ms = f"n/a ({str(e).splitlines()[0][:60]})"
    row = dict(kind=kind, shape=shape, B=len(lens), qlen=qlens[0], ctx=lens[0], ms=ms, floor_ms=floor_ms,
               pct_floor=100 * floor_ms / ms, pct_read_floor=100 * read_floor_ms / ms,
               compute_bound=batch.flops() / rates[2] > io / rates[0], kv_gbps=batch.kv_bytes() / ms * 1e-6,
               tflops=batch.flops() / ms * 1e-9, copies=copies, sdpa_ms=sdpa_ms,
               **{k: (v._asdict() if isinstance(v, Cfg) else v) for k, v in kw.items()})
    emit(row)
    return row


def sweep_point(kind: str, shape: str, qlens: list[int], lens: list[int], rates: tuple[float, float, float],
                cfg: Cfg) -> None:
    try:
        bench(kind, shape, qlens, lens, rates, sdpa=False, config=cfg)
    except Exception as e:  # noqa: BLE001 (a config that does not fit, e.g. Triton's OutOfResources, is a result)
        emit(dict(kind=kind, shape=shape, config=cfg._asdict(), error=str(e).splitlines()[0][:120]))


def sweep(rates: tuple[float, float, float], budget: float) -> None:
    """Alternatives to the default launch shapes, for the notes (the defaults are what the main table uses)."""
    points = [("mixtral", 64, 4096, [Cfg(1, 4, n, 4, s) for n, s in ((32, 3), (64, 3), (32, 4), (128, 3))]),
              ("olmoe", 256, 1024, [Cfg(1, 1, n, 4, s) for n, s in ((32, 3), (64, 3), (128, 3))]),
              ("mla16", 64, 4096, [Cfg(1, 16, n, w, s) for n, w, s in ((32, 4, 2), (32, 4, 3), (64, 4, 2),
                                                                       (16, 4, 3), (64, 8, 2))]),
              ("mla128", 64, 1024, [Cfg(1, h, 32, w, 2) for h, w in ((32, 4), (64, 8), (16, 4))])]
    for shape, B, ctx, cfgs in points:
        for cfg in cfgs:
            if time.time() - T0 < budget:
                sweep_point("sweep_decode", shape, [1] * B, [ctx] * B, rates, cfg)
    pre = {"olmoe": [Cfg(64, 1, 64, 4, 3), Cfg(64, 1, 64, 4, 4), Cfg(128, 1, 64, 8, 3), Cfg(64, 1, 32, 4, 3)],
           "mixtral": [Cfg(16, 4, 64, 4, 3), Cfg(32, 4, 64, 8, 3), Cfg(16, 4, 32, 4, 4)]}
    for shape, cfgs in pre.items():
        for cfg in cfgs:
            if time.time() - T0 < budget:
                sweep_point("sweep_prefill", shape, [2048], [2048], rates, cfg)


def kernel_stats() -> None:
    """Registers, spills and shared memory of every compiled attention kernel (Triton's per-device cache)."""
    from moelab.kernels import paged_attention as pa

    for fn in (pa._paged_attention_kernel, pa._split_reduce_kernel):
        for entry in fn.device_caches.values():
            for kernel in entry[0].values():
                consts = getattr(kernel.src, "constants", {})
                emit(dict(kind="kernel", name=kernel.name, n_regs=kernel.n_regs, n_spills=kernel.n_spills,
                          shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
                          num_stages=kernel.metadata.num_stages, constants=str(consts)[:300]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also time alternative launch configs and split counts")
    ap.add_argument("--budget-s", type=float, default=270.0, help="start no new timing after this many seconds")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    rates = machine_rates()
    emit(dict(kind="machine", copy_gbps=rates[0] * 1e-9, read_gbps=rates[1] * 1e-9, matmul_tflops=rates[2] * 1e-12))
    for shape in SHAPES:
        check(shape, "mixed", [1, 1, 37, 1, 200, 64], [1000, 17, 37, 300, 700, 397])
        check(shape, "decode_split", [1] * 6, [5, 100, 1000, 2049, 16, 700], max_seq_len=4096)
        check(shape, "decode_nosplit", [1] * 6, [5, 100, 1000, 2049, 16, 700], num_splits=1)
        check(shape, "decode_padded", [1] * 3, [300, 1, 77], pad_row=True, max_seq_len=1024)
    for shape in TIMED:
        for B, ctx in DECODE:
            if time.time() - T0 < args.budget_s:
                bench("decode", shape, [1] * B, [ctx] * B, rates)
        for qlens, lens in PREFILL.values():
            if time.time() - T0 < args.budget_s:
                bench("prefill", shape, qlens, lens, rates)
    for B, ctx in DECODE:  # DeepSeek-V2/V3 width: 128 heads on one latent, compute-bound at decode
        if ctx > 128 and time.time() - T0 < args.budget_s:
            bench("decode", "mla128", [1] * B, [ctx] * B, rates, sdpa=False)
    if args.sweep:
        sweep(rates, args.budget_s)
    try:
        kernel_stats()
    except Exception as e:  # noqa: BLE001 (diagnostics only; Triton's cache layout changes between versions)
        print("kernel stats unavailable:", e)
    print(f"\n{'kind':8s} {'shape':8s} {'B':>4s} {'q':>5s} {'ctx':>5s} {'ms':>8s} {'GB/s':>6s} {'%floor':>6s} "
          f"{'%read':>6s} {'bound':>5s} {'sdpa ms':>8s}")
    for r in ROWS:
        if r["kind"] in ("decode", "prefill"):
            sd = f"{r['sdpa_ms']:8.4f}" if isinstance(r["sdpa_ms"], float) else "     n/a"
            print(f"{r['kind']:8s} {r['shape']:8s} {r['B']:4d} {r['qlen']:5d} {r['ctx']:5d} {r['ms']:8.4f} "
                  f"{r['kv_gbps']:6.0f} {r['pct_floor']:6.1f} {r['pct_read_floor']:6.1f} "
                  f"{'flop' if r['compute_bound'] else 'bw':>5s} {sd}")
    checks = [r for r in ROWS if r["kind"] == "check"]
    print(json.dumps(dict(rows=len(ROWS), checks_ok=sum(r["ok"] for r in checks), checks=len(checks),
                          max_rel_err=max(r["rel_err"] for r in checks), copy_gbps=rates[0] * 1e-9,
                          read_gbps=rates[1] * 1e-9, matmul_tflops=rates[2] * 1e-12, seconds=time.time() - T0)))


if __name__ == "__main__":
    main()
