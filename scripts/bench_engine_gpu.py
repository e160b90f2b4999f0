"""Engine benchmark of issue 3: decode-step time, offline throughput and a profile breakdown, each against
its floor (moelab.roofline with ceilings measured in the same run). Also checks bf16 logits of a 2-layer
full-width model against the float32 reference path.

    PYTHONPATH=. python scripts/bench_engine_gpu.py --out $OUT                  # the H100 run
    PYTHONPATH=. python scripts/bench_engine_gpu.py --tiny --models olmoe-1b-7b  # a CPU smoke run

Prints a table last and writes every row as JSON to OUT/engine.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from importlib import import_module
from pathlib import Path

import torch

from moelab.context import ForwardContext, forward_context
from moelab.engine.sampling_params import SamplingParams
from moelab.lab.profile import exposed_times
from moelab.llm import LLM
from moelab.roofline import Ceilings, offline_run_floor, step_floor

TINY = dict(layers=2, hidden_size=128, heads=4, kv_heads=4, experts=8, top_k=2, moe_intermediate_size=64,
            vocab_size=512)


def measure_ceilings(device: str) -> Ceilings:
    """Copy bandwidth and bf16 matmul rate, measured now by the lab's calibration (nominal on the CPU)."""
    if device != "cuda":
        return Ceilings(50e9, 1e12, "cpu (nominal)")
    from moelab.lab.calibrate import measure

    v = measure("cuda")["values"]
    return Ceilings(v["copy_bandwidth"], v["matmul_bf16"], torch.cuda.get_device_name())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def count_touched(llm: LLM, fn) -> list[float]:
    """Run fn() eagerly with every MoE layer's backend wrapped to count distinct experts per call."""
    from moelab.layers.moe.layer import SparseMoE

    runner = llm.engine.runner
    graphs, runner.graphs = runner.graphs, None
    counts: list[int] = []
    mods = [m for m in llm.engine.model.modules() if isinstance(m, SparseMoE)]
    originals = [m.backend for m in mods]
    for m, orig in zip(mods, originals):
        def wrapped(x, ids, *a, _orig=orig):
            counts.append(int(ids.unique().numel()))
            return _orig(x, ids, *a)
        m.backend = wrapped
    try:
        fn()
    finally:
        for m, orig in zip(mods, originals):
            m.backend = orig
        runner.graphs = graphs
    return [float(c) for c in counts[-len(mods):]]


def check_bf16(model_name: str, device: str, overrides: dict) -> dict:
    """Logits of a 2-layer full-width model, engine path (bf16, fast kernels, paged cache) vs the float32 reference
    path (sdpa attention, naive MoE, no cache): a 256-token prefill, then one decode token over the cache (a
    one-row step: every dense projection on the GEMV)."""
    ov = {**overrides, "layers": 2}
    ref = LLM(model_name, dtype="float32", attention="sdpa", moe_backend="naive", enforce_eager=True,
              overrides=ov, max_model_len=512, num_kv_blocks=64, device=device)
    ids = torch.randint(3, 500, (257,), device=device)
    pos = torch.arange(257, device=device)
    with torch.inference_mode(), forward_context(ForwardContext.for_prompts([257], device)):
        want_all = ref.engine.model.compute_logits(ref.engine.model(ids, pos)).float()
    want, want_next = want_all[:256], want_all[256:]
    del ref
    gc.collect()
    fast = LLM(model_name, overrides=ov, max_model_len=512, enforce_eager=True, device=device,
               num_kv_blocks=64)
    bs = fast.config.block_size
    n_blocks = 512 // bs
    table = torch.arange(1, n_blocks + 1, dtype=torch.int32, device=device)[None]
    ctx = ForwardContext(cu_seqlens_q=torch.tensor([0, 256], dtype=torch.int32, device=device), query_lens=[256],
                         seq_lens=[256], slot_mapping=(pos[:256] + bs), block_tables=table, block_size=bs,
                         seq_lens_t=torch.tensor([256], dtype=torch.int32, device=device), max_query_len=256,
                         max_seq_len=512)
    with torch.inference_mode(), forward_context(ctx):
        got = fast.engine.model.compute_logits(fast.engine.model(ids[:256], pos[:256])).float()
    ctx1 = ForwardContext(cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device=device), query_lens=[1],
                          seq_lens=[257], slot_mapping=(pos[256:] + bs), block_tables=table, block_size=bs,
                          seq_lens_t=torch.tensor([257], dtype=torch.int32, device=device), max_query_len=1,
                          max_seq_len=512)
    with torch.inference_mode(), forward_context(ctx1):
        got_next = fast.engine.model.compute_logits(fast.engine.model(ids[256:], pos[256:])).float()
    r = fast.engine.resolved
    err = ((got - want).norm() / want.norm()).item()
    err_next = ((got_next - want_next).norm() / want_next.norm()).item()
    del fast
    gc.collect()
    return {"kind": "bf16_check", "model": model_name, "dtype": r.dtype, "moe_backend": r.moe_backend,
            "attention": r.attention, "rel_err": err, "decode_rel_err": err_next,
            "finite": bool(torch.isfinite(got).all() and torch.isfinite(got_next).all())}


def bench_decode(llm: LLM, B: int, ctx: int, steps: int, c: Ceilings, device: str) -> dict:
    eng = llm.engine
    g = torch.Generator().manual_seed(B)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    for i in range(B):
        eng.add_request(torch.randint(3, 500, (ctx,), generator=g).tolist(), params, request_id=f"d{B}-{i}")
    while any(s.num_output_tokens == 0 for s in eng.requests.values()):
        eng.step()
    for _ in range(3):
        eng.step()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()  # ends with the sampled ids on the host: a full step
        times.append(time.perf_counter() - t)
    seqs = list(eng.requests.values())
    ctxs = [s.num_tokens for s in seqs]
    touched = count_touched(llm, eng.step)
    floor = step_floor(eng.spec, [1] * B, ctxs, c, touched=touched)
    gpu_ms = None
    if eng.runner.graphs is not None:
        graphs = eng.runner.graphs
        bucket = graphs.bucket(B)
        if bucket is not None:
            ev = []
            for _ in range(20):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                graphs.graphs[bucket].replay()
                e.record()
                e.synchronize()
                ev.append(s.elapsed_time(e))
            gpu_ms = statistics.median(ev)
    for rid in list(eng.requests):
        eng.abort_request(rid)
    med = statistics.median(times)
    return {"kind": "decode_step", "batch": B, "context": statistics.fmean(ctxs), "step_ms": med * 1e3,
            "step_ms_p10": sorted(times)[len(times) // 10] * 1e3, "graph_replay_ms": gpu_ms,
            "floor_ms": floor.seconds * 1e3, "floor_bytes": floor.bytes, "touched_mean": statistics.fmean(touched),
            "pct_of_floor": floor.pct_of(med), "x_floor": med / floor.seconds}


def bench_offline(llm: LLM, B: int, n_in: int, n_out: int, c: Ceilings, device: str) -> dict:
    g = torch.Generator().manual_seed(1000 + B)
    prompts = [torch.randint(3, 500, (n_in,), generator=g).tolist() for _ in range(B)]
    params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
    # warm-up with the same prefill and decode shapes: Triton compiles a kernel per tile config, and the tuned
    # MoE configs change with the number of tokens, so a first prefill of a new size would time the compiler
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    sync(device)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(device)
    wall = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == n_out for o in outs)
    floor = offline_run_floor(llm.engine.spec, B, n_in, n_out, c, max_batched_tokens=llm.config.max_num_batched_tokens)
    ttft = statistics.median(o.metrics.ttft for o in outs)
    itl = statistics.fmean(x for o in outs for x in o.metrics.itl)
    return {"kind": "offline", "batch": B, "input_len": n_in, "output_len": n_out, "seconds": wall,
            "throughput_tok_s": B * (n_in + n_out) / wall, "output_tok_s": B * n_out / wall,
            "floor_seconds": floor.seconds, "roofline_output_tok_s": B * n_out / floor.seconds,
            "pct_of_roofline": floor.pct_of(wall), "ttft_median_ms": ttft * 1e3, "itl_mean_ms": itl * 1e3,
            "preemptions": llm.engine.scheduler.num_preemptions}


# kernel name fragments per category, checked in this order; the rest is "other"
CATEGORIES = [("attention", ("paged_attention", "split_reduce", "store_kv", "index_put")),
              ("moe", ("gate_up", "_down_kernel", "_place", "align", "moe")),
              ("dense_gemv", ("_gemv_kernel", "_mla_uv")),  # moelab's one-row projections (gemv, mla_decode)
              ("routing", ("topk", "sort", "softmax", "sigmoid", "router", "dot_kernel", "gemv")),
              ("norm/rope", ("rms_norm", "rotary", "qk_rope_store", "_mla_prep")),
              ("sampling", ("argmax", "exponential")),  # torch's reduce and moelab's _argmax_kernel
              ("gemm", ("gemm", "nvjet", "cutlass", "sm90", "xmma", "cublas")),
              ("other", ("",))]


def profile_decode(llm: LLM, B: int, ctx: int, steps: int, device: str) -> dict:
    if device != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    for i in range(B):
        eng.add_request([5 + (i + j) % 400 for j in range(ctx)], params, request_id=f"p{i}")
    while any(s.num_output_tokens == 0 for s in eng.requests.values()):
        eng.step()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        wall = time.perf_counter() - t
    for rid in list(eng.requests):
        eng.abort_request(rid)
    return {"kind": "profile", "batch": B, **_categorize(prof, steps, wall)}


def _category(name: str) -> str:
    name = name.lower()
    return next(cat for cat, keys in CATEGORIES if any(k in name for k in keys))


def _categorize(prof, steps: int, wall: float) -> dict:
    """Kernel time per step by CATEGORIES, GPU busy, wall and the top kernels of a torch profile; and the same
    as exposed time: with PDL a kernel starts while the one before it runs, so its duration overstates what it
    adds to the step. Exposed = how far a kernel's end moves the latest end seen so far (kernels in start order);
    exposed times add up to the busy span, and "idle" is the rest of the wall time."""
    out = {c: 0.0 for c, _ in CATEGORIES}
    exposed = {c: 0.0 for c, _ in CATEGORIES}
    kernels, kernels_exposed, spans = {}, {}, []
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        dur = ev.device_time / 1e3 if hasattr(ev, "device_time") else ev.cuda_time / 1e3  # ms
        kernels[ev.name] = kernels.get(ev.name, 0.0) + dur
        out[_category(ev.name)] += dur
        spans.append((ev.time_range.start, ev.time_range.end, ev.name))  # us
    for (_, _, name), add in zip(spans, exposed_times([(s, e) for s, e, _ in spans])):
        exposed[_category(name)] += add / 1e3  # ms
        kernels_exposed[name] = kernels_exposed.get(name, 0.0) + add / 1e3
    per_step = {k: v / steps for k, v in out.items()}
    gpu = sum(per_step.values())
    per_step["gpu_busy"] = gpu
    per_step["wall"] = wall / steps * 1e3
    per_step["host_overhead_and_idle"] = per_step["wall"] - gpu
    exp_step = {k: v / steps for k, v in exposed.items()}
    exp_step["gpu_span"] = sum(exp_step.values())
    exp_step["idle"] = per_step["wall"] - exp_step["gpu_span"]
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    top_exp = sorted(kernels_exposed.items(), key=lambda kv: -kv[1])[:15]
    return {"ms_per_step": per_step, "top_kernels_ms_per_step": {k: v / steps for k, v in top},
            "exposed_ms_per_step": exp_step, "top_kernels_exposed_ms_per_step": {k: v / steps for k, v in top_exp}}


def profile_prefill(llm: LLM, B: int, n_in: int, device: str) -> dict:
    """The prefill of an offline run alone (B prompts of n_in tokens, one output token each), profiled: kernel
    time per category over the whole prefill ("per step" = the whole run here)."""
    if device != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(2000 + B)
    prompts = [torch.randint(3, 500, (n_in,), generator=g).tolist() for _ in range(B)]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    return {"kind": "profile_prefill", "batch": B, "input_len": n_in, **_categorize(prof, 1, wall)}


# A/B switches, applied in this order: flag, help, what switches the fast path off, key of the ceilings row
SWITCHES = [
    ("no-pdl", "launch without programmatic dependent launch",
     lambda: import_module("moelab.kernels.pdl").set_enabled(False), None),
    ("no-gemv", "one-row projections on cuBLAS, not moelab's GEMV",
     lambda: import_module("moelab.kernels.gemv").set_enabled(False), "gemv"),
    ("no-fused-reduce", "decode attention's key splits reduced in their own kernel, not in the attention",
     lambda: import_module("moelab.kernels.paged_attention").set_fused_reduce(False), "fused_reduce"),
    ("no-moe-gemv", "one-token MoE layers on fused_moe's tensor-core GEMMs, not moe_gemv's GEMVs",
     lambda: import_module("moelab.kernels.moe_gemv").set_enabled(False), "moe_gemv"),
    ("no-mla-prep", "one-token MLA as bmm, cat, rms_norm, rotary and store_kv, not mla_prep's one kernel",
     lambda: import_module("moelab.kernels.mla_decode").set_enabled(False), "mla_prep"),
    ("no-mla-uv", "one-token MLA's value half on a cuBLAS bmm, not mla_uv's GEMV",
     lambda: (m := import_module("moelab.kernels.mla_decode")).set_enabled(m.enabled("prep"), uv=False), "mla_uv"),
    ("no-qwen-mix-fold", "Qwen2-MoE blocks sum and mix their output themselves, not in the next norm's kernel",
     lambda: import_module("moelab.models.qwen2_moe").set_fold(False), "qwen_mix_fold"),
    ("no-mlp-gemv", "one-row dense gated MLPs (shared experts) as a GEMV and silu_mul, not gate_up_gemv",
     lambda: (m := import_module("moelab.kernels.moe_gemv")).set_enabled(m.enabled(), dense=False), "mlp_gemv"),
    ("no-early-residual", "norms read the residual after their PDL wait, not before",
     lambda: import_module("moelab.kernels.pdl").set_early_reads(False), "early_residual"),
    ("no-early-routing", "routed experts after a shared expert read their ids after the PDL wait, not before",
     lambda: import_module("moelab.kernels.moe_gemv").set_early_routing(False), "early_routing"),
    ("no-gate-in-router", "Qwen2-MoE's shared-expert gate as its own GEMV, not a row of the router kernel",
     lambda: import_module("moelab.models.qwen2_moe").set_gate_in_router(False), "gate_in_router"),
    ("no-norm-fold", "one-row post-attention norm and router as two kernels, not one",
     lambda: import_module("moelab.kernels.topk_router").set_norm_fold(False), "norm_fold"),
]


def main() -> None:
    from moelab.layers.moe.backends import BACKENDS

    if "triton" not in BACKENDS:  # the backend module exists before it is registered during development
        from moelab.layers.moe.backends.triton import triton_moe

        BACKENDS["triton"] = triton_moe
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite"])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--offline-batches", type=int, nargs="*", default=[16, 64, 256])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--offline-trials", type=int, default=1, help="repeat each offline run (run-to-run spread)")
    for flag, help_, _, _ in SWITCHES:
        ap.add_argument(f"--{flag}", action="store_true", help=help_ + " (A/B)")
    ap.add_argument("--norm-warps", type=int, help="warps of add_rms_norm's one-row launches (sweep)")
    ap.add_argument("--rope-warps", type=int, help="warps of qk_rope_store's programs (sweep)")
    ap.add_argument("--router-shape", help="SPLITS,WARPS of the router kernel (sweep; default 16,4)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192, help="the engine's token budget per step")
    ap.add_argument("--profile-batches", type=int, nargs="*", default=[1, 64, 256], help="decode profiles")
    ap.add_argument("--profile-prefill", type=int, nargs="*", default=[], help="profile these offline prefills")
    args = ap.parse_args()
    for flag, _, switch_off, _ in SWITCHES:
        if getattr(args, flag.replace("-", "_")):
            switch_off()
    if args.norm_warps is not None:
        from moelab.kernels.rms_norm import set_one_row_warps

        set_one_row_warps(args.norm_warps)
    if args.rope_warps is not None:
        from moelab.kernels.qk_rope_store import set_num_warps

        set_num_warps(args.rope_warps)
    if args.router_shape:
        from moelab.kernels.topk_router import set_split_shape

        set_split_shape(*(int(v) for v in args.router_shape.split(",")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    c = measure_ceilings(device)
    if device == "cuda":
        torch.cuda.empty_cache()
    from moelab.kernels.pdl import use_pdl

    rows: list[dict] = [{"kind": "ceilings", "bandwidth": c.bandwidth, "matmul": c.matmul, "device": c.name,
                         "torch": torch.__version__, "pdl": use_pdl(torch.device(device)),
                         **{key: not getattr(args, flag.replace("-", "_")) for flag, _, _, key in SWITCHES if key},
                         "norm_warps": import_module("moelab.kernels.rms_norm")._warps(2048, 1),  # one row of 2048
                         "rope_warps": import_module("moelab.kernels.qk_rope_store")._WARPS,
                         "router_shape": args.router_shape}]
    print(f"ceilings: copy {c.bandwidth / 1e12:.2f} TB/s, bf16 matmul {c.matmul / 1e12:.0f} TFLOP/s ({c.name})")
    overrides = TINY if args.tiny else {}
    for name in args.models:
        if not args.skip_check:
            r = check_bf16(name, device, overrides)
            rows.append(r)
            print(f"{name}: bf16 vs fp32 reference rel err {r['rel_err']:.2e}, one-token decode "
                  f"{r['decode_rel_err']:.2e} (finite {r['finite']})")
        t = time.perf_counter()
        llm = LLM(name, overrides=overrides, max_model_len=512, max_num_seqs=256, gpu_memory_utilization=0.85,
                  max_num_batched_tokens=args.max_num_batched_tokens)
        e = llm.engine
        rows.append({"kind": "engine", "model": name, "ready_s": time.perf_counter() - t, "load_s": e.load_seconds,
                     "graph_s": e.graph_seconds, "num_blocks": e.num_blocks, **vars(e.resolved)})
        print(f"{name}: ready in {time.perf_counter() - t:.1f} s (graphs {e.graph_seconds:.1f} s), "
              f"{e.num_blocks} KV blocks, {e.resolved}")
        llm.generate([[5, 6, 7]] * 2, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
        for B in args.decode_batches:
            r = {"model": name, **bench_decode(llm, B, 128, args.steps, c, device)}
            rows.append(r)
            print(f"  decode B={B}: {r['step_ms']:.3f} ms/step (graph {r['graph_replay_ms']}) floor "
                  f"{r['floor_ms']:.3f} ms = {r['pct_of_floor']:.0f}% ({r['x_floor']:.3f}x floor)")
        for B in args.offline_batches:
            for trial in range(args.offline_trials):
                r = {"model": name, "trial": trial, **bench_offline(llm, B, 128, 128, c, device)}
                rows.append(r)
                print(f"  offline B={B}: {r['output_tok_s']:.0f} out tok/s, {r['throughput_tok_s']:.0f} tok/s, "
                      f"{r['pct_of_roofline']:.1f}% of roofline ({r['roofline_output_tok_s']:.0f} out tok/s)")
        if device == "cuda":
            for B in args.profile_batches:
                p = {"model": name, **profile_decode(llm, B, 128, 10, device)}
                rows.append(p)
                print(f"  profile B={B}: " + ", ".join(f"{k} {v:.3f}" for k, v in p["ms_per_step"].items()))
                print(f"  exposed B={B}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                      p["exposed_ms_per_step"].items()))
                print("    top exposed (us/step): " + "; ".join(f"{k[:40]} {v * 1e3:.1f}" for k, v in
                                                             list(p["top_kernels_exposed_ms_per_step"].items())[:10]))
            for B in args.profile_prefill:
                p = {"model": name, **profile_prefill(llm, B, 128, device)}
                rows.append(p)
                print(f"  prefill profile B={B} (ms, whole prefill): " + ", ".join(
                    f"{k} {v:.2f}" for k, v in p["ms_per_step"].items()))
                print("    top: " + "; ".join(f"{k[:60]} {v:.2f}" for k, v in
                                           list(p["top_kernels_ms_per_step"].items())[:8]))
        (out / "engine.json").write_text(json.dumps(rows, indent=1))
        del llm, e
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    (out / "engine.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
