"""The lab's subcommands: `moelab calibrate | profile | doe | report | results` and `moelab bench throughput |
latency | sweep` (and `moelab bench` alone: the main job). Each parses flags and calls library functions; heavy
imports happen inside the handlers, so `moelab --help` stays fast."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moelab.argtypes import nonneg_int, positive_int, writable_dir

SHAPE_FLAGS = ("layers", "experts", "moe_intermediate_size", "hidden_size", "heads", "kv_heads", "vocab_size")
TABLE_COLS = ["run_id", "status", "model", "batch", "input_len", "output_len", "throughput", "throughput_cv",
              "output_throughput", "pct_of_floor", "ttft_oneshot", "ttft_median", "itl_median", "tpot_median"]


def add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="results file (default: $MOELAB_STORE or ./moelab_results.sqlite)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (a sweep's base point)")
    g.add_argument("--model", default="olmoe-1b-7b", help="preset name or checkpoint directory")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--device", default="auto")
    g.add_argument("--moe-backend", default="auto")
    g.add_argument("--attention", default="auto", choices=["auto", "sdpa", "triton"])
    g.add_argument("--top-k", type=int, help="experts per token (a shape override for presets)")
    for name in SHAPE_FLAGS:
        g.add_argument(f"--{name.replace('_', '-')}", type=int, help="shape override of the preset")
    g.add_argument("--max-model-len", type=int, help="default: the longest request, rounded up to 16")
    g.add_argument("--max-num-seqs", type=int, help="default: max(256, batch)")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--seed", type=int, default=0, help="weights and prompts")
    g.add_argument("--observed-routing", action="store_true",
                   help="floors from the routing the engine records instead of the uniform expectation")
    w = p.add_argument_group("workload")
    w.add_argument("--batch", type=positive_int, default=16)
    w.add_argument("--input-len", type=positive_int, default=128)
    w.add_argument("--output-len", type=positive_int, default=128)
    w.add_argument("--workload", default=None, choices=["fixed", "random", "file"],
                   help="default: fixed, random when --range-ratio > 0, file when --prompts is given")
    w.add_argument("--range-ratio", type=float, default=0.0,
                   help="random lengths uniform in [floor(L(1-r)), ceil(L(1+r))] (vLLM's rule), r in [0, 1)")
    w.add_argument("--prompts", help="text file, one prompt per line")
    t = p.add_argument_group("measurement")
    t.add_argument("--trials", type=positive_int, default=3)
    t.add_argument("--warmup", type=nonneg_int, default=1, help="untimed warm-up generates before the trials")
    t.add_argument("--no-telemetry", action="store_true", help="skip the NVML sampler")
    t.add_argument("--calibrate", action="store_true",
                   help="measure the ceilings afresh before running (always done on a GPU, once per command)")
    t.add_argument("--plain", action="store_true", help="plain progress lines instead of rich's bar")
    add_store_arg(p)


def _base(args: argparse.Namespace):
    from moelab.lab.bench import BenchConfig
    from moelab.lab.workload import Workload

    overrides = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k, None) is not None}
    cfg = BenchConfig(model=args.model, dtype=args.dtype, device=args.device, moe_backend=args.moe_backend,
                      attention=args.attention, top_k=args.top_k, overrides=overrides,
                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                      gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                      record_routing=args.observed_routing)
    kind = args.workload or ("file" if args.prompts else "random" if args.range_ratio > 0 else "fixed")
    wl = Workload(batch=args.batch, input_len=args.input_len, output_len=args.output_len, kind=kind,
                  range_ratio=args.range_ratio, path=args.prompts, seed=args.seed)
    return cfg, wl


def _options(args: argparse.Namespace, modes: tuple[str, ...]):
    from moelab.lab.bench import BenchOptions

    return BenchOptions(trials=args.trials, warmup=args.warmup, modes=modes, telemetry=not args.no_telemetry)


def _cal_for(store, fresh: bool):
    from moelab.lab.calibrate import get_calibration

    memo: dict[str, dict] = {}

    def cal(device: str) -> dict:
        if device not in memo:
            memo[device] = get_calibration(store, device, fresh=fresh)
        return memo[device]

    return cal


def _run(args: argparse.Namespace, pairs, modes, study=None, note="", resume=False) -> dict:
    from moelab.lab.store import ResultsStore
    from moelab.lab.sweep import PointFailed, run_sweep
    from moelab.lab.tables import format_table, point_table

    store = ResultsStore(args.store)
    try:
        res = run_sweep(store, pairs, _cal_for(store, args.calibrate), _options(args, modes), resume=resume,
                        study=study, note=note, fail_fast=getattr(args, "fail_fast", False), plain=args.plain)
    except PointFailed as err:  # --fail-fast: the point is stored with its error; the rest did not run
        print(f"moelab: {err}", file=sys.stderr)
        return {"status": {"-": "failed"}, "fail_fast": True}
    if res["status"]:
        print(format_table(point_table(store, list(res["status"])), TABLE_COLS))
    print(f"{res['ran']} point(s) run, {res['skipped']} skipped; stored in {store.path} (sweep {res['sweep']})")
    return res


def _failed(res: dict) -> int:
    """Exit status 1 when a point failed (its error is in the store), so scripts and CI see it."""
    failed = sum(s == "failed" for s in res["status"].values())
    if failed:
        print(f"{failed} point(s) failed; see `moelab results --table runs` for their errors", file=sys.stderr)
    return 1 if failed else 0


def cmd_bench_one(args: argparse.Namespace) -> int:
    return _failed(_run(args, [_base(args)], (args.bench_command,)))


def cmd_sweep(args: argparse.Namespace) -> int:
    from moelab.lab.sweep import STUDIES, expand, load_design, load_yaml, parse_grid, plan

    cfg, wl = _base(args)
    sources = [bool(args.study), bool(args.config), bool(args.design)]
    if sum(sources) > 1:
        raise ValueError("give at most one of --study, --config, --design (--grid may refine any of them)")
    note, base, grid = "", {}, {}
    if args.study:
        spec = STUDIES[args.study]
        base, grid, note = dict(spec["base"]), dict(spec["grid"]), spec["note"]
    elif args.config:
        spec = load_yaml(args.config)
        base, grid, note = spec["base"], spec["grid"], spec["note"]
    grid.update(parse_grid(args.grid or []))
    if args.design:
        points = [{**base, **p} for p in load_design(args.design)]
        points = [{**p, **q} for p in points for q in expand(grid)] if grid else points
    else:
        if not grid:
            raise ValueError("nothing to sweep: give --grid KEY=V1,V2 ..., --config FILE, --study NAME or --design")
        points = [{**base, **p} for p in expand(grid)]
    pairs = plan(points, cfg, wl)
    if args.report and not args.dry_run:
        writable_dir(args.report, "--report")  # before the points run
    if args.dry_run:
        for c, w in pairs:
            print(f"{c.model} {c.overrides} top_k={c.top_k} dtype={c.dtype} backend={c.moe_backend} | "
                  f"batch={w.batch} in={w.input_len} out={w.output_len} {w.kind}")
        print(f"{len(pairs)} points")
        return
    modes = tuple(m.strip() for m in args.modes.split(","))
    res = _run(args, pairs, modes, study=args.study, note=note, resume=args.resume)
    if res.get("fail_fast"):
        return 1
    if args.report:
        _write_report(args.store, args.report)
    return _failed(res)


def cmd_bench_default(args: argparse.Namespace) -> None:
    """`moelab bench` with no subcommand: a small sweep of a tiny synthetic OLMoE on the CPU, stored and reported."""
    from moelab.lab.bench import BenchConfig, BenchOptions
    from moelab.lab.store import ResultsStore
    from moelab.lab.sweep import DEFAULT_STUDY, expand, plan, run_sweep
    from moelab.lab.tables import format_table, point_table
    from moelab.lab.workload import Workload

    store = ResultsStore(getattr(args, "store", None))
    points = [{**DEFAULT_STUDY["base"], **p} for p in expand(DEFAULT_STUDY["grid"])]
    pairs = plan(points, BenchConfig(), Workload())
    res = run_sweep(store, pairs, _cal_for(store, False), BenchOptions(trials=2, telemetry=False),
                    study="tiny-cpu", note=DEFAULT_STUDY["note"])
    print(format_table(point_table(store, list(res["status"])), TABLE_COLS))
    _write_report(getattr(args, "store", None), "moelab_report")


def _write_report(store_path: str | None, out: str) -> None:
    from moelab.lab.report import build_report
    from moelab.lab.store import ResultsStore

    paths = build_report(ResultsStore(store_path, must_exist=True), Path(out))
    print(f"report: {paths['html']} and {paths['md']}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from moelab.lab.calibrate import UNITS, measure, record
    from moelab.lab.store import ResultsStore

    cal = measure(args.device, iters=args.iters)
    run_id = record(ResultsStore(args.store), cal)
    print(f"calibration {run_id} of {cal['device_key']}:")
    for m, v in cal["values"].items():
        scale, unit = (1e9, "GB/s") if UNITS[m] == "B/s" else (1e12, "TFLOP/s")
        print(f"  {m:16s} {v / scale:10.3f} {unit}   ({cal['sizes'][m]})")
    for m, why in cal["skipped"].items():
        print(f"  {m:16s} skipped: {why}")


def cmd_results(args: argparse.Namespace) -> None:
    from moelab.lab.store import ResultsStore
    from moelab.lab.tables import format_table, point_table

    store = ResultsStore(args.store, must_exist=True)
    if args.export:
        print(f"wrote {store.export(args.export, table=args.table)}")
        return
    if args.table == "runs":
        runs = store.runs()
        cols = ["run_id", "kind", "status", "started_at", "gpu_name", "git_sha", "error"]
        print(runs[cols].to_string(index=False) if not runs.empty else f"{store.path}: no runs")
        return
    if args.table == "telemetry":
        tel = store.telemetry()
        print(tel.to_string(index=False, max_rows=60) if not tel.empty else f"{store.path}: no telemetry")
        return
    print(format_table(point_table(store), TABLE_COLS))


def cmd_report(args: argparse.Namespace) -> None:
    _write_report(args.store, args.out)


def add_commands(sub, bench_sub) -> None:
    """Register the lab's commands on the top-level subparsers and on `moelab bench`'s subparsers."""
    from moelab.lab.doe_cli import add_doe_commands
    from moelab.lab.sweep import STUDIES

    bench = sub.choices.get("bench")
    if bench is not None:  # `moelab bench` alone runs the main job
        bench.description = ("Benchmarks. With no subcommand: the main job, a small sweep of a tiny synthetic OLMoE "
                             "on the CPU, stored in the results store and reported in ./moelab_report (under a "
                             "minute).")
        bench_sub.required = False
        bench.set_defaults(func=cmd_bench_default)
        add_store_arg(bench)

    for mode, text in (("throughput", "offline throughput: batch x (input + output) / E2E time, output tok/s"),
                       ("latency", "TTFT (one-token run and per-token timestamps), ITL, TPOT, E2E")):
        p = bench_sub.add_parser(mode, help=text)
        add_engine_args(p)
        p.set_defaults(func=cmd_bench_one)

    p = bench_sub.add_parser("sweep", help="a grid of points (--grid, --config YAML, --study, --design)")
    add_engine_args(p)
    p.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="factors and their levels")
    p.add_argument("--config", help="YAML sweep file: {grid: {...}, base: {...}, note: ...}")
    p.add_argument("--study", choices=sorted(STUDIES), help="a built-in study")
    p.add_argument("--design", help="a design CSV from `moelab doe design`")
    p.add_argument("--modes", default="throughput,latency", help="throughput, latency or both (comma list)")
    p.add_argument("--resume", action="store_true", help="run only the points not yet stored ok or oom")
    p.add_argument("--dry-run", action="store_true", help="list the points and stop")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed point")
    p.add_argument("--report", metavar="DIR", help="write the report into DIR afterwards")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("calibrate", help="measure copy bandwidth, matmul rates and host-to-device bandwidth")
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=positive_int, default=10)
    add_store_arg(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("results", help="the stored runs as a table, or export them")
    add_store_arg(p)
    p.add_argument("--export", help="write the table to this .csv or .parquet file")
    p.add_argument("--table", default="rows", choices=["rows", "runs", "telemetry"])
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("report", help="HTML + Markdown report from the store (never re-runs anything)")
    add_store_arg(p)
    p.add_argument("--out", default="moelab_report", help="output directory")
    p.set_defaults(func=cmd_report)

    add_doe_commands(sub)
