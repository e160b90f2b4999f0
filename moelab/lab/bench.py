"""Offline throughput and latency benchmarks of one point (an engine configuration x a workload).

A point is measured as: build the engine (or reuse one), one warm-up generate of the same prompts with at most
4 output tokens (not timed, not stored), then `trials` timed trials. A trial is one `LLM.generate` of the whole
batch, greedy, EOS ignored, timed with perf_counter around the call (the call returns when the last token is on
the host, so no extra device sync is needed). Latency mode adds, per trial, the one-token run of
MoE-Inference-Bench (the same batch with max_tokens=1) for TTFT. Every trial reuses the same prompts (a fixed
seed), so trials are repeats of one measurement and their spread is the run-to-run noise.

Rows (moelab.lab.metrics has the formulas): throughput, output_throughput, request_throughput (tok/s, req/s)
and elapsed (s) per trial; ttft_oneshot (s) per trial; ttft, tpot, itl, e2e (s) with stat = mean | median | p90
| p99 | std | min | max per trial; num_preemptions once. Each time row carries its floor (s) and each rate
row its roofline rate, with pct_of_floor = 100 x floor time / measured time (moelab.lab.floors).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from moelab.lab.calibrate import ceilings
from moelab.lab.floors import RunFloors, run_floors
from moelab.lab.metrics import RequestTimes, latency_stats, summarize, throughput
from moelab.lab.workload import Workload, make_requests

MODES = ("throughput", "latency")


@dataclass(frozen=True)
class BenchConfig:
    """The engine side of a point. top_k: experts per token (a shape override for a preset, so the model's
    spec and floor follow; the engine's top_k override for a checkpoint directory). overrides: shape overrides
    of a preset (layers, experts, moe_intermediate_size, ... as `moelab inspect`). max_model_len None: the
    workload's longest request rounded up to 16 tokens; max_num_seqs None: max(256, batch)."""

    model: str = "olmoe-1b-7b"
    dtype: str = "auto"
    device: str = "auto"
    moe_backend: str = "auto"
    attention: str = "auto"
    top_k: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int = 8192
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.90
    seed: int = 0
    record_routing: bool = False  # floors from the observed routing instead of the uniform expectation

    def __post_init__(self) -> None:
        """The engine's own checks, before any point runs (a bad flag is an error, not a failed point)."""
        from pathlib import Path

        from moelab.engine.config import EngineConfig

        EngineConfig(model=self.model, dtype=self.dtype, device=self.device, moe_backend=self.moe_backend,
                     attention=self.attention, top_k=self.top_k, max_num_batched_tokens=self.max_num_batched_tokens,
                     gpu_memory_utilization=self.gpu_memory_utilization, max_num_seqs=self.max_num_seqs or 1,
                     max_model_len=self.max_model_len)
        if not (is_preset(self.model) or Path(self.model).is_dir()):
            from moelab.presets import PRESETS

            raise ValueError(f"model {self.model!r} is neither a checkpoint directory nor a preset; presets: "
                             f"{', '.join(PRESETS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = dict(sorted(self.overrides.items()))
        if not self.record_routing:  # keeps the point keys of runs made before the option existed
            d.pop("record_routing")
        return d

    def engine_key(self) -> tuple:
        """Points with equal keys can share one engine (everything but the length limits)."""
        d = self.to_dict()
        d.pop("max_model_len")
        d.pop("max_num_seqs")
        return tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in d.items())


@dataclass(frozen=True)
class BenchOptions:
    trials: int = 3
    warmup: int = 1
    modes: tuple[str, ...] = MODES
    telemetry: bool = True
    telemetry_interval: float = 0.1

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"bench modes {list(self.modes)}; allowed: {', '.join(MODES)}")


def is_preset(model: str) -> bool:
    from moelab.presets import PRESETS

    return model in PRESETS


def build_llm(cfg: BenchConfig, max_model_len: int, max_batch: int):
    """An LLM for cfg, sized for requests up to max_model_len tokens and max_batch at once."""
    from moelab.llm import LLM

    overrides = dict(cfg.overrides)
    top_k = None
    if cfg.top_k is not None:
        if is_preset(cfg.model):
            overrides["top_k"] = cfg.top_k
        else:
            top_k = cfg.top_k
    length = cfg.max_model_len or max_model_len
    seqs = cfg.max_num_seqs or max(256, max_batch)
    return LLM(cfg.model, dtype=cfg.dtype, device=cfg.device, moe_backend=cfg.moe_backend, attention=cfg.attention,
               top_k=top_k, overrides=overrides, max_model_len=length, max_num_seqs=seqs,
               max_num_batched_tokens=cfg.max_num_batched_tokens, enforce_eager=cfg.enforce_eager,
               gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed,
               **({"record_routing": True} if cfg.record_routing else {}))


def needed_len(wl: Workload) -> int:
    """max_model_len for a workload: its longest request + 1, rounded up to 16 (file prompts: 2048 + output)."""
    n = wl.max_total_len if wl.kind != "file" else 2048 + wl.max_total_len - wl.input_len
    return -(-(n + 1) // 16) * 16


def engine_facts(llm) -> dict[str, Any]:
    """What the engine resolved and the model's shape, flattened into the run's config."""
    spec = effective_spec(llm)
    r = llm.engine.resolved
    pc = spec.param_counts()
    return {"resolved": {"device": r.device, "dtype": r.dtype, "moe_backend": r.moe_backend,
                         "attention": r.attention, "cuda_graphs": r.cuda_graphs},
            "spec": {"family": spec.family, "layers": spec.num_layers, "hidden_size": spec.hidden_size,
                     "experts": spec.num_experts, "top_k": spec.top_k, "moe_intermediate_size":
                     spec.moe_intermediate_size, "params_total": pc.total, "params_active": pc.active},
            "max_model_len": llm.engine.max_model_len, "max_num_seqs": llm.config.max_num_seqs}


def effective_spec(llm):
    spec = llm.engine.spec
    if llm.config.top_k is not None and llm.config.top_k != spec.top_k:
        spec = replace(spec, top_k=llm.config.top_k)
    return spec


def _times(outs, prompts) -> list[RequestTimes]:
    reqs = []
    for o, p in zip(outs, prompts):
        m = o.metrics
        reqs.append(RequestTimes(m.arrival_time, m.first_token_time, m.token_times, m.finished_time, len(p),
                                 len(o.outputs[0].token_ids)))
    return reqs


def _recorder(llm):
    """The engine's routing recorder when the engine was built with record_routing, else None."""
    return llm.engine.routing_recorder


def observed_touched(recorder) -> dict[int, list[float]]:
    """{tokens in a step: mean distinct experts hit per MoE layer} over the recorded steps."""
    counts = recorder.as_array()  # [steps, moe layers, E]
    out: dict[int, list] = {}
    for T, c in zip(recorder.tokens, counts):
        out.setdefault(int(T), []).append((c > 0).sum(axis=1))
    return {T: [float(x) for x in sum(v) / len(v)] for T, v in out.items()}


def _pct(floor_s: float, measured_s: float) -> float | None:
    return 100.0 * floor_s / measured_s if measured_s > 0 else None


def throughput_rows(trial: int, in_lens: list[int], out_lens: list[int], wall: float, f: RunFloors) -> list[dict]:
    fl = f.total.seconds
    pct = _pct(fl, wall)
    rates = throughput(in_lens, out_lens, wall)
    best = throughput(in_lens, out_lens, fl) if fl > 0 else {k: None for k in rates}
    units = {"throughput": "tok/s", "output_throughput": "tok/s", "request_throughput": "req/s"}
    rows = [{"metric": k, "value": v, "unit": units[k], "floor": best[k], "pct_of_floor": pct, "trial": trial}
            for k, v in rates.items()]
    rows.append({"metric": "elapsed", "value": wall, "unit": "s", "floor": fl, "pct_of_floor": pct, "trial": trial,
                 "bound": f.total.bound})
    return rows


def latency_floors(f: RunFloors) -> dict[str, dict[str, float]]:
    """{metric: {stat: floor s}} for the statistics each floor bounds (moelab.lab.floors' docstring); a stat
    without an entry has no floor."""
    out: dict[str, dict[str, float]] = {"ttft": {}, "tpot": {}, "itl": {}, "e2e": {}}
    if f.ttft:
        out["ttft"] = {k: v for k, v in summarize(f.ttft).items() if k != "std"}
    if f.decode_step_seconds > 0:
        out["tpot"]["mean"] = out["itl"]["mean"] = f.decode_step_seconds
    out["e2e"]["max"] = f.total.seconds
    return out


def latency_rows(trial: int, reqs: list[RequestTimes], f: RunFloors) -> list[dict]:
    floors = latency_floors(f)
    rows = []
    for metric, stats in latency_stats(reqs).items():
        for stat, v in stats.items():
            fl = floors[metric].get(stat)
            timed = fl is not None and fl > 0
            rows.append({"metric": metric, "value": v, "unit": "s", "stat": stat, "trial": trial,
                         "floor": fl if timed else None,
                         "pct_of_floor": _pct(fl, v) if timed and v == v else None})
    return rows


def measure_point(llm, wl: Workload, cal: dict[str, Any], opts: BenchOptions,
                  log: Callable[[str], None] = lambda s: None) -> tuple[list[dict], dict[str, Any]]:
    """Warm up and run the trials of one workload on a built engine; returns (rows, extra)."""
    from moelab.engine.sampling_params import SamplingParams
    from moelab.lab.telemetry import TelemetrySampler

    eng = llm.engine
    spec = effective_spec(llm)
    prompts, out_lens = make_requests(wl, spec.vocab_size, spec.eos_token_id, llm.tokenizer, eng.max_model_len)
    in_lens = [len(p) for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, seed=wl.seed) for n in out_lens]
    dtype = eng.resolved.dtype
    c = ceilings(cal, dtype)
    f = run_floors(spec, in_lens, out_lens, c, llm.config.max_num_batched_tokens, dtype)
    routing = "uniform"
    one = [SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, seed=wl.seed)] * len(prompts)
    for _ in range(opts.warmup):
        llm.generate(prompts, [replace(p, max_tokens=min(p.max_tokens, 4)) for p in params])
    pre0 = eng.stats()["num_preemptions"]
    rows: list[dict] = []
    on_gpu = eng.resolved.device.startswith("cuda")
    tel = TelemetrySampler(opts.telemetry_interval, enabled=opts.telemetry and on_gpu)
    if not (opts.telemetry and on_gpu):
        tel.reason = "CPU run: no GPU to sample" if not on_gpu else "turned off (--no-telemetry)"
    with tel:
        for trial in range(opts.trials):
            if "latency" in opts.modes:
                t = time.perf_counter()
                llm.generate(prompts, one)
                wall1 = time.perf_counter() - t
                rows.append({"metric": "ttft_oneshot", "value": wall1, "unit": "s", "trial": trial,
                             "floor": f.prefill.seconds, "pct_of_floor": _pct(f.prefill.seconds, wall1)})
            rec = _recorder(llm) if trial == 0 else None
            if rec is not None:
                rec.reset()
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            wall = time.perf_counter() - t
            if rec is not None and rec.tokens:
                seen = observed_touched(rec)
                f = run_floors(spec, in_lens, out_lens, c, llm.config.max_num_batched_tokens, dtype, seen.get)
                routing = "observed"
                rows.append({"metric": "touched_experts", "value": float(np.mean([np.mean(v) for v in
                             seen.values()])), "unit": "experts", "stat": "mean"})
            got = [len(o.outputs[0].token_ids) for o in outs]
            if got != out_lens:
                raise RuntimeError(f"asked for {out_lens[:4]}... output tokens, got {got[:4]}...")
            if "throughput" in opts.modes:
                rows += throughput_rows(trial, in_lens, out_lens, wall, f)
            if "latency" in opts.modes:
                rows += latency_rows(trial, _times(outs, prompts), f)
            log(f"trial {trial}: {wall:.3f} s, {sum(in_lens) + sum(out_lens)} tokens")
    rows.append({"metric": "num_preemptions", "value": eng.stats()["num_preemptions"] - pre0, "unit": "count"})
    extra = {"calibration_run": cal.get("run_id"), "ceilings": {"bandwidth": c.bandwidth, "matmul": c.matmul,
                                                                "device": c.name},
             "floor": {"prefill_s": f.prefill.seconds, "decode_s": f.decode.seconds, "total_s": f.total.seconds,
                       "bound": f.total.bound, "bytes": f.total.bytes, "flops": f.total.flops,
                       "routing": routing},
             "tokens": {"input": sum(in_lens), "output": sum(out_lens)}, "telemetry": tel.summary(),
             "_telemetry_samples": tel.samples}
    return rows, extra


def is_oom(err: BaseException) -> bool:
    """CUDA (or host) out of memory, whatever wrapper raised it."""
    if isinstance(err, MemoryError):
        return True
    try:
        import torch

        if isinstance(err, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    msg = str(err).lower()
    # the engine's own words when the weights leave no room for the KV cache, or the pool runs dry
    return "out of memory" in msg or "the kv cache holds" in msg or ("kv cache:" in msg and "blocks needed" in msg)


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def workload_dict(wl: Workload, study: str | None = None) -> dict[str, Any]:
    """The stored workload of a point: the workload's fields, plus the study it belongs to (part of its key)."""
    return {**wl.to_dict(), **({"study": study} if study else {})}


def record_point(store, kind: str, cfg: BenchConfig, wl: Workload, fn: Callable[[], tuple[list[dict], dict, dict]],
                 point: str, extra: dict[str, Any] | None = None, study: str | None = None) -> tuple[str, str]:
    """Run fn() -> (rows, extra, engine facts) as one stored run; OOM -> status "oom", another error ->
    "failed" (both recorded with the error, never dropped). Returns (run_id, status)."""
    run_id = store.start_run(kind, cfg.to_dict(), workload_dict(wl, study), extra=extra, point=point)
    try:
        rows, more, facts = fn()
    except Exception as err:  # recorded, then the sweep goes on
        status = "oom" if is_oom(err) else "failed"
        free_memory()
        store.finish_run(run_id, status, error=f"{type(err).__name__}: {str(err)[:2000]}")
        return run_id, status
    samples = more.pop("_telemetry_samples", [])
    store.add(run_id, rows)
    if samples:
        store.add_telemetry(run_id, samples)
    store.finish_run(run_id, "ok", extra=more, config=facts)
    return run_id, "ok"
