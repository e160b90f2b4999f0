"""`moelab trace`: run a workload on the engine with the routing recorder on, save the routing trace (tokens per
expert per step and MoE layer, moelab.analysis.trace format) with its provenance, and optionally measure what
recording costs by running the same workload on an engine without it."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from moelab.argtypes import positive_int


def _workload(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, min(vocab, 50_000), input_len).tolist() for _ in range(batch)]


def _timed_runs(llm, prompts, params, trials: int) -> list[float]:
    llm.generate(prompts[:2], params)  # warm-up
    out = []
    for _ in range(trials):
        t = time.perf_counter()
        llm.generate(prompts, params)
        out.append(time.perf_counter() - t)
    return out


def cmd_trace(args: argparse.Namespace) -> None:
    from moelab.analysis.trace import RoutingTrace
    from moelab.engine.sampling_params import SamplingParams
    from moelab.lab.bench import free_memory
    from moelab.lab.provenance import provenance
    from moelab.llm import LLM

    overrides = {k: v for k, v in (("layers", args.layers),) if v is not None}
    kw = dict(overrides=overrides, max_model_len=args.input_len + args.output_len + 8, seed=args.seed,
              max_num_seqs=max(args.batch, 1))
    if args.device:
        kw["device"] = args.device
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm = LLM(args.model, record_routing=True, **kw)
    eng = llm.engine
    prompts = _workload(args.batch, args.input_len, eng.spec.vocab_size, args.seed)
    rec = eng.routing_recorder
    with_rec = _timed_runs(llm, prompts, params, args.trials) if args.measure_overhead else []
    rec.reset()
    llm.generate(prompts, params)
    layer_ids = eng.moe_layer_ids()
    spec = eng.spec
    trace = RoutingTrace.from_counts(
        rec.as_array(), eng.top_k, source="engine",
        tokens=rec.tokens, layer_ids=layer_ids, model=args.model,
        spec_fields=dict(hidden_size=spec.hidden_size, moe_intermediate_size=spec.moe_intermediate_size,
                         num_experts=spec.num_experts, num_layers=spec.num_layers),
        workload=dict(batch=args.batch, input_len=args.input_len, output_len=args.output_len, seed=args.seed,
                      prompts="uniform random token ids"),
        provenance={**provenance(), "engine": {k: str(v) for k, v in vars(eng.resolved).items()},
                    "synthetic_weights": not Path(args.model).is_dir()})
    path = trace.save(args.out)
    print(f"saved {path}: {trace.num_steps} steps x {trace.num_layers} MoE layers x {trace.num_experts} experts, "
          f"{trace.num_tokens} tokens routed")
    result = {"trace": str(path), "steps": trace.num_steps, "tokens": int(trace.num_tokens)}
    if args.measure_overhead:
        del llm, eng, rec
        free_memory()
        plain = LLM(args.model, **kw)
        without = _timed_runs(plain, prompts, params, args.trials)
        a, b = statistics.median(with_rec), statistics.median(without)
        result.update(seconds_with=with_rec, seconds_without=without, overhead_pct=100 * (a - b) / b)
        print(f"recording overhead: {a:.4f} s with vs {b:.4f} s without (median of {args.trials}) = "
              f"{100 * (a - b) / b:+.2f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if getattr(args, "store", None) is not None:
        from moelab.lab.routing_store import store_trace
        from moelab.lab.store import ResultsStore

        store = ResultsStore(args.store or None)
        print(f"stored as run {store_trace(store, path, overhead=result, seed=args.seed)} in {store.path}")


def add_commands(sub, bench_sub) -> None:
    p = sub.add_parser("trace", help="record the engine's routing on a workload into a trace file")
    p.add_argument("--model", default="olmoe-1b-7b", help="checkpoint directory or preset")
    p.add_argument("--layers", type=positive_int, help="preset layer override")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--input-len", type=positive_int, default=128)
    p.add_argument("--output-len", type=positive_int, default=128)
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="routing_trace.npz")
    p.add_argument("--measure-overhead", action="store_true", help="also time the workload without recording")
    p.add_argument("--trials", type=positive_int, default=3)
    p.add_argument("--json", help="write the summary (and overhead) as JSON here")
    p.add_argument("--store", nargs="?", const="", help="also record the trace and its overhead in the results "
                   "store (default file: $MOELAB_STORE or ./moelab_results.sqlite)")
    p.set_defaults(func=cmd_trace)
