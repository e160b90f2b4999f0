"""Which loop shapes Triton warp-specializes for Hopper (sm_90), compiled on any machine (no GPU, no launch).

    python scripts/probe_warp_spec_sm90.py            (TRITON_INTERPRET must be unset)

A 128x128 GEMM with `tl.range(..., warp_specialize=True)`, in the variants moelab's MoE GEMMs would need: both tiles
by TMA; A by pointer loads (gate_up's gathered rows); two products a K step (gate and up); each product scaled before
it is added (block scales); an early return before the loop (every MoE GEMM's "past the padded rows"). Prints one
line per (variant, dtype, warps): "specialized", "not specialized" (the loop left as it is) or "pass failed".
docs/perf/moe_kernels.md, session 15, has the answers of Triton 3.6 (the GPU image's) and 3.8.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

VARIANTS = {0: "both tiles by TMA", 1: "A by pointer loads", 2: "two products a K step", 3: "scaled products",
            4: "early return before the loop"}


@triton.jit
def _probe(a_desc, b_desc, a_ptr, s_ptr, n_ptr, c_ptr, K, V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           BK: tl.constexpr):
    if V == 4:
        if tl.program_id(0) * BM >= tl.load(n_ptr):
            return
    acc = tl.zeros((BM, BN), tl.float32)
    acc2 = tl.zeros((BM, BN), tl.float32)
    om = tl.arange(0, BM)
    on = tl.arange(0, BN)
    a_ptrs = a_ptr + om[:, None] * K + tl.arange(0, BK)[None, :]
    for kk in tl.range(0, tl.cdiv(K, BK), warp_specialize=True):
        if V == 1:
            a = tl.load(a_ptrs)
            a_ptrs += BK
        else:
            a = a_desc.load([0, kk * BK])
        b = b_desc.load([0, kk * BK])
        if V == 2:
            acc2 = tl.dot(a, b_desc.load([BN, kk * BK]).T, acc2)
            acc = tl.dot(a, b.T, acc)
        elif V == 3:
            acc += tl.dot(a, b.T) * tl.load(s_ptr + kk)
        else:
            acc = tl.dot(a, b.T, acc)
    tl.store(c_ptr + om[:, None] * BN + on[None, :], acc + acc2)


def probe(variant: int, dtype: str, num_warps: int) -> str:
    bk = 64 if dtype == "bf16" else 128
    sig = {"a_desc": f"tensordesc<{dtype}[128, {bk}]>", "b_desc": f"tensordesc<{dtype}[128, {bk}]>",
           "a_ptr": f"*{dtype}", "s_ptr": "*fp32", "n_ptr": "*i32", "c_ptr": "*fp32", "K": "i32", "V": "constexpr",
           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    src = ASTSource(fn=_probe, signature=sig, constexprs={(7,): variant, (8,): 128, (9,): 128, (10,): bk},
                    attrs={(i,): [["tt.divisibility", 16]] for i in (2, 3, 4, 5, 6)})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})
    except Exception:  # noqa: BLE001 (the pass asserts or fails: that is the answer)
        return "pass failed"
    return "specialized" if "ttg.warp_specialize" in k.asm["ttgir"] else "not specialized"


def main() -> None:
    print(f"triton {triton.__version__}, sm_90")
    for v, name in VARIANTS.items():
        for dtype in ("bf16", "fp8e4nv"):
            for nw in (4, 8):
                print(f"{name:32s} {dtype:8s} {nw} warps: {probe(v, dtype, nw)}", flush=True)


if __name__ == "__main__":
    main()
