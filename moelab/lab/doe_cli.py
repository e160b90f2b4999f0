"""`moelab doe design | analyze` and `moelab profile`: flag parsing and one library call each."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def cmd_doe_design(args: argparse.Namespace) -> None:
    from moelab.lab.doe import fractional_factorial, full_factorial, parse_factor
    from moelab.lab.sweep import convert

    parsed = [parse_factor(f) for f in args.factor]
    names = [n for n, _ in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"factor(s) {', '.join(repeated)} given more than once")
    # the design is run by `bench sweep --design`: every factor must be a sweep factor, every level of its type
    factors = {n: [convert(n, v) for v in levels] for n, levels in parsed}
    d = fractional_factorial(factors, args.generator, args.seed) if args.generator else \
        full_factorial(factors, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    d.table.to_csv(out, index=False)
    print(d.table.to_string(index=False))
    print(f"{len(d.table)} runs, written to {out}")
    if d.letters:
        print("letters: " + ", ".join(f"{v}={k}" for k, v in d.letters.items()))
    if d.words:
        print(f"defining relation: I = {' = '.join(d.words)}; resolution {d.resolution}")
        for eff, al in d.aliases(2).items():
            if al:
                print(f"  {eff} = {' = '.join(al)}")
    print(f"run it: moelab bench sweep --design {out} [engine flags]")


def resolve_factor(df: Any, name: str) -> str:
    """A factor's column in the stored rows: the name itself, else overrides.<name>, else spec.<name>."""
    for col in (name, f"overrides.{name}", f"spec.{name}"):
        if col in df.columns and df[col].notna().any():
            return col
    raise ValueError(f"factor {name!r} is not a column of the selected rows (nor overrides.{name} / spec.{name})")


def select_rows(store: Any, args: argparse.Namespace) -> Any:
    """The rows of one metric (and stat) from the chosen runs: --kind, --study, --sweep, --run-ids."""
    filters: dict[str, Any] = {"metric": args.metric}
    if args.kind:
        filters["kind"] = args.kind.split(",")
    if args.run_ids:
        filters["run_id"] = args.run_ids
    df = store.rows(**filters)
    if args.study and not df.empty:
        df = df[df["study"] == args.study] if "study" in df.columns else df.iloc[0:0]
    if args.sweep and not df.empty:
        runs = store.runs(run_id=list(df["run_id"].unique()))
        ids = set(runs[[e.get("sweep") == args.sweep for e in runs["extra"]]]["run_id"])
        df = df[df["run_id"].isin(ids)]
    if args.stat and "stat" in df.columns:
        df = df[df["stat"] == args.stat]
    if df.empty:
        raise ValueError(f"no stored rows of metric {args.metric!r} match the selection")
    return df


def cmd_doe_analyze(args: argparse.Namespace) -> None:
    from moelab.lab.anova import anova, residual_plot
    from moelab.lab.store import ResultsStore

    store = ResultsStore(args.store, must_exist=True)
    df = select_rows(store, args)
    names = [f.strip() for f in args.factors.split(",") if f.strip()]
    cols = [resolve_factor(df, f) for f in names]
    res = anova(df.rename(columns=dict(zip(cols, names))), "value", names, order=args.order, log=args.log)
    title = f"{args.metric}{'/' + args.stat if args.stat else ''} ~ {' x '.join(names)}"
    png = residual_plot(res, title)
    source = sorted(df["run_id"].unique())
    run_id = store.start_run("anova", {"metric": args.metric, "stat": args.stat, "factors": ",".join(names),
                                       "order": args.order, "log": args.log},
                             {"kind": args.kind, "study": args.study, "sweep": args.sweep, "n": res.n},
                             point=f"anova:{title}:{','.join(source)}")
    rows = []
    for _, t in res.table.iterrows():
        for col in ("df", "sum_sq", "mean_sq", "F", "p_value", "eta_sq", "partial_eta_sq"):
            rows.append({"metric": col, "value": t[col], "unit": "", "term": t["term"]})
    rows += [{"metric": "r_squared", "value": res.r_squared, "unit": ""},
             {"metric": "shapiro_w", "value": res.shapiro_w, "unit": ""},
             {"metric": "shapiro_p", "value": res.shapiro_p, "unit": ""}]
    store.add(run_id, rows)
    store.add_artifact(run_id, "residuals.png", png, "image/png")
    store.add_artifact(run_id, "anova.csv", res.table.to_csv(index=False), "text/csv")
    store.finish_run(run_id, extra={"source_runs": source, "dropped": res.dropped, "title": title,
                                    "response": args.metric})
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        res.table.to_csv(out / "anova.csv", index=False)
        (out / "residuals.png").write_bytes(png)
    print(f"ANOVA of {title}{' (log)' if args.log else ''}: n = {res.n}, R^2 = {res.r_squared:.4f}")
    print(res.table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if res.dropped:
        print(f"not estimable (aliased with earlier terms or missing points): {', '.join(res.dropped)}")
    print(f"Shapiro-Wilk on residuals: W = {res.shapiro_w:.4f}, p = {res.shapiro_p:.4g}")
    print(f"stored as run {run_id} (from {len(source)} runs)")


def cmd_profile(args: argparse.Namespace) -> None:
    from moelab.lab.cli import _base
    from moelab.lab.profile_run import profile_point
    from moelab.lab.store import ResultsStore

    store = ResultsStore(args.store)
    cfg, wl = _base(args)
    result = profile_point(store, cfg, wl, run=args.run, out=Path(args.out) if args.out else None)
    print(f"profile run {result['run_id']} ({result['wall']:.3f} s profiled); trace: {result['trace_path']} "
          "(open in https://ui.perfetto.dev)")
    for dev, cats in result["breakdown"].items():
        total = sum(cats.values())
        if total > 0:
            print(f"  {dev}: " + ", ".join(f"{c} {100 * s / total:.1f}%" for c, s in cats.items() if s > 0))
    print(json.dumps(result["top"][:8], indent=1))


def add_doe_commands(sub: Any) -> None:
    from moelab.lab.cli import add_engine_args, add_store_arg

    doe = sub.add_parser("doe", help="designed experiments: factorial designs and their ANOVA")
    doe_sub = doe.add_subparsers(dest="doe_command", required=True)
    p = doe_sub.add_parser("design", help="full or 2-level fractional factorial design, written as CSV")
    p.add_argument("--factor", action="append", required=True, metavar="NAME=L1,L2[,...]",
                   help="a factor and its levels (repeat); the first level is coded -1")
    p.add_argument("--generator", action="append", default=[], metavar="D=ABC",
                   help="fractional design generator, letters (A = first factor) or names (top_k=batch*input_len)")
    p.add_argument("--seed", type=int, help="randomize the run order with this seed")
    p.add_argument("--out", default="design.csv")
    p.set_defaults(func=cmd_doe_design)

    p = doe_sub.add_parser("analyze", help="ANOVA of stored results: effects, eta^2, residual checks")
    add_store_arg(p)
    p.add_argument("--metric", default="throughput")
    p.add_argument("--stat", help="for latency metrics: mean, median, p90, p99, ...")
    p.add_argument("--factors", required=True, help="comma list, e.g. batch,input_len,top_k")
    p.add_argument("--kind", help="run kinds (comma list), e.g. bench,throughput")
    p.add_argument("--study", help="only runs of this study")
    p.add_argument("--sweep", help="only runs of this sweep id")
    p.add_argument("--run-ids", nargs="+")
    p.add_argument("--order", type=int, default=2, help="highest interaction order")
    p.add_argument("--log", action="store_true", help="analyze log(response) (multiplicative effects)")
    p.add_argument("--out", help="also write anova.csv and residuals.png here")
    p.set_defaults(func=cmd_doe_analyze)

    p = sub.add_parser("profile", help="torch profiler trace (Perfetto) and per-module breakdown of one point")
    add_engine_args(p)
    p.add_argument("--run", help="profile the config and workload of this stored run instead of the flags")
    p.add_argument("--out", help="directory for trace.json.gz (default: a temporary directory)")
    p.set_defaults(func=cmd_profile)
