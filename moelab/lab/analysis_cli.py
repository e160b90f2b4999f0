"""The analysis subcommands: `moelab analyze routing | synthetic`, `moelab placement`, `moelab recommend`,
`moelab memory`, `moelab predict` and `moelab predictor fit | evaluate`. Each parses flags and calls the library in
moelab.analysis; heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
from pathlib import Path

from moelab.argtypes import nonneg_float, nonneg_int, positive_float, positive_int, positive_int_list, share


def _num(v: float, fmt: str) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else fmt.format(v)


def _show(df, floatfmt: str = "{:.3g}") -> str:
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.max_colwidth", 120):
        return df.to_string(index=False, float_format=lambda v: _num(v, floatfmt), na_rep="")


def _spec(preset: str):
    from moelab.presets import preset_spec

    return preset_spec(preset)


def _cluster(args: argparse.Namespace, gpus: int):
    from moelab.analysis.hardware import H100, Cluster, parse_bytes
    from moelab.roofline import Ceilings

    per_node = args.gpus_per_node
    if getattr(args, "nodes", None):
        if gpus % args.nodes:
            raise ValueError(f"--nodes {args.nodes} does not divide --gpus {gpus}")
        per_node = gpus // args.nodes
    c = Ceilings(args.bandwidth or H100.bandwidth, args.matmul or H100.matmul, H100.name)
    return Cluster(gpus, per_node, parse_bytes(args.gpu_memory), args.memory_utilization, c,
                   parse_bytes(args.intra_bw), parse_bytes(args.inter_bw), args.link_latency_us * 1e-6)


def _add_cluster_args(p: argparse.ArgumentParser, gpus_required: bool = True) -> None:
    g = p.add_argument_group("cluster (defaults: H100 SXM nodes)")
    g.add_argument("--gpus", type=positive_int, required=gpus_required, help="GPU count")
    g.add_argument("--gpus-per-node", type=positive_int, default=8)
    g.add_argument("--nodes", type=positive_int, help="node count (sets GPUs per node = gpus / nodes)")
    g.add_argument("--gpu-memory", default="80GB", help="memory per GPU: 80GB = 80e9 bytes, 80GiB = 80 * 2^30")
    g.add_argument("--memory-utilization", type=share, default=0.90, help="share of GPU memory the engine uses")
    g.add_argument("--bandwidth", type=positive_float, help="HBM copy bandwidth, bytes/s (default 3.0e12, measured)")
    g.add_argument("--matmul", type=positive_float, help="bf16 matmul rate, FLOP/s (default 798e12, measured)")
    g.add_argument("--intra-bw", default="450GB", help="NVLink bytes/s per GPU per direction (nominal)")
    g.add_argument("--inter-bw", default="50GB", help="network bytes/s per GPU between nodes (nominal 400 Gb/s)")
    g.add_argument("--link-latency-us", type=nonneg_float, default=10.0, help="latency added to each collective, us")


# ----- analyze -----
def cmd_analyze_routing(args: argparse.Namespace) -> None:
    from moelab.analysis.balance import layer_table
    from moelab.analysis.figures import routing_figures
    from moelab.analysis.synthetic import baseline_summary
    from moelab.analysis.trace import RoutingTrace

    trace = RoutingTrace.load(args.trace)
    print(f"{args.trace}: {trace.model or '?'} | source {trace.source} | E={trace.num_experts} K={trace.top_k} "
          f"| {trace.num_layers} MoE layers | {trace.num_steps} steps | {trace.num_tokens} tokens")
    table = layer_table(trace)
    print(_show(table if args.per_layer else table.tail(2)))
    if args.baseline:
        print("\nmean over layers (baselines: synthetic, same E, K, layers, steps and tokens)")
        print(_show(baseline_summary(trace, args.baseline, args.seed)))
    if args.figures:
        out = Path(args.figures)
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in routing_figures(trace).items():
            fig.savefig(out / f"{name}.png")
            print(f"wrote {out / name}.png")
    if args.store is not None:
        from moelab.lab.routing_store import store_trace
        from moelab.lab.store import ResultsStore

        store = ResultsStore(args.store or None)
        kw = {"baselines": tuple(args.baseline)} if args.baseline else {}
        print(f"stored as run {store_trace(store, args.trace, seed=args.seed, **kw)} in {store.path}")


def cmd_analyze_synthetic(args: argparse.Namespace) -> None:
    from moelab.analysis.synthetic import parse_baseline, synthetic_like

    kind, params = parse_baseline(args.kind)
    trace = synthetic_like(_spec(args.preset), kind, steps=args.steps, tokens_per_step=args.tokens, seed=args.seed,
                           model=args.preset, **params)
    print(f"wrote {trace.save(args.out)}: {trace.source}, {trace.num_layers} layers, {trace.num_tokens} tokens")


# ----- placement -----
def cmd_placement(args: argparse.Namespace) -> None:
    from moelab.analysis.simulate import compare
    from moelab.analysis.strategies import STRATEGIES, make_placement
    from moelab.analysis.trace import RoutingTrace

    trace = RoutingTrace.load(args.trace)
    cluster = _cluster(args, args.gpus)
    names = list(STRATEGIES) if args.strategy == "all" else args.strategy.split(",")
    groups = args.groups or (_spec(args.preset).n_group if args.preset else 1)
    placements = {}
    for n in names:
        kw = dict(redundant=args.redundant) if n.startswith("eplb") else {}
        try:
            placements[n] = make_placement(n, trace, args.gpus, gpus_per_node=cluster.node_size, num_groups=groups,
                                           **kw)
        except ValueError as err:
            if args.strategy != "all":
                raise
            print(f"skipped {n}: {err}")
    spec = _spec(args.preset) if args.preset else None
    kw = dict(hidden_size=spec.hidden_size, moe_intermediate_size=spec.moe_intermediate_size) if spec else {}
    print(f"{trace.model or args.trace} ({trace.source}) on {args.gpus} GPUs in {cluster.nodes} node(s)")
    print(_show(compare(trace, placements, cluster, **kw)))
    if args.out:
        for n, p in placements.items():
            path = Path(args.out) if len(placements) == 1 else Path(args.out).with_suffix(f".{n}.json")
            print(f"wrote {p.save(path)}")


# ----- recommend and memory -----
def cmd_recommend(args: argparse.Namespace) -> None:
    from moelab.analysis.recommend import recommend, recommendation_table
    from moelab.analysis.throughput import Workload

    cluster, wl = _cluster(args, args.gpus), Workload.parse(args.workload)
    recs = recommend(_spec(args.preset), cluster, wl, args.dtype, args.kv_dtype)
    table = recommendation_table(recs)
    print(f"{args.preset} | {args.dtype} weights, {args.kv_dtype} KV | {args.gpus} x {cluster.gpu_memory / 1e9:.0f} "
          f"GB in {cluster.nodes} node(s) | in={wl.input_len} out={wl.output_len} batch={wl.batch}")
    shown = table if args.all else table.head(args.top)
    print(_show(shown, "{:.4g}"))
    if len(shown) < len(table):
        print(f"({len(table) - len(shown)} more layouts; --all shows them)")
    if args.csv:
        table.to_csv(args.csv, index=False)


def cmd_memory(args: argparse.Namespace) -> None:
    import pandas as pd

    from moelab.analysis.layout import parse_layout
    from moelab.analysis.memory import memory_report

    spec, cluster = _spec(args.preset), _cluster(args, args.gpus)
    layout = parse_layout(args.layout, args.gpus)
    problems = layout.problems(spec)
    if problems:
        raise ValueError(f"{layout.name} cannot run {args.preset}: {'; '.join(problems)}")
    rep = memory_report(spec, layout, cluster, args.dtype, args.kv_dtype)
    w = rep.weights
    parts = {"routed experts": w.routed_experts, "attention": w.attention, "dense+shared MLP": w.dense_and_shared_mlp,
             "embedding+LM head": w.embedding_and_head, "norms+router": w.other, "activations": rep.activations,
             "CUDA graphs": rep.cuda_graphs, "comm buffers": rep.comm_buffers, "KV cache (free)": max(0, rep.kv_free)}
    print(f"{args.preset} | {rep.layout.name}: {rep.layout.describe()} | budget {rep.budget / 1e9:.1f} GB/GPU")
    print(_show(pd.DataFrame({"part": list(parts), "GB/GPU": [v / 1e9 for v in parts.values()]}), "{:.2f}"))
    print(f"KV {rep.kv_per_token / 1024:.1f} KiB/token/GPU -> {rep.kv_tokens} tokens per replica")
    ctx = args.contexts
    print(_show(pd.DataFrame({"context": ctx, "max batch": [rep.max_batch(c) for c in ctx]})))
    print(rep.fit(args.batch, args.context)[1] if args.batch else "")


# ----- predictor -----
def _store_rows(path: str | None):
    from moelab.lab.store import ResultsStore

    return ResultsStore(path, must_exist=True).rows()


def cmd_predict(args: argparse.Namespace) -> None:
    import pandas as pd

    from moelab.analysis.hardware import H100
    from moelab.analysis.predictor import Predictor, analytic_floor
    from moelab.roofline import Ceilings

    point = dict(model=args.preset, batch=args.batch, input_len=args.input_len, output_len=args.output_len,
                 metric=args.metric)
    for item in args.override or []:
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise ValueError(f"--override {item!r}: expected NAME=INTEGER, e.g. layers=2")
        point[f"overrides.{name}"] = int(value)
    row = pd.DataFrame([point])
    c = Ceilings(args.bandwidth or H100.bandwidth, args.matmul or H100.matmul)
    floor = float(analytic_floor(row, c).iloc[0])
    print(f"{args.preset} batch {args.batch} in {args.input_len} out {args.output_len}: roofline {args.metric} "
          f"{floor:.4g} ({c.bandwidth:.3g} B/s, {c.matmul:.3g} FLOP/s)")
    if args.model_file:
        p = Predictor.load(args.model_file)
        if p.metric != args.metric:
            raise ValueError(f"{args.model_file} predicts {p.metric!r}, not {args.metric!r}")
        pc = p.ceilings
        print(f"learned: {float(p.predict(row).iloc[0]):.4g} (data {p.data_hash}, {p.n_rows} rows, "
              f"models {', '.join(p.models_seen)}; its floors use the ceilings it was fitted with, "
              f"{pc.bandwidth:.3g} B/s, {pc.matmul:.3g} FLOP/s, whatever --bandwidth / --matmul say)")


def cmd_predictor_fit(args: argparse.Namespace) -> None:
    from moelab.analysis.predictor import fit

    p = fit(_store_rows(args.store), args.metric)
    print(f"fitted {p.metric} on {p.n_rows} rows (data {p.data_hash}); wrote {p.save(args.out)}")


def cmd_predictor_evaluate(args: argparse.Namespace) -> None:
    from moelab.analysis.predictor import evaluate

    print(_show(evaluate(_store_rows(args.store), args.metric, by=args.by.split(",")), "{:.1f}"))


def add_commands(sub, bench_sub) -> None:
    """Register the analysis commands on the top-level subparsers (bench_sub is unused)."""
    an = sub.add_parser("analyze", help="routing analysis: load-balance metrics of a trace, synthetic traces")
    an_sub = an.add_subparsers(dest="analyze_command", required=True)
    p = an_sub.add_parser("routing", help="per-layer and overall load-balance metrics of a routing trace")
    p.add_argument("trace", help="a routing trace (.npz)")
    p.add_argument("--baseline", action="append", help="synthetic baseline beside it: uniform, zipf:S, "
                                                       "hotset:FRACTION:SHARE (repeatable)")
    p.add_argument("--per-layer", action="store_true", help="print every layer, not only the summary rows")
    p.add_argument("--figures", help="write the heatmaps as PNG into this directory")
    p.add_argument("--store", nargs="?", const="", help="also record the trace, its metrics and baselines in the "
                   "results store (default file: $MOELAB_STORE or ./moelab_results.sqlite), for the report")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_analyze_routing)
    p = an_sub.add_parser("synthetic", help="write a synthetic routing trace with a preset's E, K and layers")
    p.add_argument("--preset", required=True)
    p.add_argument("--kind", default="zipf:1.2", help="uniform, zipf:S or hotset:FRACTION:SHARE")
    p.add_argument("--steps", type=positive_int, default=16)
    p.add_argument("--tokens", type=positive_int, default=256, help="tokens per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_analyze_synthetic)

    p = sub.add_parser("placement", help="place experts on GPUs from a trace and simulate the placement")
    p.add_argument("--trace", required=True)
    p.add_argument("--strategy", default="all", help="contiguous, round_robin, lpt, coactivation, eplb, "
                                                     "eplb_global, eplb_hierarchical, a comma list, or all")
    p.add_argument("--redundant", type=nonneg_int, default=0, help="EPLB: redundant expert slots per layer")
    p.add_argument("--groups", type=positive_int,
                   help="EPLB hierarchical: expert groups (default: the preset's n_group)")
    p.add_argument("--preset", help="take hidden and expert sizes (and groups) from this preset")
    p.add_argument("--out", help="write the placement JSON here (one file per strategy with several)")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_placement)

    for name, fn, help_ in (("recommend", cmd_recommend, "rank parallel layouts by predicted throughput"),
                            ("memory", cmd_memory, "memory per GPU of one layout; max batch per context")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--preset", required=True)
        p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8", "int8"], help="weight precision")
        p.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8"])
        _add_cluster_args(p)
        p.set_defaults(func=fn)
        if name == "recommend":
            p.add_argument("--workload", default="in=1024,out=256,batch=64", help="in=N,out=N,batch=N")
            p.add_argument("--top", type=positive_int, default=8, help="rows to print")
            p.add_argument("--all", action="store_true", help="print every layout")
            p.add_argument("--csv", help="write the whole table to this CSV file")
        else:
            p.add_argument("--layout", default="tp", help="tp, dp[:attn_tp], ep, tp+ep[:ep], dpa+ep[:attn_tp]")
            p.add_argument("--contexts", type=positive_int_list, default=[1024, 4096, 16384, 32768])
            p.add_argument("--batch", type=positive_int, help="with --context: check that this batch fits")
            p.add_argument("--context", type=positive_int, default=4096)

    p = sub.add_parser("predict", help="roofline and learned prediction of one point")
    p.add_argument("--preset", required=True)
    p.add_argument("--batch", type=positive_int, required=True)
    p.add_argument("--input-len", type=positive_int, required=True)
    p.add_argument("--output-len", type=positive_int, required=True)
    p.add_argument("--metric", default="output_throughput")
    p.add_argument("--model-file", help="a predictor saved by `moelab predictor fit`")
    p.add_argument("--override", action="append", help="shape override NAME=N as in the lab's runs (layers=2)")
    p.add_argument("--bandwidth", type=positive_float,
                   help="HBM copy bandwidth for the roofline, bytes/s (default H100)")
    p.add_argument("--matmul", type=positive_float, help="matmul rate for the roofline, FLOP/s (default H100)")
    p.set_defaults(func=cmd_predict)
    pr = sub.add_parser("predictor", help="fit or evaluate the learned predictor on the results store")
    pr_sub = pr.add_subparsers(dest="predictor_command", required=True)
    for name, fn in (("fit", cmd_predictor_fit), ("evaluate", cmd_predictor_evaluate)):
        p = pr_sub.add_parser(name)
        p.add_argument("--store", help="results file (default: $MOELAB_STORE or ./moelab_results.sqlite)")
        p.add_argument("--metric", default="output_throughput", help="metric to model (a row metric of the store)")
        p.set_defaults(func=fn)
        if name == "fit":
            p.add_argument("--out", default="moelab_predictor.joblib")
        else:
            p.add_argument("--by", default="model,batch", help="leave-one-out columns")
