"""Is a persistent decode kernel worth building? What one step boundary costs, three ways, on the GPU.

A batch-1 decode layer is a chain of about eight kernels; between two of them the GPU pays a boundary: under PDL
(programmatic dependent launch, moelab.kernels.pdl) the next kernel's programs are resident and wait in
`griddepcontrol.wait` until the previous grid has finished and flushed. A persistent kernel (one launch per layer
or step, one program per SM) would replace each boundary with a software grid barrier: an atomic arrival on a
counter in global memory, then polling it until every program has arrived. This script measures both, with the
same work between boundaries:

- `barrier`: one launch of P programs (P = number of SMs) running N phases separated by grid barriers, polled two
  ways (an acquire compare-and-swap by one thread; an acquire load by every thread, as cooperative groups do);
- `pdl`: N launches of P programs in one CUDA graph, each `gdc_wait` then its phase (PDL on);
- `serial`: the same N launches without PDL.

A phase streams `--phase-bytes` of a weight buffer split over the programs (a GEMV's reads; 0 = an empty phase,
the bare boundary), each phase its own slice of a buffer more than twice the L2 (each decode kernel reads weights
of its own), and writes one value per program; after each barrier every program reads its neighbour's value of the
phase before, which the host checks. Rows: us per phase for each way, and the better barrier - pdl (what a
persistent kernel would save per boundary). Context: docs/perf/engine.md, v9 (about 19 us a layer of
latency-bound kernels, 7-8 boundaries a layer).

    PYTHONPATH=. python scripts/bench_grid_sync_gpu.py [--phases 64] [--phase-bytes 0 1e6 8e6 25e6]

A software grid barrier needs every program resident at once (P <= SMs x programs per SM); this script launches
one program per SM, and the barrier kernel cannot run under the Triton interpreter (it runs programs one after the
other, so the first one would wait forever).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention_gpu import graph_ms  # noqa: E402

from moelab.kernels.pdl import gdc_prologue, launch_options  # noqa: E402


@triton.jit
def _phase(w_ptr, out_ptr, pid, i, n_per, slices, P, BLOCK: tl.constexpr):
    """Phase i: stream this program's n_per values of slice i % slices of w (slices together span more than twice
    the L2, so each phase reads from memory, as each decode kernel reads weights of its own) and store their sum
    in out[i % 2, pid] (kept, so the loads are not dropped)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = w_ptr + ((i % slices) * P + pid).to(tl.int64) * n_per
    for k in range(0, n_per, BLOCK):
        acc += tl.load(base + k + offs, mask=k + offs < n_per, other=0.0).to(tl.float32)
    tl.store(out_ptr + (i % 2) * P + pid, tl.sum(acc, axis=0) + i)


@triton.jit
def _poll(count_ptr, POLL: tl.constexpr):
    if POLL == 0:  # an acquire compare-and-swap that never swaps (-1 is no count); one thread, broadcast
        return tl.atomic_cas(count_ptr, -1, -1, sem="acquire", scope="gpu")
    else:  # an acquire load, as cooperative groups' grid sync polls (every thread, the same address)
        return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [count_ptr],
                                         dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _barrier_kernel(w_ptr, out_ptr, chk_ptr, count_ptr, n_per, slices, phases, BLOCK: tl.constexpr,
                    POLL: tl.constexpr = 0, USE_PDL: tl.constexpr = False):
    """phases phases separated by grid barriers; after each barrier a program reads what its neighbour wrote in
    the phase before into chk[i, pid] (the host checks them: a barrier without the ordering shows there)."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    for i in range(phases):
        if i > 0:
            tl.store(chk_ptr + i * P + pid, tl.load(out_ptr + ((i - 1) % 2) * P + (pid + 1) % P, volatile=True))
        _phase(w_ptr, out_ptr, pid, i, n_per, slices, P, BLOCK)
        tl.debug_barrier()  # every thread's stores before the arrival (release)
        tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
        target = (i + 1) * P
        seen = _poll(count_ptr, POLL)
        while seen < target:
            seen = _poll(count_ptr, POLL)


@triton.jit
def _step_kernel(w_ptr, out_ptr, i, n_per, slices, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)
    _phase(w_ptr, out_ptr, tl.program_id(0), i, n_per, slices, tl.num_programs(0), BLOCK)


def measure(nbytes: float, P: int, N: int, B: int, warps: int, dev: torch.device) -> dict:
    n_per = max(1, int(nbytes) // 2 // P)  # bf16 values per program per phase
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    slices = max(1, -(-2 * l2 // max(1, P * n_per * 2)))  # phases' slices span more than twice the L2
    w = torch.randn(slices * P * n_per, device=dev, dtype=torch.bfloat16)
    out = torch.zeros(2, P, device=dev, dtype=torch.float32)
    chk = torch.zeros(N, P, device=dev, dtype=torch.float32)
    count = torch.zeros(1, device=dev, dtype=torch.int32)
    pdl = launch_options(dev)
    if not pdl.get("launch_pdl"):
        raise RuntimeError("this Triton or GPU cannot launch with PDL: the pdl row would equal the serial one")

    def barrier(poll: int) -> None:
        count.zero_()
        _barrier_kernel[(P,)](w, out, chk, count, n_per, slices, N, BLOCK=B, POLL=poll, num_warps=warps)

    def chain(opts: dict) -> None:
        for i in range(N):
            _step_kernel[(P,)](w, out, i, n_per, slices, BLOCK=B, num_warps=warps, **opts)

    row = dict(phase_bytes=int(P * n_per * 2), slices=slices, programs=P, phases=N, pdl_launch=True)
    for poll, name in ((0, "barrier_cas"), (1, "barrier_ld")):
        barrier(poll)
        torch.cuda.synchronize()
        # every arrival counted, and after each barrier the neighbour's value of the phase before was there
        want = torch.roll(out[(N - 2) % 2], -1)
        row[f"{name}_ok"] = bool(int(count.item()) == N * P and torch.equal(chk[N - 1], want)
                                 and bool((chk[1:] != 0).all()))
        row[f"{name}_us"] = graph_ms([lambda: barrier(poll)]) * 1e3 / N  # noqa: B023 (called before poll changes)
    row["pdl_us"] = graph_ms([lambda: chain(pdl)]) * 1e3 / N
    row["serial_us"] = graph_ms([lambda: chain({"USE_PDL": False})]) * 1e3 / N
    best = min(row["barrier_cas_us"], row["barrier_ld_us"])
    row["best_barrier_minus_pdl_us"] = best - row["pdl_us"]
    row["device"] = torch.cuda.get_device_name()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", type=int, default=64)
    ap.add_argument("--phase-bytes", type=float, nargs="+", default=[0, 1e6, 8e6, 25e6])
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--warps", type=int, default=8)
    args = ap.parse_args()
    dev = torch.device("cuda")
    P = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    for nbytes in args.phase_bytes:
        row = measure(nbytes, P, args.phases, args.block, args.warps, dev)
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "grid_sync.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
