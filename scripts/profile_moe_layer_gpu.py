"""Kernel times inside one fused MoE layer call (CUDA graph replays under torch.profiler), per dtype.

    PYTHONPATH=. python scripts/profile_moe_layer_gpu.py olmoe:1,256 mixtral:1 --dtypes bf16 fp8_channel

For each (shape, M, dtype): the layer's graph (moelab.lab.kernel_bench's weights and uniform routing) replayed
`--replays` times under the profiler; prints each kernel's mean us per layer call and the sum next to the
layer's graph time, and writes the rows to $OUT/profile_moe_layer.json. Programmatic dependent launch is off
unless --pdl (under it a kernel starts before its predecessor ends and its time includes the wait, so kernel
times overlap and do not add up); each kernel's exposed time (how far its end moves the latest end before it,
moelab.lab.profile.exposed_times) is reported beside it and does add up, to the busy time per call.
--calls N: the graph holds N layer calls on N input sets (the same weights), as the kernel bench's graphs do
(kernel_bench.ROTATE); per call it also reports the idle time (no kernel running) charged to the kernel whose start
ends it (moelab.lab.profile.idle_before), so that exposed + idle add up to the replay's span: where a layer that
runs slower than its busy time waits (the first kernel of a replay also carries the gap between two replays, the
graph's launch, divided by N).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from moelab.kernels import fused_moe as fm
from moelab.kernels import pdl
from moelab.lab import kernel_bench as kb
from moelab.lab.profile import exposed_times, idle_before


def profile_cell(shape: tuple, M: int, dtype: str, replays: int, calls: int = 1) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    wts = kb.make_weights(shape, dtype, "cuda", g)
    sets = [kb.make_inputs(M, shape, kb.act_dtype(dtype, "cuda"), "cuda", g) for _ in range(calls)]
    quant = {} if wts["scales"] is None else dict(quant=dtype, w13_scale=wts["scales"].w13_scale,
                                                 w2_scale=wts["scales"].w2_scale)

    def call(i: int) -> torch.Tensor:
        return fm.fused_moe(*sets[i], wts["w13"], wts["w2"], **quant)

    layer_ms = kb.graph_ms(call, calls, "cuda")[0]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    us: dict[str, float] = defaultdict(float)
    exposed: dict[str, float] = defaultdict(float)
    idle: dict[str, float] = defaultdict(float)
    evs = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(ev.time_range.start, ev.time_range.end) for ev in evs]
    n = replays * calls  # per layer call
    for ev, t, gap in zip(evs, exposed_times(spans), idle_before(spans)):
        us[ev.name[:60]] += ev.device_time / n
        exposed[ev.name[:60]] += t / n
        idle[ev.name[:60]] += gap / n  # (the gaps between replays too, when calls = 1: the graph launches)
    return dict(shape=shape, M=M, dtype=dtype, calls=calls, layer_ms=layer_ms, kernels_us=dict(us),
                sum_us=sum(us.values()), kernels_exposed_us=dict(exposed), exposed_us=sum(exposed.values()),
                idle_before_us=dict(idle), idle_us=sum(idle.values()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cells", nargs="+", help="shape:M1,M2 (shapes: " + ", ".join(kb.SHAPES) + ")")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp8_channel"])
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--pdl", action="store_true")
    ap.add_argument("--calls", type=int, default=1, help="layer calls per graph, each on its own input set")
    args = ap.parse_args()
    pdl.set_enabled(args.pdl)
    rows = []
    for cell in args.cells:
        name, ms = cell.split(":")
        for M in (int(m) for m in ms.split(",")):
            for dtype in args.dtypes:
                r = profile_cell(kb.SHAPES[name], M, dtype, args.replays, args.calls)
                rows.append(dict(r, shape=name))
                parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["kernels_us"].items(), key=lambda kv: -kv[1]))
                tag = " (pdl)" if args.pdl else ""
                print(f"{name} M={M} {dtype}{tag}: layer {r['layer_ms'] * 1e3:.1f} us (graph), kernels "
                      f"{r['sum_us']:.1f} us: {parts}", flush=True)
                exp = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["kernels_exposed_us"].items(),
                                                                 key=lambda kv: -kv[1]))
                print(f"  exposed {r['exposed_us']:.1f} us: {exp}", flush=True)
                if args.calls > 1:
                    gaps = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["idle_before_us"].items(),
                                                                       key=lambda kv: -kv[1]))
                    print(f"  idle {r['idle_us']:.1f} us a call ({args.calls} calls a graph; before): {gaps}",
                          flush=True)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_moe_layer.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
