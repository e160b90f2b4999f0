"""Compile moelab's decode-path Triton kernels for an H100/H200 (sm_90) on any machine, GPU or not: Triton's NVIDIA
backend lowers each to PTX and its bundled ptxas to a cubin; nothing is launched. Prints one JSON object: per
kernel case, whether it compiled, the PDL waits in its PTX, its shared memory and its local (spilled) bytes.

    python scripts/compile_sm90.py            (TRITON_INTERPRET must be unset: the interpreter has no compiler)

Signatures are built from each kernel's parameters: pointers named in the case (bf16 unless given), float scalars
named in FLOATS, every other runtime argument int32; constexprs as the launches in moelab pass them.
tests/test_compile_sm90.py runs this in CI, where no GPU is.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

import triton  # noqa: E402
import triton.backends.nvidia as _nv  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BIN = Path(_nv.__file__).parent / "bin"

FLOATS = {"eps", "scale", "qk_scale"}
H100_SHARED = 227 * 1024


def compile_sm90(fn, ptrs: dict[str, str], constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    params = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for p in params:
        if p in constexprs:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = ptrs.get(p, "*bf16")
        else:
            sig[p] = "fp32" if p in FLOATS else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def local_bytes(cubin: bytes) -> int:
    """Per-thread local memory (register spills) of the compiled kernel, from cuobjdump's resource usage."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        out = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", str(f)], capture_output=True,
                             text=True, check=True)
    fields = dict(tok.split(":", 1) for line in out.stdout.splitlines() if "REG:" in line for tok in line.split()
                  if ":" in tok)
    return int(fields["LOCAL"])


def _attention(max_query_len: int, group: int, dk: int, dv: int, kv_heads: int, **over):
    """The attention kernel as paged_attention launches it (its default launch config for this shape)."""
    from moelab.kernels import paged_attention as pa

    cfg = pa.default_config(max_query_len, group, dk, dv, kv_heads, 132)
    d_main = max(16, 1 << (dk.bit_length() - 1))
    dv_pad = pa._pow2(dv)
    c = dict(DK=dk, DV=dv, D_MAIN=d_main, D_TAIL=pa._pow2(dk - d_main) if dk > d_main else 0, DV_PAD=dv_pad,
             V_IS_K=False, KV_HEADS=kv_heads, GROUP=group, HPP=cfg.heads_per_prog,
             NUM_HCHUNK=-(-group // cfg.heads_per_prog), BLOCK_Q=cfg.block_q,
             BLOCK_M=pa._pow2(cfg.block_q * cfg.heads_per_prog), BLOCK_N=cfg.block_n, BLOCK_SIZE=16,
             ONE_TILE_PER_SEQ=max_query_len <= cfg.block_q, SPLIT=max_query_len == 1, FUSE_REDUCE=False,
             SPLITS_PAD=16, USE_PDL=True)
    c.update(over)
    ptrs = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "count_ptr": "*i32", "cu_ptr": "*i32",
            "seq_lens_ptr": "*i32", "bt_ptr": "*i32"}
    return pa._paged_attention_kernel, ptrs, c, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _cases():
    from moelab.kernels import argmax, gemv, qk_rope_store, rms_norm, topk_router
    from moelab.kernels import paged_attention as pa

    yield "attention-decode-fused-reduce", *_attention(1, 1, 128, 128, 16, FUSE_REDUCE=True)  # OLMoE, Qwen1.5
    yield "attention-decode-gqa", *_attention(1, 4, 128, 128, 8, FUSE_REDUCE=True)  # Mixtral
    yield "attention-decode-mla", *_attention(1, 16, 576, 512, 1, V_IS_K=True)  # DeepSeek-V2-Lite's latent
    yield "attention-prefill", *_attention(2048, 1, 128, 128, 16)
    yield "split-reduce", pa._split_reduce_kernel, {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}, dict(
        DV=512, DV_PAD=512, SPLITS_PAD=16, UNROLL=False, USE_PDL=True), {}
    yield "router-topk", topk_router._router_gemm_topk_kernel, {
        "part_ptr": "*fp32", "count_ptr": "*i32", "w_ptr": "*fp32", "ids_ptr": "*i64"}, dict(
        K=8, KP=8, BLOCK_T=16, BLOCK_E=64, BLOCK_D=128, SIGMOID=False, RENORM=False, PRECISION="tf32", SPLIT=True,
        MAX_SPLITS=16, USE_PDL=True), dict(num_stages=3)
    yield "argmax", argmax._argmax_kernel, {"out_ptr": "*i64", "part_v_ptr": "*fp32", "part_i_ptr": "*i32",
                                            "part_n_ptr": "*i32", "count_ptr": "*i32"}, dict(
        BLOCK=2048, SPLITS_PAD=32, USE_PDL=True), {}
    yield "gemv", gemv._gemv_kernel, {}, dict(HAS_BIAS=True, BLOCK_N=8, BLOCK_K=1024, USE_PDL=True), {}
    yield "qk-rope-store", qk_rope_store._qk_rope_store_kernel, {
        "pos_ptr": "*i64", "slot_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}, dict(
        H=16, KV=16, HP=16, KVP=16, HALF=64, NORM=1, INTERLEAVED=False, USE_PDL=True), {}
    yield "add-rms-norm-topk-sum", rms_norm._add_rms_norm_kernel, {}, dict(
        BLOCK=2048, TOP_K=8, HAS_EXTRA=True, USE_PDL=True), {}



def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    report = {}
    for name, fn, ptrs, constexprs, launch in _cases():
        try:
            k = compile_sm90(fn, ptrs, constexprs, **launch)
            report[name] = dict(ok=True, pdl_waits=k.asm["ptx"].count("griddepcontrol.wait"),
                                shared_bytes=k.metadata.shared, local_bytes=local_bytes(k.asm["cubin"]))
        except Exception as e:  # noqa: BLE001 (one case failing must not hide the others)
            report[name] = dict(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
