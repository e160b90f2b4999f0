"""Check every MoE backend against the naive oracle in bf16 on the GPU and time it (a first look, eager mode,
median of CUDA-event timings over rotating inputs). The full kernel benchmark is `moelab bench kernels`
(issue 4); this script exists so the numbers in docs/perf/ can be re-run.

    python scripts/check_backends_gpu.py
"""

from __future__ import annotations

import functools
import statistics

import torch

from moelab.layers.moe.backends import BACKENDS, naive_moe

SHAPES = {"olmoe": (64, 8, 2048, 1024), "mixtral": (8, 2, 4096, 14336)}


def case(M, E, K, D, I, g):
    x = torch.randn(M, D, device="cuda", generator=g).bfloat16()
    ids = torch.rand(M, E, device="cuda", generator=g).topk(K, dim=-1).indices
    w = torch.rand(M, K, device="cuda", generator=g).softmax(-1)
    return x, ids, w


def time_ms(fn, inputs, reps=20):
    for x, ids, w in inputs[:2]:
        fn(x, ids, w)
    times = []
    for r in range(reps):
        x, ids, w = inputs[r % len(inputs)]
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(x, ids, w)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def _call(fn, w13, w2, x, ids, w):
    return fn(x, ids, w, w13, w2, None)


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    print(f"{'shape':8s} {'M':>5s} {'backend':8s} {'rel err':>9s} {'ms':>8s}")
    for name, (E, K, D, I) in SHAPES.items():
        w13 = (torch.randn(E, 2 * I, D, device="cuda", generator=g) / D ** 0.5).bfloat16()
        w2 = (torch.randn(E, D, I, device="cuda", generator=g) / I ** 0.5).bfloat16()
        for M in (1, 64, 1024, 4096):
            inputs = [case(M, E, K, D, I, g) for _ in range(3)]
            x, ids, w = inputs[0]
            ref = naive_moe(x.float(), ids, w, w13.float(), w2.float())
            for bname, fn in BACKENDS.items():
                out = fn(x, ids, w, w13, w2, None)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = time_ms(functools.partial(_call, fn, w13, w2), inputs)
                print(f"{name:8s} {M:5d} {bname:8s} {err:9.2e} {ms:8.3f}", flush=True)


if __name__ == "__main__":
    main()
