"""Check every MoE backend against the float32 naive oracle in bf16, then time the triton backend's whole layer
(align + both GEMMs + top-k sum) as CUDA-graph replays against the floor and the published reference
(../shared/guide/MEASURING.md). With --tune, first search a small grid of tile configs per (shape, M) and write
the best into $OUT/configs/ (copy them to moelab/kernels/configs/).

    PYTHONPATH=. python scripts/bench_moe_gpu.py [--tune] [--shapes olmoe,qwen3] [--ms 1,64]
    PYTHONPATH=. python scripts/bench_moe_gpu.py --dry     # tiny shapes on the CPU (Triton interpreter)
    PYTHONPATH=. python scripts/bench_moe_gpu.py --quant [--dry]  # quantized formats vs bf16 (moelab.lab.kernel_bench)
    PYTHONPATH=. python scripts/bench_moe_gpu.py --no-check --rounds 3   # every cell timed in 3 interleaved rounds

--rounds N: time every (shape, M) cell N times, round after round over all cells (odd rounds in the reverse order
of shapes, token counts and configs), and report the median per cell with the spread of the rounds (also in the
JSON, "medians"). --cooldown S: leave the GPU idle S seconds before each timing. The SM clock under load is set by
the power and thermal limits and carries over from what ran before: on an H100 (runs/moe-h100-bf16-v11-retuned.json,
clock read after each timing) the same config measured 5.21 and 5.45 ms at Mixtral M=4096 back to back, and the
one-token Qwen3 and DeepSeek-V2-Lite cells, timed right after the M=16384 cells of Mixtral and of Qwen3, ran at
1395-1470 MHz where OLMoE's ran at 1980. So one timing per cell, in a fixed order, moves the 28-cell geomean by
about 1 % and penalises the cells that follow the heavy ones.

Writes $OUT/bench_moe.json (default ./out): ceilings, check rows, tuning rows, timing rows. Prints a table last.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

if "--dry" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

from moelab.kernels import fused_moe as fm  # noqa: E402
from moelab.kernels import moe_align as ma  # noqa: E402
from moelab.kernels import moe_sum as msum  # noqa: E402
from moelab.kernels.fused_moe_config import (  # noqa: E402
    GemmConfig,
    MoEConfig,
    config_file_name,
    heuristic_config,
    save_config_file,
    use_naive_blocks,
)
from moelab.lab import kernel_bench as kb  # noqa: E402
from moelab.layers.moe.backends import BACKENDS, naive_moe  # noqa: E402

# shapes (E, K, D, I), token counts and the published H100 reference times (MEASURING.md) live in kernel_bench
SHAPES, MS, REFERENCE_MS, DRY_SHAPES = kb.SHAPES, kb.MS, kb.REFERENCE_MS, kb.TINY_SHAPES
DRY_MS = (1, 5, 40)
ROTATE, REL_ERR_MAX = kb.ROTATE, kb.REL_ERR_MAX
COOLDOWN_S = 0.0  # idle seconds before each timing of a layer (--cooldown)
SMEM_BYTES = 227 * 1024

# (BLOCK_N, BLOCK_K, num_warps, num_stages) per BLOCK_M, each tried with and without TMA; group_m is refined
# around the winner.
CANDIDATES = {
    16: [(32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (32, 256, 4, 3), (64, 256, 4, 3), (128, 128, 4, 3),
         (16, 256, 4, 4)],
    32: [(32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3)],
    64: [(64, 64, 4, 4), (128, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3)],
    128: [(64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3),
          (256, 64, 8, 4), (64, 64, 8, 5)],
    256: [(64, 64, 8, 3), (64, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3)],
}
GROUP_MS = (1, 8, 32)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def block_m_candidates(per_expert: float, naive: bool) -> list[int]:
    if naive or per_expert <= 8:
        return [16]
    if per_expert <= 24:
        return [16, 32]
    if per_expert <= 96:
        return [32, 64]
    return [64, 128] if per_expert <= 768 else [128, 256]


def fits(kind: str, block_m: int, c: tuple) -> bool:
    """Shared memory of the pipelined tiles, and at most 128 accumulator registers per thread."""
    bn, bk, warps, stages = c[:4]
    b_tiles = 2 if kind == "up" else 1
    acc_regs = b_tiles * block_m * bn / (32 * warps)
    return stages * (block_m * bk + b_tiles * bn * bk) * 2 <= SMEM_BYTES and acc_regs <= 128


def gemm_candidates(kind: str, block_m: int, dry: bool) -> list[GemmConfig]:
    if dry:
        return [GemmConfig(16, 32), GemmConfig(32, 16, tma=True)]
    group_m = 8 if block_m >= 64 else 1
    return [GemmConfig(bn, bk, group_m, w, s, tma) for tma in (False, True) for bn, bk, w, s in CANDIDATES[block_m]
            if fits(kind, block_m, (bn, bk, w, s))]


# ---------------------------------------------------------------- timing


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def graph_ms(fn: Callable[[int], torch.Tensor], n_sets: int, dev: torch.device, budget_ms: float = 150.0
             ) -> tuple[float, list[torch.Tensor]]:
    """fn(i) on input set i, i < n_sets, captured as one CUDA graph; median replay time / n_sets (ms), outputs."""
    return kb.graph_ms(fn, n_sets, "cuda" if dev.type == "cuda" else "cpu", budget_ms)


def sm_clock_mhz(dev: torch.device) -> int | None:
    """The SM clock right after a timing (power or thermal limits lower it under sustained tensor-core load)."""
    try:
        return torch.cuda.clock_rate(dev) if dev.type == "cuda" else None
    except Exception:  # no NVML here
        return None


def measure_ceilings(dev: torch.device) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate, measured here (the lab's
    calibration, as every moelab benchmark)."""
    return kb.measure_ceilings(dev.type)


# ---------------------------------------------------------------- inputs and checks


def make_weights(E: int, D: int, I: int, dev: torch.device, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = (torch.randn(E, 2 * I, D, device=dev, generator=g) / D ** 0.5).bfloat16()
    w2 = (torch.randn(E, D, I, device=dev, generator=g) / I ** 0.5).bfloat16()
    return w13, w2


def make_inputs(M: int, E: int, K: int, D: int, dev: torch.device, g: torch.Generator, skew: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, D] bf16, topk_ids [M, K] int64, topk_weights [M, K] fp32 (kernel_bench.make_inputs: uniform or
    Zipf-skewed routing)."""
    return kb.make_inputs(M, (E, K, D, 0), torch.bfloat16, dev, g, skew)


rel_err = kb.rel_err


def check_cell(name: str, M: int, shape: tuple, w13, w2, w13f, w2f, dev, g) -> list[dict]:
    E, K, D, I = shape
    rows = []
    for skew in (False, True):
        x, ids, w = make_inputs(M, E, K, D, dev, g, skew)
        ref = naive_moe(x.float(), ids, w, w13f, w2f)
        for bname, fn in BACKENDS.items():
            if bname == "naive" and M > 64:
                continue
            try:
                out = fn(x, ids, w, w13, w2, None)
            except Exception as exc:  # record it and go on to the timings
                log(f"CHECK RAISED {name} M={M} {bname}: {type(exc).__name__}: {str(exc)[:300]}")
                out = torch.full_like(x, float("nan"))
            err = rel_err(out, ref)
            ok = bool(torch.isfinite(out).all()) and err < REL_ERR_MAX and out.dtype == x.dtype
            rows.append(dict(kind="check", shape=name, M=M, routing="skewed" if skew else "uniform",
                             backend=bname, rel_err=err, ok=ok))
            if not ok:
                log(f"CHECK FAILED {name} M={M} {rows[-1]['routing']} {bname}: rel err {err:.3e}")
    return rows


# ---------------------------------------------------------------- precompile (parallel) and tuning


def _compile_job(job: tuple) -> tuple[tuple, float, str]:
    """Run one kernel variant on a tiny problem so that Triton compiles it into the on-disk cache."""
    kind, D, I, E, block_m, naive, cfg, device = job
    t0 = time.perf_counter()
    try:
        dev = torch.device(device)
        if kind == "align":  # E is the real expert count; naive = chunked (many slots)
            n_tok = 5000 if naive else 64
            ma.moe_align(torch.randint(0, E, (n_tok, 1), device=dev), E, block_m)
        else:
            T, K, E2 = (1 if naive else 8), 2, 2
            ids = torch.tensor([[0, 1]] * T, device=dev)
            r = fm.route(ids, E2, block_m)
            assert r.naive == naive
            gc = GemmConfig(*cfg)
            if kind == "up":
                x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
                fm.gate_up(x, torch.randn(E2, 2 * I, D, device=dev, dtype=torch.bfloat16), r, gc)
            else:
                h = torch.randn(r.num_pid_m * r.block_m, I, device=dev, dtype=torch.bfloat16)
                fm.down(h, torch.randn(E2, D, I, device=dev, dtype=torch.bfloat16),
                        torch.rand(T * K, device=dev), r, gc)
        sync(dev)
        return job, time.perf_counter() - t0, ""
    except Exception as exc:  # a config that does not fit is skipped by the tuner
        return job, time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[:200]}"


def compile_jobs(shapes: dict, ms: tuple, device: str, dry: bool) -> list[tuple]:
    """Every kernel variant the checks, the tuning and the timings will launch, one job per compiled binary."""
    jobs, seen = [], set()
    for E, K, D, I in shapes.values():
        for M in ms:
            naive = use_naive_blocks(M, K, E)
            heur = heuristic_config(M, E, K, I, D, "bfloat16", "cpu" if dry else "cuda")
            for bm in sorted(set(block_m_candidates(M * K / E, naive) + [heur.block_m])):
                bm = fm.NAIVE_BLOCK_M if naive else bm
                for kind, kdim in (("up", D), ("down", I)):
                    cands = gemm_candidates(kind, bm, dry) + [heur.gate_up if kind == "up" else heur.down]
                    for c in cands:
                        key = (kind, bm, naive, c.block_n, c.block_k, c.num_warps, c.num_stages, c.tma,
                               kdim % c.block_k)
                        if key not in seen:
                            seen.add(key)
                            cfg = (c.block_n, c.block_k, 1, c.num_warps, c.num_stages, c.tma)
                            jobs.append((kind, D, I, E, bm, naive, cfg, device))
                if not naive:
                    for chunked in (False, True):
                        if ("align", E, bm, chunked) not in seen:
                            seen.add(("align", E, bm, chunked))
                            jobs.append(("align", D, I, E, bm, chunked, None, device))
    return jobs


def tune_gemm(kind: str, block_m: int, run: Callable[[GemmConfig, int], torch.Tensor], dev, dry: bool,
              failed: set) -> tuple[GemmConfig | None, float, list[dict]]:
    """Best config of one GEMM at this BLOCK_M: a pass over the candidates, then group_m around the winner."""
    rows, best, best_ms = [], None, math.inf

    def trial(c: GemmConfig) -> None:
        nonlocal best, best_ms
        key = (kind, block_m, c.block_n, c.block_k, c.num_warps, c.num_stages, c.tma)
        if key in failed:
            return
        try:
            ms, _ = graph_ms(lambda i: run(c, i), ROTATE, dev, budget_ms=60.0)
        except Exception as exc:  # out of shared memory or registers
            failed.add(key)
            rows.append(dict(kind="tune", gemm=kind, block_m=block_m, config=c.__dict__, error=str(exc)[:200]))
            return
        rows.append(dict(kind="tune", gemm=kind, block_m=block_m, config=c.__dict__, ms=ms))
        if ms < best_ms:
            best, best_ms = c, ms

    for c in gemm_candidates(kind, block_m, dry):
        trial(c)
    if best is not None and block_m >= 32 and not dry:
        for gm in GROUP_MS:
            if gm != best.group_m:
                trial(replace(best, group_m=gm))
    return best, best_ms, rows


def tune_block_m(shape: tuple, bm: int, naive: bool, w13, w2, inputs: list, dev, dry: bool, failed: set
                 ) -> tuple[MoEConfig | None, float, list[dict]]:
    """Best gate_up and down tiles at this BLOCK_M, and align + gate_up + down ms with them."""
    E = shape[0]
    routes = [fm.route(ids, E, bm) for _, ids, _ in inputs]
    align_ms = 0.0 if naive else graph_ms(lambda i: fm.moe_align(inputs[i][1], E, bm).sorted_ids, ROTATE, dev)[0]
    up, up_ms, rows = tune_gemm("up", bm, lambda c, i: fm.gate_up(inputs[i][0], w13, routes[i], c), dev, dry,
                                failed)
    rows.append(dict(kind="tune", gemm="align", block_m=bm, ms=align_ms))
    if up is None:
        return None, math.inf, rows
    hs = [fm.gate_up(inputs[i][0], w13, routes[i], up) for i in range(ROTATE)]
    ws = [w.reshape(-1) for _, _, w in inputs]
    dn, dn_ms, r2 = tune_gemm("down", bm, lambda c, i: fm.down(hs[i], w2, ws[i], routes[i], c), dev, dry, failed)
    if dn is None:
        return None, math.inf, rows + r2
    return MoEConfig(bm, up, dn), align_ms + up_ms + dn_ms, rows + r2


def tune_cell(shape: tuple, M: int, w13, w2, inputs: list, dev, dry: bool, failed: set
              ) -> tuple[list[MoEConfig], list[dict]]:
    """MoEConfigs for M tokens, fastest first by align + gate_up + down time (one per BLOCK_M tried)."""
    E, K, D, I = shape
    naive = use_naive_blocks(M, K, E)
    rows, ranked = [], []
    for bm in block_m_candidates(M * K / E, naive):
        cfg, ms, r = tune_block_m(shape, bm, naive, w13, w2, inputs, dev, dry, failed)
        rows += r
        if cfg is not None:
            ranked.append((ms, cfg))
    ranked.sort(key=lambda t: t[0])
    return [c for _, c in ranked] or [heuristic_config(M, E, K, I, D, "bfloat16", dev.type)], rows


# ---------------------------------------------------------------- timing the layer


def floor_ms(shape: tuple, M: int, ceilings: dict) -> tuple[float, float, float]:
    """(floor ms, weight bytes, FLOPs): max(touched-expert bytes / copy bandwidth, FLOPs / matmul rate),
    touched experts = E (1 - (1 - K/E)^M) under uniform routing (MEASURING.md)."""
    E, K, D, I = shape
    touched = E * (1 - (1 - K / E) ** M)
    nbytes, flops = touched * 3 * D * I * 2, 2 * M * K * 3 * D * I
    return max(nbytes / ceilings["copy_bytes_per_s"], flops / ceilings["matmul_flop_per_s"]) * 1e3, nbytes, flops


def time_cell(name: str, shape: tuple, M: int, w13, w2, inputs: list, cfg: MoEConfig | None, label: str,
              ceilings: dict, dev) -> dict:
    """Whole layer (align + gate_up + down + top-k sum) of the triton backend, graph replay over ROTATE sets."""
    if COOLDOWN_S and dev.type == "cuda":
        time.sleep(COOLDOWN_S)
    if cfg is None:
        fn = BACKENDS["triton"]
        ms, outs = graph_ms(lambda i: fn(*inputs[i], w13, w2, None), ROTATE, dev)
    else:
        ms, outs = graph_ms(lambda i: fm.fused_moe(*inputs[i], w13, w2, config=cfg), ROTATE, dev)
    clock = sm_clock_mhz(dev)
    eager = fm.fused_moe(*inputs[0], w13, w2, config=cfg)
    graph_diff = (outs[0].float() - eager.float()).abs().max().item()
    fl, nbytes, flops = floor_ms(shape, M, ceilings)
    ref = REFERENCE_MS.get(name)
    ref_ms = ref[MS.index(M)] if ref and M in MS else None
    return dict(kind="time", label=label, shape=name, M=M, ms=ms, tflops=flops / ms * 1e-9, gbps=nbytes / ms * 1e-6,
                floor_ms=fl, pct_floor=100 * fl / ms, ref_ms=ref_ms, speedup=ref_ms / ms if ref_ms else None,
                graph_vs_eager_maxdiff=graph_diff, sm_clock_mhz=clock, config=cfg.to_dict() if cfg else "shipped")


def _align_call(sets: list, E: int, bm: int, single: int, i: int) -> torch.Tensor:
    return ma.moe_align(sets[i], E, bm, single).sorted_ids


def align_sweep(dev: torch.device) -> tuple[list[dict], int]:
    """moe_align alone (graph replay), one program vs chunked programs; returns the rows and the largest slot
    count below the first one where one program is slower by more than 1 us (timing noise at a few us), the
    one-launch limit used for the rest of the run."""
    rows, g, limit = [], torch.Generator(device=dev).manual_seed(7), 1 << 30
    for E, K in ((8, 2), (64, 8), (128, 8)):
        for M in (8, 32, 64, 128, 256, 512, 1024, 2048):
            sets = [make_inputs(M, E, K, 16, dev, g)[1] for _ in range(ROTATE)]
            for bm in (16, 64):
                one, _ = graph_ms(functools.partial(_align_call, sets, E, bm, 1 << 30), ROTATE, dev, 30.0)
                chunked, _ = graph_ms(functools.partial(_align_call, sets, E, bm, 0), ROTATE, dev, 30.0)
                rows.append(dict(kind="align", E=E, K=K, M=M, slots=M * K, block_m=bm, one_ms=one, chunked_ms=chunked))
                if one > chunked + 1e-3:
                    limit = min(limit, M * K // 2)
    return rows, max(limit, 64)


def _sum_call(fn: Callable, ys: list, K: int, i: int) -> torch.Tensor:
    return fn(ys[i], K)


def sum_sweep(dev: torch.device) -> list[dict]:
    """The top-k sum alone: Triton moe_sum vs torch (graph replay), GB/s of bytes read + written."""
    rows, g = [], torch.Generator(device=dev).manual_seed(8)
    for T, K, D in ((1, 8, 2048), (64, 8, 2048), (1024, 8, 2048), (4096, 2, 4096), (16384, 2, 4096),
                    (16384, 8, 2048)):
        ys = [torch.randn(T * K, D, device=dev, generator=g).bfloat16() for _ in range(ROTATE)]
        row = dict(kind="sum", T=T, K=K, D=D)
        for name, fn in (("triton", msum.moe_sum), ("torch", msum.moe_sum_ref)):
            ms, _ = graph_ms(functools.partial(_sum_call, fn, ys, K), ROTATE, dev, 30.0)
            row[f"{name}_ms"], row[f"{name}_gbps"] = ms, (T * K + T) * D * 2 / ms * 1e-6
        rows.append(row)
    return rows


def self_test(dev: torch.device) -> list[str]:
    """moe_align and moe_sum against their references on this device; a kernel that fails or differs is
    replaced by its reference for the rest of the run (and the run says so), so that the timings still come."""
    notes, g = [], torch.Generator(device=dev).manual_seed(9)
    for M, E, K, bm in ((1, 64, 8, 16), (300, 64, 8, 16), (2000, 128, 8, 64), (5000, 8, 2, 128)):
        ids = make_inputs(M, E, K, 16, dev, g)[1]
        try:
            a, r = ma.moe_align(ids, E, bm), ma.moe_align_ref(ids, E, bm)
            n = int(r.num_padded)
            run = r.expert_ids.long().repeat_interleave(bm)[:n]
            canon = [torch.sort(run * (ids.numel() + 1) + t.sorted_ids[:n].long()).values for t in (a, r)]
            ok = int(a.num_padded) == n and torch.equal(a.expert_ids, r.expert_ids) and torch.equal(*canon)
        except Exception as exc:
            ok, n = False, f"{type(exc).__name__}: {exc}"[:300]
        if not ok:
            notes.append(f"moe_align FAILED self-test (M={M}, E={E}, K={K}, bm={bm}: {n}); using moe_align_ref")
            fm.moe_align = ma.moe_align_ref
            break
    y = torch.randn(37 * 8, 2048, device=dev, generator=g).bfloat16()
    try:
        ok = torch.allclose(msum.moe_sum(y, 8).float(), msum.moe_sum_ref(y, 8).float(), atol=3e-2, rtol=1e-2)
    except Exception as exc:
        ok = False
        notes.append(f"moe_sum raised {type(exc).__name__}: {str(exc)[:300]}")
    if not ok:
        notes.append("moe_sum FAILED self-test; using moe_sum_ref")
        fm.moe_sum = msum.moe_sum_ref
    return notes


def breakdown(name: str, M: int, w13, w2, inputs: list, cfg: MoEConfig, dev) -> dict:
    """Stage times inside the layer: graphs of align, align + gate_up, align + gate_up + down (differences)."""
    E = w13.shape[0]
    ws = [w.reshape(-1) for _, _, w in inputs]

    def upto(stage: int, i: int) -> torch.Tensor:
        r = fm.route(inputs[i][1], E, cfg.block_m)
        if stage == 0:
            return r.sorted_ids
        h = fm.gate_up(inputs[i][0], w13, r, cfg.gate_up)
        return h if stage == 1 else fm.down(h, w2, ws[i], r, cfg.down)

    t = [graph_ms(functools.partial(upto, s), ROTATE, dev)[0] for s in range(3)]
    return dict(kind="breakdown", shape=name, M=M, align_ms=t[0], gate_up_ms=t[1] - t[0], down_ms=t[2] - t[1],
                upto_down_ms=t[2])


# ---------------------------------------------------------------- main


def print_table(rows: list[dict], label: str) -> None:
    timed = [r for r in rows if r["kind"] == "time" and r["label"] == label]
    print(f"\n{label}: shape M ms TFLOP/s GB/s floor_ms %floor ref_ms speedup")
    for r in timed:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"{r['shape']:10s} {r['M']:6d} {r['ms']:8.4f} {r['tflops']:7.1f} {r['gbps']:7.0f} {r['floor_ms']:8.4f} "
              f"{r['pct_floor']:5.1f} {r['ref_ms'] or 0:8.3f} {sp:>7s}", flush=True)
    sps = [r["speedup"] for r in timed if r["speedup"]]
    if sps:
        geo = math.exp(sum(math.log(s) for s in sps) / len(sps))
        print(f"{label}: geomean speedup {geo:.3f}x over {len(sps)} cells; min {min(sps):.2f}x; "
              f"cells slower than reference: {sum(s < 1 for s in sps)}", flush=True)


def save(out: Path, result: dict) -> None:
    (out / "bench_moe.json").write_text(json.dumps(result, indent=1, default=str))


def check_shape(name: str, shape: tuple, ms: tuple, dev: torch.device) -> list[dict]:
    E, K, D, I = shape
    g = torch.Generator(device=dev).manual_seed(zlib.crc32(name.encode()) % 1000)
    w13, w2 = make_weights(E, D, I, dev, g)
    w13f, w2f = w13.float(), w2.float()
    rows = [r for M in ms for r in check_cell(name, M, shape, w13, w2, w13f, w2f, dev, g)]
    log(f"{name}: {sum(r['ok'] for r in rows)}/{len(rows)} checks passed")
    return rows


def bench_shape(name: str, shape: tuple, ms: tuple, tune: bool, result: dict, out: Path, dev, failed: set,
                rnd: int = 0) -> None:
    """Per M: tune (optional), then time the tuned, shipped and heuristic configs; write tuned configs. Rows are
    tagged with the round rnd; odd rounds take the token counts from the largest down and the heuristic before the
    shipped config, so that no cell always follows the same one."""
    E, K, D, I = shape
    flip = rnd % 2 == 1
    g = torch.Generator(device=dev).manual_seed(1 + zlib.crc32(name.encode()) % 1000)
    w13, w2 = make_weights(E, D, I, dev, g)
    tuned, rows, ceil = {}, result["rows"], result["ceilings"]
    for M in ms[::-1] if flip else ms:
        start = len(rows)
        inputs = [make_inputs(M, E, K, D, dev, g) for _ in range(ROTATE)]
        msg = f"{name} M={M}:"
        if tune:  # the faster whole layer of the two best BLOCK_M choices
            ranked, trows = tune_cell(shape, M, w13, w2, inputs, dev, dev.type == "cpu", failed)
            rows += [dict(r, shape=name, M=M) for r in trows]
            trials = [time_cell(name, shape, M, w13, w2, inputs, c, "tuned", ceil, dev) for c in ranked[:2]]
            best = min(range(len(trials)), key=lambda j: trials[j]["ms"])
            tuned[M] = ranked[best]
            rows += [dict(t, label="tuned-runner-up") for j, t in enumerate(trials) if j != best] + [trials[best]]
            r = rows[-1]
            msg += f" tuned {r['ms']:.4f} ms ({r['pct_floor']:.0f}% floor, {r['speedup'] or 0:.2f}x);"
            if M >= 1024 and dev.type == "cuda":
                rows.append(breakdown(name, M, w13, w2, inputs, tuned[M], dev))
        heur = heuristic_config(M, E, K, I, D, "bfloat16", dev.type)
        pair = [(None, "shipped"), (heur, "heuristic")]
        timed = {label: time_cell(name, shape, M, w13, w2, inputs, c, label, ceil, dev)
                 for c, label in (pair[::-1] if flip else pair)}
        rows += list(timed.values())  # in the order they ran
        r = timed["shipped"]
        msg += f" shipped {r['ms']:.4f} ms ({r['pct_floor']:.0f}% floor, {r['speedup'] or 0:.2f}x)"
        diffs = [r["graph_vs_eager_maxdiff"] for r in timed.values()]
        log(msg + f"; heuristic {timed['heuristic']['ms']:.4f} ms" +
            (f"; GRAPH != EAGER {diffs}" if max(diffs) > 0 else ""))
        for r in rows[start:]:
            r["round"] = rnd
        save(out, result)
    if tune:
        dev_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
        note = f"scripts/bench_moe_gpu.py --tune, triton {triton.__version__}, torch {torch.__version__}, {dev_name}"
        path = out / "configs" / config_file_name(E, I, D, dev_name, "bfloat16")
        path.parent.mkdir(exist_ok=True)
        save_config_file(path, tuned, note)
        bundle = out / "tuned_configs.json"  # all files in one, for copying back from machines that only pass
        files = json.loads(bundle.read_text()) if bundle.is_file() else {}  # plain file names
        files[path.name] = json.loads(path.read_text())
        bundle.write_text(json.dumps(files, indent=1))


def precompile(shapes: dict, ms: tuple, dev: torch.device, workers: int):
    jobs = compile_jobs(shapes, ms, str(dev), dev.type == "cpu")
    log(f"precompiling {len(jobs)} kernel variants on {workers} processes")
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    return pool, [pool.submit(_compile_job, j) for j in jobs]


def save_cache(out: Path) -> None:
    """The compiled kernels (cubin + metadata only) as one file, to seed TRITON_CACHE_DIR on a later run."""
    cache = os.environ.get("TRITON_CACHE_DIR")
    if cache and Path(cache).is_dir():
        with tarfile.open(out / "triton_cache.tgz", "w:gz") as tar:
            for f in Path(cache).rglob("*"):
                if f.is_file() and f.suffix in (".cubin", ".json"):
                    tar.add(f, arcname=str(f.relative_to(cache)))


def run_sweeps(result: dict, dev: torch.device) -> None:
    """Align (sets the one-launch limit for the run) and top-k sum microbenchmarks."""
    if fm.moe_align is ma.moe_align:
        rows, ma.SINGLE_PROGRAM_SLOTS = align_sweep(dev)
        result["rows"] += rows
        result["single_program_slots"] = ma.SINGLE_PROGRAM_SLOTS
        log(f"align: one program up to {ma.SINGLE_PROGRAM_SLOTS} slots; " + " ".join(
            f"E{r['E']}/n{r['slots']}/bm{r['block_m']}={r['one_ms'] * 1e3:.1f}|{r['chunked_ms'] * 1e3:.1f}us"
            for r in rows))
    result["rows"] += sum_sweep(dev)
    log("sum (T, K, D): triton | torch GB/s " + " ".join(
        f"({r['T']},{r['K']},{r['D']})={r['triton_gbps']:.0f}|{r['torch_gbps']:.0f}"
        for r in result["rows"] if r["kind"] == "sum"))


def median_rows(rows: list[dict]) -> list[dict]:
    """The timing rows of several rounds merged per (label, shape, M): the row of the median round (the lower
    middle one of an even count, so that the row is a measured one) with its own figures, and the rounds' times
    and spread beside it. Other rows pass through."""
    groups: dict[tuple, list[dict]] = {}
    out = []
    for r in rows:
        if r.get("kind") == "time":
            groups.setdefault((r["label"], r["shape"], r["M"]), []).append(r)
        else:
            out.append(r)
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r["ms"])
        mid = dict(ordered[(len(ordered) - 1) // 2])
        if len(group) > 1:
            mid.update(rounds_ms=[r["ms"] for r in group],
                       spread_pct=100 * (ordered[-1]["ms"] - ordered[0]["ms"]) / ordered[0]["ms"])
        out.append(mid)
    return out


def report(result: dict, t0: float) -> None:
    timed = median_rows(result["rows"])
    for label in ("tuned", "shipped", "heuristic"):
        print_table(timed, label)
    spreads = [r["spread_pct"] for r in timed if "spread_pct" in r]
    if spreads:
        rounds = max(len(r["rounds_ms"]) for r in timed if "rounds_ms" in r)
        print(f"rounds: {rounds} per cell, median taken; spread between rounds median "
              f"{sorted(spreads)[len(spreads) // 2]:.1f} %, max {max(spreads):.1f} %", flush=True)
    for r in result["rows"]:
        if r["kind"] == "breakdown":
            print(f"breakdown {r['shape']:10s} {r['M']:6d}: align {r['align_ms'] * 1e3:7.1f} us, gate_up "
                  f"{r['gate_up_ms'] * 1e3:8.1f} us, down {r['down_ms'] * 1e3:8.1f} us (in the layer)")
    checks = [r for r in result["rows"] if r["kind"] == "check"]
    print(f"checks: {sum(r['ok'] for r in checks)}/{len(checks)} passed; worst rel err "
          f"{max((r['rel_err'] for r in checks), default=0):.2e}; total {time.time() - t0:.0f} s", flush=True)


def quant_summary(rows: list[dict]) -> list[str]:
    """Per (shape, M): each format's triton time and speedup over bf16 triton, against the issue's targets
    (fp8 >= 1.6x at M <= 256, >= 1.3x at M >= 4096); per format: worst rel err vs its dequantized oracle and vs
    the float32 oracle of the unquantized weights."""
    ms = {(r["shape"], r["M"], r["dtype"]): r["value"] for r in rows
          if r["metric"] == "layer_ms" and r["backend"] == "triton"}
    lines = ["quant: shape M format ms speedup_vs_bf16 target"]
    for (shape, M, dtype), t in sorted(ms.items()):
        base = ms.get((shape, M, "bf16"))
        if dtype == "bf16" or base is None:
            continue
        target = 1.6 if M <= 256 else 1.3 if M >= 4096 else None
        sp = base / t
        verdict = "" if target is None or not dtype.startswith("fp8") else (" ok" if sp >= target else " MISSED")
        lines.append(f"quant: {shape:10s} {M:6d} {dtype:13s} {t:8.4f} {sp:5.2f}x" + (
            f" (target {target}x{verdict})" if target and dtype.startswith("fp8") else ""))
    for dtype in kb.QUANT_FORMATS:
        checks = [r for r in rows if r["metric"] == "rel_err" and r["dtype"] == dtype and r["backend"] == "triton"]
        if checks:
            lines.append(f"quant: {dtype}: {sum(bool(r['ok']) for r in checks)}/{len(checks)} checks ok; worst rel "
                         f"err vs dequantized oracle {max(r['value'] for r in checks):.2e}, vs float32 "
                         f"unquantized {max(r['rel_err_vs_float'] for r in checks):.2e}")
    return lines


def quant_main(args: argparse.Namespace, dev: torch.device, out: Path) -> None:
    """--quant: bf16 and every quantized format through moelab.lab.kernel_bench (checks, then graph timings)."""
    shapes = DRY_SHAPES if args.dry else SHAPES
    shapes = {k: shapes[k] for k in (args.shapes.split(",") if args.shapes else shapes)}
    ms = tuple(int(m) for m in args.ms.split(",")) if args.ms else (DRY_MS if args.dry else MS)
    formats = tuple(args.formats.split(",")) if args.formats else kb.QUANT_FORMATS
    unknown = set(formats) - set(kb.QUANT_FORMATS)
    if unknown:
        raise SystemExit(f"--formats: unknown {sorted(unknown)}; allowed: {', '.join(kb.QUANT_FORMATS)}")
    dtypes = ("fp32" if args.dry else "bf16",) + formats
    fm.set_act_quant(args.act_quant)
    fm.SWAP_AB_FP8 = not args.no_swap_ab
    if args.merge_gu:
        fm.MERGE_GU_BLOCK = args.merge_gu == "on"
    if args.warp_spec_down:
        fm.WARP_SPEC_DOWN = args.warp_spec_down == "on"
    log(f"fp8 activations quantized: {fm.ACT_QUANT}; swapped products below 64 rows: {fm.SWAP_AB_FP8}; block-scale "
        f"gate and up as one operand: {fm.MERGE_GU_BLOCK}; down warp-specialized: {fm.WARP_SPEC_DOWN}")
    cfg = kb.KernelBenchConfig(shapes=shapes, ms=ms, dtypes=dtypes, backends=("naive", "triton"),
                               device=dev.type)
    if dev.type == "cuda" and args.workers > 1 and args.act_quant == "fused" and not args.no_swap_ab \
            and args.merge_gu != "on" and args.warp_spec_down != "on":  # (the workers compile the defaults)
        try:  # (the worker processes compile the default variants only)
            kb.precompile_in_use(shapes, ms, dtypes, "cuda", args.workers, log=log)
        except Exception as exc:  # only a head start: the run compiles what is missing as it goes
            log(f"precompile failed ({type(exc).__name__}: {exc}); compiling serially")
    rows = kb.run(cfg, log=log)
    if args.dry:  # the summary compares against "bf16"
        rows = [dict(r, dtype="bf16") if r.get("dtype") == "fp32" else r for r in rows]
    (out / "bench_moe_quant.json").write_text(json.dumps(dict(device=str(dev), torch=torch.__version__,
                                                              triton=triton.__version__, rows=rows), indent=1,
                                                         default=str))
    print(kb.format_table(rows))
    print("\n".join(quant_summary(rows)), flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tune", action="store_true")
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    p.add_argument("--shapes", default="")
    p.add_argument("--ms", default="")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--quant", action="store_true", help="bf16 vs fp8_tensor/channel/block and int8_channel")
    p.add_argument("--rounds", type=int, default=1, help="time every cell this many times, round after round; "
                                                         "the tables report the median (not with --quant)")
    p.add_argument("--cooldown", type=float, default=0.0, help="idle seconds before each timing (the clock "
                                                              "recovers from the one before)")
    p.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    p.add_argument("--formats", default="", help="with --quant: a comma list of quantized formats (default all)")
    p.add_argument("--act-quant", default="fused", choices=("fused", "separate"),
                   help="with --quant: where W8A8 layers quantize activations (moelab/kernels/fused_moe.py)")
    p.add_argument("--no-swap-ab", action="store_true",
                   help="with --quant: fp8 GEMMs never transposed (fused_moe.swap_ab), for A/B timings")
    p.add_argument("--merge-gu", choices=("on", "off"), default=None,
                   help="with --quant: fp8_block gate_up with gate and up as one dot operand or two "
                        "(fused_moe.merge_gate_up; default: the module's setting), for A/B timings")
    p.add_argument("--warp-spec-down", choices=("on", "off"), default=None,
                   help="with --quant: the down GEMM warp-specialized where Triton can (fused_moe.warp_spec_down; "
                        "default: the module's setting), for A/B timings")
    args = p.parse_args()
    if args.rounds < 1 or (args.rounds != 1 and (args.quant or args.tune)):
        p.error(f"--rounds must be a positive count, and 1 with --quant or --tune (got {args.rounds})")
    if not 0 <= args.cooldown <= 60 or (args.quant and args.cooldown):
        p.error(f"--cooldown must be 0 to 60 seconds, and 0 with --quant (got {args.cooldown})")
    return args


def main() -> None:
    args, t0 = parse_args(), time.time()
    global COOLDOWN_S
    COOLDOWN_S = args.cooldown
    dev = torch.device("cpu" if args.dry else "cuda")
    all_shapes = DRY_SHAPES if args.dry else SHAPES
    shapes = {k: all_shapes[k] for k in (args.shapes.split(",") if args.shapes else all_shapes)}
    ms = tuple(int(m) for m in args.ms.split(",")) if args.ms else (DRY_MS if args.dry else MS)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    if args.quant:
        quant_main(args, dev, out)
        return
    result = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
                  triton=triton.__version__, args=vars(args), rows=[], notes=[],
                  ceilings=measure_ceilings(dev) if dev.type == "cuda" else {"copy_bytes_per_s": 3e12,
                                                                             "matmul_flop_per_s": 7.98e14})
    c = result["ceilings"]
    log(f"{result['device']} torch {torch.__version__} triton {triton.__version__}; ceilings "
        f"{c['copy_bytes_per_s'] / 1e12:.2f} TB/s copy, {c['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s bf16 matmul")
    if dev.type == "cuda":
        result["notes"] = self_test(dev)
        for note in result["notes"]:
            log(note)
    pool, futures = precompile(shapes, ms, dev, args.workers) if args.tune and args.workers > 1 else (None, [])
    if not args.no_check:
        for name, shape in shapes.items():
            result["rows"] += check_shape(name, shape, ms, dev)
        save(out, result)
    if pool is not None:
        done = [f.result() for f in futures]
        pool.shutdown()
        result["precompile"] = [dict(job=str(j[:7]), s=s, error=e) for j, s, e in done]
        log(f"precompiled {len(done)} variants ({sum(bool(e) for _, _, e in done)} failed), "
            f"{time.time() - t0:.0f} s since start")
    if args.tune and dev.type == "cuda":
        run_sweeps(result, dev)
    failed: set = set()
    for rnd in range(args.rounds):  # round after round over all cells; odd rounds in the reverse order
        items = list(shapes.items())
        for name, shape in items[::-1] if rnd % 2 else items:
            bench_shape(name, shape, ms, args.tune, result, out, dev, failed, rnd)
    if args.rounds > 1:  # the medians the tables print, with each cell's rounds and spread
        result["medians"] = [r for r in median_rows(result["rows"]) if r.get("kind") == "time"]
    if dev.type == "cuda":
        result["ceilings_end"] = measure_ceilings(dev)
        save_cache(out)
    save(out, result)
    report(result, t0)


if __name__ == "__main__":
    main()
