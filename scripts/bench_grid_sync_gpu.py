"""Is a persistent decode kernel worth building? What one step boundary costs, three ways, on the GPU.

A batch-1 decode layer is a chain of about eight kernels; between two of them the GPU pays a boundary: under PDL
(programmatic dependent launch, moelab.kernels.pdl) the next kernel's programs are resident and wait in
`griddepcontrol.wait` until the previous grid has finished and flushed. A persistent kernel (one launch per layer
or step, one program per SM) would replace each boundary with a software grid barrier: an atomic arrival on a
counter in global memory, then polling it until every program has arrived. This script measures both, with the
same work between boundaries:

- `barrier`: one launch of P programs (P = number of SMs) running N phases separated by grid barriers;
- `pdl`: N launches of P programs in one CUDA graph, each `gdc_wait` then its phase (PDL on);
- `serial`: the same N launches without PDL.

A phase streams `--phase-bytes` of a weight buffer split over the programs (a GEMV's reads; 0 = an empty phase,
the bare boundary) and writes one value per program. Rows: us per phase for each way, and barrier - pdl (what a
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
from moelab.kernels.pdl import gdc_prologue, launch_options  # noqa: E402


@triton.jit
def _phase(w_ptr, out_ptr, pid, n_per, BLOCK: tl.constexpr):
    """Stream this program's n_per values of w and store their sum (kept, so the loads are not dropped)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = w_ptr + pid.to(tl.int64) * n_per
    for k in range(0, n_per, BLOCK):
        acc += tl.load(base + k + offs, mask=k + offs < n_per, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _barrier_kernel(w_ptr, out_ptr, count_ptr, n_per, phases, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    for i in range(phases):
        _phase(w_ptr, out_ptr, pid, n_per, BLOCK)
        tl.debug_barrier()  # every thread's stores before the arrival (release)
        tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
        target = (i + 1) * P
        # poll with a compare-and-swap that never swaps (-1 is no count): an acquire read of the counter
        seen = tl.atomic_cas(count_ptr, -1, -1, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_cas(count_ptr, -1, -1, sem="acquire", scope="gpu")


@triton.jit
def _step_kernel(w_ptr, out_ptr, n_per, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)
    _phase(w_ptr, out_ptr, tl.program_id(0), n_per, BLOCK)


def graph_us(fn, reps: int = 20) -> float:
    """Median us of one replay of a CUDA graph holding fn's launches."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(nbytes: float, P: int, N: int, B: int, warps: int, dev: torch.device) -> dict:
    n_per = max(1, int(nbytes) // 2 // P)  # bf16 values per program per phase
    w = torch.randn(P * n_per, device=dev, dtype=torch.bfloat16)
    out = torch.empty(P, device=dev, dtype=torch.float32)
    count = torch.zeros(1, device=dev, dtype=torch.int32)

    def barrier() -> None:
        count.zero_()
        _barrier_kernel[(P,)](w, out, count, n_per, N, BLOCK=B, num_warps=warps)

    def chain(pdl: bool) -> None:
        opts = launch_options(dev) if pdl else {"USE_PDL": False}
        for _ in range(N):
            _step_kernel[(P,)](w, out, n_per, BLOCK=B, num_warps=warps, **opts)

    barrier()
    torch.cuda.synchronize()
    ok = int(count.item()) == N * P
    t_bar = graph_us(barrier) / N
    t_pdl = graph_us(lambda: chain(True)) / N
    t_ser = graph_us(lambda: chain(False)) / N
    return dict(phase_bytes=int(P * n_per * 2), programs=P, phases=N, barrier_us=t_bar, pdl_us=t_pdl,
                serial_us=t_ser, barrier_minus_pdl_us=t_bar - t_pdl, counts_ok=ok, device=torch.cuda.get_device_name())


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
