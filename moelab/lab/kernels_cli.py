"""`moelab bench kernels` (check every MoE backend against the naive oracle, time the layer, store the rows) and
`moelab tune-kernels` (write tuned tile configs). Flags only; the work is in moelab/lab/kernel_bench.py."""

from __future__ import annotations

import argparse
import os

from moelab.lab.cli import add_store_arg


def _ints(text: str, what: str = "--m") -> tuple[int, ...]:
    """"1,16,64" -> (1, 16, 64): positive integers, no empty items."""
    items = [v.strip() for v in text.split(",")]
    try:
        values = tuple(int(v) for v in items)
    except ValueError:
        raise ValueError(f"{what} {text!r}: want comma-separated positive integers, e.g. 1,16,64") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} {text!r}: want comma-separated positive integers, e.g. 1,16,64")
    return values


def _names(text: str, allowed, what: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(","))
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"unknown {what} {bad or text!r}; available: {', '.join(allowed)}")
    return names


def _shapes(args: argparse.Namespace, device: str) -> dict[str, tuple[int, int, int, int]]:
    from moelab.lab import kernel_bench as kb

    if args.shape:
        return {args.shape.replace(",", "x"): kb.parse_shape(args.shape)}
    table = kb.SHAPES if device != "cpu" else kb.TINY_SHAPES
    names = args.shapes or ",".join(table)
    return {n: table[n] for n in _names(names, list(table), "shape (on this device)")}


def _device(args: argparse.Namespace) -> str:
    from moelab.device import check_device, default_device

    if args.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: cpu or cuda")
    return check_device(args.device) if args.device else default_device()


def _preset_shape(name: str) -> tuple[int, int, int, int]:
    """(E, K, D, I) of a benchmark shape name (olmoe, ...) or of a model preset (olmoe-1b-7b, ...)."""
    from moelab.lab import kernel_bench as kb
    from moelab.presets import preset_spec

    named = {**kb.SHAPES, **kb.TINY_SHAPES}
    if name in named:
        return named[name]
    try:
        s = preset_spec(name)
    except (KeyError, ValueError):
        raise ValueError(f"--preset {name!r}: not a shape ({', '.join(named)}) or a model preset") from None
    return s.num_experts, s.top_k, s.hidden_size, s.moe_intermediate_size


def cmd_bench_kernels(args: argparse.Namespace) -> None:
    from moelab.lab import kernel_bench as kb
    from moelab.lab.store import ResultsStore

    device = _device(args)
    cfg = kb.KernelBenchConfig(
        shapes=_shapes(args, device), ms=_ints(args.m) if args.m else (kb.MS if device != "cpu" else (1, 5)),
        dtypes=_names(args.dtype, kb.DTYPES, "dtype"), backends=_names(args.backends, kb.backend_names(), "backend"),
        routings=("uniform", "skewed") if args.routing == "both" else (args.routing,),
        time_layer=not args.no_time, device=device, seed=args.seed)
    store = ResultsStore(args.store)
    run_id = store.start_run("bench_kernels", {"backends": cfg.backends, "dtypes": cfg.dtypes, "device": device},
                             {"shapes": cfg.shapes, "ms": cfg.ms, "routings": cfg.routings})
    try:
        rows = kb.run(cfg)
    except Exception as exc:
        store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    print(kb.format_table(rows))
    store.add(run_id, rows)
    store.finish_run(run_id, "ok")
    print(f"stored {len(rows)} rows as run {run_id} in {store.path}")


def cmd_tune_kernels(args: argparse.Namespace) -> None:
    from moelab.lab import kernel_bench as kb

    device = _device(args)
    shape = kb.parse_shape(args.shape) if args.shape else _preset_shape(args.preset)
    ms = _ints(args.m) if args.m else (kb.MS if device != "cpu" else (1, 5))
    dtypes = _names(args.dtype, kb.DTYPES, "dtype")
    paths = {dt: kb.tuned_path(shape, dt, device, args.out) for dt in dtypes}
    for path in paths.values():  # before any tuning: where the results go must be writable
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--out {path.parent}: cannot create it ({err.strerror})") from None
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"--out {path.parent}: not writable")
    for dtype in dtypes:
        path = paths[dtype]
        try:
            table = kb.read_tuned(path) if path.exists() else {}
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a tuned config table ({err}); move it away to start a new one") from None
        # the table's entries compete (a re-tune never writes a slower config), and the M not asked for stay
        best = kb.tune(shape, ms, dtype, device, args.seed, baseline=table or None,
                       workers=args.workers if device != "cpu" else 1)
        kept = sorted(set(table) - set(best))
        path = kb.write_tuned(shape, dtype, {**table, **best}, device, args.out)
        print(f"wrote {path} (tuned M {', '.join(map(str, sorted(best)))}"
              + (f"; kept M {', '.join(map(str, kept))} as they were)" if kept else ")"))


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("kernels", help="MoE backends: checks against the naive oracle, then layer timings")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shapes", help="named shapes (GPU: olmoe,mixtral,qwen3,dsv2-lite; CPU: tiny,tiny-e60)")
    g.add_argument("--shape", help="one shape E,K,D,I (experts, top-k, hidden, expert intermediate)")
    p.add_argument("--m", help="token counts, e.g. 1,16,64 (default: 1..16384 on the GPU, 1,5 on the CPU)")
    p.add_argument("--dtype", default="bf16", help="comma-separated: bf16,fp16,fp32,fp8_tensor,fp8_channel,"
                   "fp8_block,int8_channel")
    p.add_argument("--backends", default="naive,grouped,triton")
    p.add_argument("--routing", default="both", choices=["uniform", "skewed", "both"], help="routing of the checks")
    p.add_argument("--no-time", action="store_true", help="checks only")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    add_store_arg(p)
    p.set_defaults(func=cmd_bench_kernels)

    p = sub.add_parser("tune-kernels", help="time tile configs of the fused MoE kernels and write the best as JSON")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--shape", help="E,K,D,I")
    g.add_argument("--preset", help="olmoe, mixtral, qwen3, dsv2-lite, tiny, tiny-e60, or a model preset")
    p.add_argument("--m", help="token counts (default: 1..16384 on the GPU, 1,5 on the CPU)")
    p.add_argument("--dtype", default="bf16", help="comma-separated dtypes / quantized formats, as bench kernels")
    p.add_argument("--out", help="directory for the JSON files (default: moelab/kernels/configs/)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1),
                   help="processes that compile the candidate kernels before the timings (GPU only)")
    p.set_defaults(func=cmd_tune_kernels)
