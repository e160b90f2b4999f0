"""Profiles: a torch profiler trace of one benchmark point (Chrome-trace JSON, opens in ui.perfetto.dev) and a
per-module time breakdown.

Categories: attention, routing, expert_gemm, communication, sampling, other (and dense_gemm, see below).
How time is attributed:

1. While profiling, forward hooks open record_function ranges: "moelab.attention" around every module whose
   class name contains "Attention" or "MLA", "moelab.moe" around each SparseMoE, "moelab.expert_gemm" around
   its expert backend call and around shared-expert MLPs, "moelab.routing" around the router logits (at one row
   on the fast path also around the post-attention norm folded into the router kernel: its time is routing there),
   "moelab.model" around the model forward and "moelab.lm_head" around compute_logits. Hooks are removed after.
2. CPU: each operator's self CPU time goes to the innermost enclosing range: attention, expert_gemm and routing
   to themselves, moe to routing (top-k, softmax, sorting inside the MoE layer but outside the experts), model
   and lm_head to other. Operators outside every range are sampling when their name is a sampling op (argmax,
   multinomial, exponential_, softmax, topk, sort, cumsum, ...), else other.
3. CUDA: each kernel goes to the category of the operator that launched it (its correlation id), as in 2.
   Kernels with no launching operator inside a range (CUDA-graph replays of decode steps) are classified by
   kernel name: moelab's kernels by their exact names (q/k norm + RoPE + KV store and the split reduce are
   attention; the fused-MoE GEMMs, top-k sum, activation quantization and the MLP activations are expert_gemm;
   moe_align's count/place are routing; the norms are other), others by name fragments; dense GEMMs and GEMVs
   found that way (attention projections, LM head, shared experts: indistinguishable by name) are "dense_gemm".
4. Communication (nccl, all_reduce, all_gather, all_to_all, reduce_scatter) is recognized by name first,
   anywhere.
5. On the engine's fast path the MoE top-k sum runs inside the next layer's norm kernel (a backend that
   defers_topk_sum), outside the expert_gemm range: it counts as other there, where it counted as expert_gemm before.

Reported per category: seconds and % of the category total; plus the profiled wall time. "cuda" is the sum of
kernel durations. On Hopper the engine launches with programmatic dependent launch: a kernel starts while the one
before it in the stream still runs (and reads its weights meanwhile), so durations overlap and add up to more than
the GPU was busy. "cuda_exposed" counts each kernel only for how far its end moves the latest end seen so far
(kernels in start order): what it adds to the critical path. Its categories add up to the busy span.
"""

from __future__ import annotations

import functools
import gzip
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

CATEGORIES = ("attention", "routing", "expert_gemm", "communication", "sampling", "dense_gemm", "other")
RANGE_CATEGORY = {"moelab.attention": "attention", "moelab.routing": "routing", "moelab.expert_gemm": "expert_gemm",
                  "moelab.moe": "routing", "moelab.model": "other", "moelab.lm_head": "other"}
_COMM = re.compile(r"nccl|all_?reduce|all_?gather|all_?to_?all|alltoall|reduce_?scatter|c10d")
_SAMPLING_OPS = re.compile(r"argmax|multinomial|exponential|softmax|topk|sort|cumsum|gumbel|sampl")
_KERNEL_RULES = [  # moelab's own kernels by exact name first (tests/test_lab_profile.py lists every one of them)
    ("attention", re.compile(r"attn|attention|flash|fmha|paged|sdpa|mla|^_split_reduce_kernel$|^_qk_rope_store_kernel$"
                             r"|^_store_kv_kernel$|^_rotary_kernel$")),
    ("expert_gemm", re.compile(r"fused_moe|moe_gemm|grouped|group_gemm|silu_and_mul|moe|^_gate_up_kernel$"
                               r"|^_down_kernel$|^_sum_kernel$|^_per_token_quant_kernel$|^_silu_mul_kernel$"
                               r"|^_add_gated_kernel$")),
    ("routing", re.compile(r"topk|top_k|align|sort|routing|router|softmax|sigmoid|histogram|bincount"
                           r"|^_count_kernel$|^_place_kernel$")),
    ("sampling", re.compile(r"argmax|multinomial|exponential|sampl|gumbel")),
    ("dense_gemm", re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|sm\d+_|matmul|ampere|hopper")),
]


def classify_kernel(name: str) -> str:
    """A CUDA kernel's category from its name alone (see the module docstring, rule 3)."""
    n = name.lower()
    if _COMM.search(n):
        return "communication"
    for cat, rx in _KERNEL_RULES:
        if rx.search(n):
            return cat
    return "other"


def classify_op(name: str, ranges: list[str]) -> str:
    """An operator's category from its name and the moelab ranges around it, innermost last (rules 2 and 4)."""
    n = name.lower()
    if _COMM.search(n):
        return "communication"
    for r in reversed(ranges):
        if r in RANGE_CATEGORY:
            return RANGE_CATEGORY[r]
    return "sampling" if _SAMPLING_OPS.search(n) else "other"


class _Ranges:
    """Forward hooks that wrap module calls in record_function ranges; remove() undoes everything."""

    def __init__(self, model: Any) -> None:
        import torch

        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str, Any]] = []
        rf = torch.profiler.record_function
        for mod in model.modules():
            cls = type(mod).__name__
            if "Attention" in cls or "MLA" in cls:
                self._hook(mod, "moelab.attention")
            elif any(c.__name__ == "SparseMoE" for c in type(mod).__mro__):  # and its subclasses (Qwen2-MoE,
                # DeepSeek), by name: the lab does not import the layers
                self._hook(mod, "moelab.moe")
                if callable(getattr(mod, "backend", None)):
                    self._wrap(mod, "backend", rf, "moelab.expert_gemm")
                for attr in ("route", "add_norm_route"):  # router GEMM and top-k (one kernel on the fast path;
                    # at one row with the post-attention norm folded in)
                    if callable(getattr(mod, attr, None)):
                        self._wrap(mod, attr, rf, "moelab.routing")
        for name, mod in model.named_modules():
            if "shared" in name.rsplit(".", 1)[-1] and "MLP" in type(mod).__name__:
                self._hook(mod, "moelab.expert_gemm")
        self._hook(model, "moelab.model")
        if callable(getattr(model, "compute_logits", None)):
            self._wrap(model, "compute_logits", rf, "moelab.lm_head")

    def _hook(self, mod: Any, label: str) -> None:
        import torch

        stack: list[Any] = []

        def pre(_m: Any, _a: Any) -> None:
            ctx = torch.profiler.record_function(label)
            ctx.__enter__()
            stack.append(ctx)

        def post(_m: Any, _a: Any, _o: Any) -> None:
            if stack:
                stack.pop().__exit__(None, None, None)

        self._handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def _wrap(self, obj: Any, attr: str, rf: Any, label: str) -> None:
        orig = getattr(obj, attr)
        had_own = attr in vars(obj)

        @functools.wraps(orig)  # keeps the function's attributes (e.g. a backend's defers_topk_sum)
        def wrapped(*a: Any, **k: Any) -> Any:
            with rf(label):
                return orig(*a, **k)

        setattr(obj, attr, wrapped)
        self._patched.append((obj, attr, orig if had_own else None))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for obj, attr, orig in self._patched:
            if orig is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, orig)


def _ranges_of(ev: Any) -> list[str]:
    chain = []
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith("moelab."):
            chain.append(p.name)
        p = p.cpu_parent
    return chain[::-1]  # outermost first


def exposed_times(spans: list[tuple[float, float]]) -> list[float]:
    """For kernel spans (start, end) in any order: each one's exposed time, max(0, end - max(start, latest end of
    the kernels that started before it)), in the order given. They add up to the union of the spans."""
    out = [0.0] * len(spans)
    last = float("-inf")
    for i in sorted(range(len(spans)), key=lambda i: spans[i]):
        start, end = spans[i]
        out[i] = max(0.0, end - max(start, last))
        last = max(last, end)
    return out


def idle_before(spans: list[tuple[float, float]]) -> list[float]:
    """For kernel spans (start, end) in any order: how long the device sat with no kernel before each one started,
    max(0, start - latest end of the kernels that started before it), in the order given (0 for the first). With
    exposed_times they add up to the whole span from the first start to the last end."""
    out = [0.0] * len(spans)
    last = None
    for i in sorted(range(len(spans)), key=lambda i: spans[i]):
        start, end = spans[i]
        out[i] = 0.0 if last is None else max(0.0, start - last)
        last = end if last is None else max(last, end)
    return out


def breakdown(events: Any) -> dict[str, dict[str, float]]:
    """{"cpu": {category: seconds}, "cuda": {category: seconds}, "cuda_exposed": {category: seconds}} from
    profiler events (prof.events()); see the module docstring."""
    cpu: dict[str, float] = defaultdict(float)
    cuda: dict[str, float] = defaultdict(float)
    kernels: list[tuple[float, float, str]] = []
    by_id: dict[int, Any] = {}
    for ev in events:
        dev = getattr(ev.device_type, "name", str(ev.device_type))
        if dev == "CPU":
            by_id[ev.id] = ev
    for ev in events:
        dev = getattr(ev.device_type, "name", str(ev.device_type))
        if dev == "CPU":  # a range's own self time is the Python time of that module: its category too
            own = [ev.name] if ev.name in RANGE_CATEGORY else []
            cpu[classify_op(ev.name, _ranges_of(ev) + own)] += ev.self_cpu_time_total / 1e6
        elif dev == "CUDA":
            dur = (ev.time_range.end - ev.time_range.start) / 1e6
            parent = by_id.get(getattr(ev, "linked_correlation_id", 0) or -1)
            # a Triton launch has no operator around it: its launching event can be the moelab range itself
            ranges = (_ranges_of(parent) + ([parent.name] if parent.name in RANGE_CATEGORY else [])
                      if parent is not None else [])
            if any(r in RANGE_CATEGORY for r in ranges) and not _COMM.search(ev.name.lower()):
                cat = classify_op(parent.name, ranges)
            else:
                cat = classify_kernel(ev.name)
            cuda[cat] += dur
            kernels.append((ev.time_range.start, ev.time_range.end, cat))
    exposed: dict[str, float] = defaultdict(float)
    for (_, _, cat), t in zip(kernels, exposed_times([(s, e) for s, e, _ in kernels])):
        exposed[cat] += t / 1e6
    out = {"cpu": cpu, "cuda": cuda, "cuda_exposed": exposed}
    return {dev: {c: cats.get(c, 0.0) for c in CATEGORIES} for dev, cats in out.items()}


def top_ops(events: Any, n: int = 20) -> list[dict[str, Any]]:
    """The n operators / kernels with the most self time: name, device, seconds, calls."""
    agg: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in events:
        dev = getattr(ev.device_type, "name", str(ev.device_type))
        if ev.name.startswith("moelab."):
            continue
        t = ev.self_cpu_time_total if dev == "CPU" else ev.time_range.end - ev.time_range.start
        a = agg[(ev.name, dev)]
        a[0] += t / 1e6
        a[1] += 1
    items = sorted(agg.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"name": k[0][:120], "device": k[1], "seconds": v[0], "calls": int(v[1])} for k, v in items]


def profile_generate(llm: Any, prompts: list[list[int]], params: list[Any], trace_dir: Path | None = None
                     ) -> dict[str, Any]:
    """Profile one llm.generate(prompts, params) call (after the caller's warm-up). Returns {"wall", "breakdown",
    "top", "trace_path"}; the trace is written gzipped into trace_dir (a temporary directory by default)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = llm.engine.resolved.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ranges = _Ranges(llm.engine.model)
    try:
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            llm.generate(prompts, params)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
    finally:
        ranges.remove()
    events = prof.events()
    out_dir = Path(trace_dir) if trace_dir else Path(tempfile.mkdtemp(prefix="moelab-profile-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "trace.json"
    prof.export_chrome_trace(str(raw))
    gz = out_dir / "trace.json.gz"
    with open(raw, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    raw.unlink()
    return {"wall": wall, "breakdown": breakdown(events), "top": top_ops(events), "trace_path": str(gz)}


def breakdown_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Store rows: module_time (s) per category and device, module_share (% of that device's total), wall."""
    rows: list[dict[str, Any]] = [{"metric": "profiled_wall", "value": result["wall"], "unit": "s"}]
    for dev, cats in result["breakdown"].items():
        total = sum(cats.values())
        if total <= 0:
            continue
        for cat, sec in cats.items():
            rows.append({"metric": "module_time", "value": sec, "unit": "s", "category": cat, "device": dev})
            rows.append({"metric": "module_share", "value": 100 * sec / total, "unit": "%", "category": cat,
                         "device": dev})
    return rows
