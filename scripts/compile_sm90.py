"""Compile moelab's decode-path and fused-MoE Triton kernels for an H100/H200 (sm_90) on any machine, GPU or not:
Triton's NVIDIA backend lowers each to PTX and its bundled ptxas to a cubin; nothing is launched. Prints one JSON
object: per kernel case, whether it compiled, the PDL waits in its PTX, its shared memory and its local (spilled)
bytes.

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


def compile_sm90(fn, ptrs: dict[str, str], constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                 div16: tuple[str, ...] = ()):
    """As a launch specializes: pointers 16-byte aligned (torch's allocations are), the integers named in div16
    multiples of 16; an integer the launch passes as 1 (a unit stride) belongs in constexprs. Without these Triton
    cannot prove a tile's rows contiguous and aligned, and compiles an unpipelined loop with synchronous loads
    (a fraction of the shared memory the GPU's kernel uses)."""
    spec = inspect.signature(fn.fn).parameters
    params = list(spec)
    # constexprs the case leaves out take their defaults (as a launch that does not pass them)
    constexprs = {**{p: v.default for p, v in spec.items() if "constexpr" in str(v.annotation)
                     and v.default is not inspect.Parameter.empty}, "USE_PDL": True, **constexprs}
    sig, attrs = {}, {}
    for i, p in enumerate(params):
        if p in constexprs:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = ptrs.get(p, "*bf16")
            if sig[p].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p] = "fp32" if p in FLOATS else "i32"
            if p in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
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


def _moe(kernel: str, M: int, dtype: str, shape: tuple[int, int, int, int] = (64, 8, 1024, 2048)):
    """A fused-MoE GEMM (shape E, top-k, I, D; OLMoE's by default) with moelab's heuristic tiles for M tokens, as
    fused_moe launches it: TMA descriptors where the tiles ask for them (the float32 prefill tiles that ran out
    of shared memory on the H200, 262 KB, compile to that same figure here)."""
    from moelab.kernels import fused_moe as fm
    from moelab.kernels.fused_moe_config import heuristic_config, use_naive_blocks

    E, top_k, I, D = shape
    cfg = heuristic_config(M, E, top_k, I, D, dtype)
    g = cfg.gate_up if kernel == "gate_up" else cfg.down
    fp8, int8 = dtype.startswith("fp8"), dtype.startswith("int8")
    el = {"bfloat16": "*bf16", "float32": "*fp32", "int8_channel": "*bf16"}.get(dtype, "*fp8e4nv")  # activations
    wel = "*i8" if int8 else el
    out = "*fp32" if dtype == "float32" else "*bf16"
    ptrs = {"x_ptr": el, "h_ptr": el if kernel == "down" else out, "w_ptr": wel, "y_ptr": out,
            "topk_weights_ptr": "*fp32", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32",
            "topk_ids_ptr": "*i64", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32"}
    K = D if kernel == "gate_up" else I
    c = dict(BLOCK_M=cfg.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, NAIVE=use_naive_blocks(M, top_k, E),
             EVEN_K=K % g.block_k == 0, PRECISION="ieee" if dtype == "float32" else None if fp8 else "tf32",
             USE_TMA=g.tma, W_INT8=int8, A_SCALE=fp8,
             W_SCALE={"fp8_channel": 2, "fp8_block": 3, "int8_channel": 2}.get(dtype, 0),
             SWAP_AB=fp8 and fm.SWAP_AB_FP8 and cfg.block_m < 64 and g.block_n >= 64, USE_PDL=True)
    if kernel == "gate_up":
        c["MERGE_GU"] = fm.merge_gate_up(c["W_SCALE"], g.tma, c["SWAP_AB"])
    if g.tma:  # descriptors over w [E * rows, K] (and, for down, h [P, K]) with the kernel's boxes
        ptrs["w_ptr"] = f"tensordesc<{wel[1:]}[{g.block_n}, {g.block_k}]>"
        if kernel == "down":
            ptrs["h_ptr"] = f"tensordesc<{el[1:]}[{cfg.block_m}, {g.block_k}]>"
    # contiguous tensors: unit last strides (a launch passes them as the constant 1), the rest multiples of 16 at
    # these shapes, as are N and K; the scales' last stride is 1 only with block scales (a [E, rows, K/128] tensor)
    c.update(stride_wk=1, **({"stride_sk": 1} if c["W_SCALE"] == 3 else {"stride_sn": 1} if c["W_SCALE"] == 2 else {}))
    div16 = ("N", "K", "stride_xt", "stride_we", "stride_wn", "stride_hr", "stride_ys")
    fn = fm._gate_up_kernel if kernel == "gate_up" else fm._down_kernel
    return fn, ptrs, c, dict(num_warps=g.num_warps, num_stages=g.num_stages, div16=div16)


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
    yield "router-topk-add-norm", topk_router._router_gemm_topk_kernel, {
        "part_ptr": "*fp32", "count_ptr": "*i32", "w_ptr": "*fp32", "ids_ptr": "*i64"}, dict(
        K=8, KP=8, BLOCK_T=16, BLOCK_E=64, BLOCK_D=128, SIGMOID=False, RENORM=False, PRECISION="tf32", SPLIT=True,
        MAX_SPLITS=16, ADD_NORM=True, D_PAD=2048, EARLY_R=True, USE_PDL=True), dict(num_stages=3)
    yield "router-topk-add-norm-extra-row", topk_router._router_gemm_topk_kernel, {  # Qwen1.5: 60 experts + gate
        "part_ptr": "*fp32", "count_ptr": "*i32", "w_ptr": "*fp32", "ids_ptr": "*i64", "xo_ptr": "*bf16"}, dict(
        K=4, KP=4, BLOCK_T=16, BLOCK_E=64, BLOCK_D=128, SIGMOID=False, RENORM=False, PRECISION="tf32", SPLIT=True,
        MAX_SPLITS=16, ADD_NORM=True, D_PAD=2048, EARLY_R=True, EXTRA=True, USE_PDL=True), dict(num_stages=3)
    yield "argmax", argmax._argmax_kernel, {"out_ptr": "*i64", "part_v_ptr": "*fp32", "part_i_ptr": "*i32",
                                            "part_n_ptr": "*i32", "count_ptr": "*i32"}, dict(
        BLOCK=2048, SPLITS_PAD=32, USE_PDL=True), {}
    yield "gemv", gemv._gemv_kernel, {}, dict(HAS_BIAS=True, BLOCK_N=8, BLOCK_K=1024, USE_PDL=True), {}
    yield "qk-rope-store", qk_rope_store._qk_rope_store_kernel, {
        "pos_ptr": "*i64", "slot_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}, dict(
        H=16, KV=16, HP=16, KVP=16, HALF=64, NORM=1, INTERLEAVED=False, USE_PDL=True), {}
    from moelab.kernels import activation, moe_align, moe_sum, per_token_quant, rotary, store_kv

    yield "rms-norm", rms_norm._rms_norm_kernel, {}, dict(BLOCK=2048), {}
    yield "rotary", rotary._rotary_kernel, {"pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}, dict(
        HALF=64, BLOCK_H=16, INTERLEAVED=False), {}
    yield "store-kv", store_kv._store_kv_kernel, {"slot_ptr": "*i64"}, dict(BLOCK=2048, BLOCK_V=2048, HAS_V=True), {}
    yield "topk-router", topk_router._topk_router_kernel, {"logits_ptr": "*fp32", "w_ptr": "*fp32",
                                                           "ids_ptr": "*i64"}, dict(
        K=8, KP=8, BLOCK_E=64, SIGMOID=False, RENORM=False), dict(num_warps=1)
    yield "silu-mul", activation._silu_mul_kernel, {}, dict(BLOCK=activation.BLOCK), {}
    yield "add-gated", activation._add_gated_kernel, {}, dict(BLOCK=activation.BLOCK), {}
    yield "moe-sum", moe_sum._sum_kernel, {}, dict(TOP_K=8, BLOCK_T=1, BLOCK_D=1024), {}
    align_ptrs = {"ids_ptr": "*i64", "counts_ptr": "*i32", "cursor_ptr": "*i32", "sorted_ptr": "*i32",
                  "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32", "xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32"}
    for quant in (False, True):  # the fp8 activations quantized by the align launches' extra programs
        q = dict(QUANT=quant, QBLOCK=2048 if quant else 16)
        yield f"moe-align-count{'-quant' if quant else ''}", moe_align._count_kernel, align_ptrs, dict(
            E_PAD=128, CHUNK=moe_align.CHUNK_SLOTS, **q), dict(num_warps=moe_align.NUM_WARPS)
        yield f"moe-align-place{'-quant' if quant else ''}", moe_align._place_kernel, align_ptrs, dict(
            BLOCK_M=16, E_PAD=128, CHUNK=moe_align.CHUNK_SLOTS, CHUNK_ROWS=32, PAD_COLS=16, SUB=64, SINGLE=False,
            **q), dict(num_warps=moe_align.NUM_WARPS)
    yield "per-token-quant", per_token_quant._per_token_quant_kernel, {
        "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "num_rows_ptr": "*i32"}, dict(
        FP8_MAX_=per_token_quant.FP8_MAX, MIN_SCALE_=per_token_quant.MIN_SCALE, BLOCK_K=2048, HAS_NUM_ROWS=True), {}
    for kernel in ("gate_up", "down"):
        for dtype, M in (("bfloat16", 1), ("bfloat16", 64), ("bfloat16", 4096), ("float32", 4096),
                         ("fp8_channel", 1), ("fp8_block", 4096)):
            yield f"moe-{kernel}-{dtype}-M{M}", *_moe(kernel, M, dtype)
        for dtype, M in (("int8_channel", 1), ("int8_channel", 4096)):  # W8A16: int8 tiles widened in registers
            yield f"moe-{kernel}-{dtype}-M{M}", *_moe(kernel, M, dtype)
        for name, shape in (("qwen1.5", (60, 4, 1408, 2048)), ("mixtral", (8, 2, 14336, 4096))):  # no tuned file
            for dtype, M in (("bfloat16", 1), ("bfloat16", 4096), ("fp8_block", 4096)):
                yield f"moe-{kernel}-{name}-{dtype}-M{M}", *_moe(kernel, M, dtype, shape)
    yield "add-rms-norm-topk-sum", rms_norm._add_rms_norm_kernel, {}, dict(
        BLOCK=2048, TOP_K=8, HAS_EXTRA=True, EARLY_R=True, USE_PDL=True), {}
    from moelab.kernels import decode_inputs, moe_gemv

    for name, (I, D) in (("olmoe", (1024, 2048)), ("mixtral", (14336, 4096))):
        gu, dn = moe_gemv.default_configs(D, I)
        yield f"moe-gemv-gate-up-{name}", moe_gemv._moe_gate_up_gemv_kernel, {
            "x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "h_ptr": "*bf16"}, dict(
            BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, USE_PDL=True), dict(num_warps=gu.num_warps)
        yield f"moe-gemv-down-{name}", moe_gemv._moe_down_gemv_kernel, {
            "h_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "wt_ptr": "*fp32", "y_ptr": "*bf16"}, dict(
            BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, USE_PDL=True), dict(num_warps=dn.num_warps)
    gu = moe_gemv.default_configs(2048, 1408)[0]  # Qwen1.5's routed experts, ids settled (read before the wait)
    yield "moe-gemv-gate-up-early-ids", moe_gemv._moe_gate_up_gemv_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "h_ptr": "*bf16"}, dict(
        BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, EARLY_IDS=True, USE_PDL=True), dict(num_warps=gu.num_warps)
    # a shared expert's gate and up (gate_up_gemv)
    yield "gate-up-gemv-dense", moe_gemv._moe_gate_up_gemv_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*bf16", "h_ptr": "*bf16", "s_ptr": "*bf16"}, dict(
        BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, DENSE=True, USE_PDL=True), dict(num_warps=gu.num_warps)
    gu, dn = moe_gemv.default_configs(2048, 1024, weight_bytes=1)  # int8 W8A16, packed words (OLMoE)
    yield "moe-gemv-gate-up-int8-packed", moe_gemv._moe_gate_up_gemv_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*i8", "ids_ptr": "*i64", "h_ptr": "*bf16", "s_ptr": "*fp32"}, dict(
        BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, SCALED=True, PER=4, USE_PDL=True), dict(num_warps=gu.num_warps)
    yield "moe-gemv-down-int8-packed", moe_gemv._moe_down_gemv_kernel, {
        "h_ptr": "*bf16", "w_ptr": "*i8", "ids_ptr": "*i64", "wt_ptr": "*fp32", "y_ptr": "*bf16",
        "s_ptr": "*fp32"}, dict(BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, SCALED=True, PER=4, USE_PDL=True), dict(
        num_warps=dn.num_warps)

    from moelab.kernels import mla_decode

    yield "mla-uv-dsv2-lite", mla_decode._mla_uv_kernel, {"o_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16"}, \
        dict(R=512, V=128, BLOCK_V=32, USE_PDL=True), dict(num_warps=4)
    yield "mla-prep-dsv2-lite", mla_decode._mla_prep_kernel, {
        "q_ptr": "*bf16", "kv_ptr": "*bf16", "wuk_ptr": "*bf16", "nw_ptr": "*bf16", "pos_ptr": "*i64",
        "slot_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "qo_ptr": "*bf16", "cache_ptr": "*bf16"}, dict(
        H=16, NOPE=128, R=512, HALF=32, BLOCK_R=64, INTERLEAVED=True, USE_PDL=True), dict(num_warps=4)

    yield "decode-inputs", decode_inputs._feed_inputs_kernel, {
        "staging_ptr": "*i64", "tokens_ptr": "*i64", "seq_lens_ptr": "*i32"}, dict(
        BLOCK_=decode_inputs.BLOCK, USE_PDL=True), dict(num_warps=4)



def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    report = {}
    for name, fn, ptrs, constexprs, launch in _cases():
        try:
            k = compile_sm90(fn, ptrs, constexprs, **launch)
            ptx = k.asm["ptx"]
            report[name] = dict(ok=True, kernel=fn.fn.__name__, pdl_waits=ptx.count("griddepcontrol.wait"),
                                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                                async_loads=sum(ptx.count(f"cp.async.{op}") for op in ("cg.shared", "ca.shared",
                                                                                        "bulk.tensor")),
                                shared_bytes=k.metadata.shared, local_bytes=local_bytes(k.asm["cubin"]))
        except Exception as e:  # noqa: BLE001 (one case failing must not hide the others)
            report[name] = dict(ok=False, kernel=fn.fn.__name__, error=f"{type(e).__name__}: {str(e)[:2000]}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
