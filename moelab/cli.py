"""The `moelab` command line. Each subcommand parses its flags and calls one library function."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from moelab.argtypes import positive_float

# Modules that add their own subcommands: each has add_commands(sub, bench_sub) where sub is the top-level
# subparsers and bench_sub the subparsers of `moelab bench`. A listed module that does not exist yet is skipped.
COMMAND_MODULES = ["moelab.lab.cli", "moelab.lab.analysis_cli", "moelab.lab.kernels_cli", "moelab.lab.trace_cli",
                   "moelab.server.cli"]

TINY = dict(layers=2, hidden_size=128, heads=4, kv_heads=4, experts=8, top_k=2, moe_intermediate_size=64,
            vocab_size=512)


def _add_shape_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shape overrides (default: the preset's published value)")
    g.add_argument("--layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--kv-heads", type=int)
    g.add_argument("--experts", type=int)
    g.add_argument("--top-k", type=int)
    g.add_argument("--moe-intermediate-size", type=int)
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--n-group", type=int, help="DeepSeek: expert groups")
    g.add_argument("--topk-group", type=int, help="DeepSeek: groups a token may use")


def _overrides(args: argparse.Namespace) -> dict:
    keys = ("layers", "hidden_size", "heads", "kv_heads", "experts", "top_k", "moe_intermediate_size", "vocab_size",
            "n_group", "topk_group")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_inspect(args: argparse.Namespace) -> None:
    from moelab.hf_config import apply_overrides, spec_from_hf_config
    from moelab.models.loader import read_config
    from moelab.presets import PUBLISHED, preset_config
    from moelab.summary import print_spec

    if (args.preset is None) == (args.model is None):
        raise SystemExit("moelab inspect: give exactly one of --preset NAME or --model DIR")
    cfg = preset_config(args.preset) if args.preset else read_config(Path(args.model))
    spec = spec_from_hf_config(apply_overrides(cfg, **_overrides(args)))
    print_spec(spec, args.preset or args.model, PUBLISHED.get(args.preset or "") if not _overrides(args) else None)


def cmd_make_checkpoint(args: argparse.Namespace) -> None:
    from moelab.checkpoint.synthetic import make_checkpoint

    info = make_checkpoint(args.preset, Path(args.out), seed=args.seed, dtype=args.dtype,
                           max_shard_bytes=int(args.max_shard_gb * (1 << 30)), **_overrides(args))
    print(f"wrote {info.path}: {info.num_params / 1e9:.3f}B params in {info.num_tensors} tensors, "
          f"{info.num_shards} shard(s), {info.total_bytes / 1e9:.2f} GB")


def cmd_generate(args: argparse.Namespace) -> None:
    from moelab.generate import run_generate

    run_generate(args, TINY, _overrides(args))


def cmd_presets(args: argparse.Namespace) -> None:
    from moelab.presets import PRESETS, PUBLISHED

    for p in PRESETS:
        print(f"{p:20s} {PUBLISHED[p].hf_id}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moelab", description="MoE inference engine and lab")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="parameter counts, KV bytes and FLOPs of a preset or checkpoint")
    p.add_argument("--preset")
    p.add_argument("--model", help="local checkpoint directory")
    _add_shape_overrides(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("make-checkpoint", help="write a synthetic HF checkpoint with a preset's shapes")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-shard-gb", type=positive_float, default=2.0)
    _add_shape_overrides(p)
    p.set_defaults(func=cmd_make_checkpoint)

    p = sub.add_parser("generate", help="run the engine; default: a tiny synthetic OLMoE")
    p.add_argument("--model", help="checkpoint directory or preset (default: a tiny synthetic OLMoE-1B-7B)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--moe-backend", default="auto")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "triton"])
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--seed", type=int, default=0)
    _add_shape_overrides(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=cmd_presets)

    bench = sub.add_parser("bench", help="benchmarks: kernels, throughput, latency, sweep, serve")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and (name == err.name or name.startswith(err.name + ".")):
                continue
            raise
        module.add_commands(sub, bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import sqlite3

    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except ValueError as err:  # bad input: a clear message, no traceback
        print(f"moelab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as err:  # a path that cannot be read or written, a file that is no database
        print(f"moelab {args.command}: error: {err}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
