"""Subcommands: `moelab serve MODEL`, and the entry points of `moelab bench serve` and `moelab launch`.

The last two live in the lab (moelab/lab/serving.py, moelab/lab/launch.py), which own their flags: here they are
registered as pass-through commands whose arguments go, unparsed, to the lab module's main(argv), imported only
when the command runs (by name, so the server package keeps no import edge into the lab).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os

DEFAULT_MAX_BODY_BYTES = 8 << 20  # = moelab.server.app.DEFAULT_MAX_BODY_BYTES (not imported: keeps `moelab` fast)

ENGINE_FLAGS = ("dtype", "device", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size",
                "gpu_memory_utilization", "num_kv_blocks", "moe_backend", "attention", "enforce_eager", "seed")


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)")
    p.add_argument("model", help="checkpoint directory or preset name")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", action="append", metavar="KEY",
                   help="require Authorization: Bearer KEY on every route but /health; repeat it to accept "
                        "several keys; default: the MOELAB_API_KEY environment variable, if set")
    s.add_argument("--served-model-name", nargs="+", help="names clients use (default: MODEL); the first is reported")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds to let in-flight requests finish before aborting them")
    s.add_argument("--watchdog-timeout", type=float, default=300.0,
                   help="seconds one engine step may run before the engine is declared hung: requests end with an "
                        "error, /health turns 503 and the server exits 1 (0: no watchdog)")
    s.add_argument("--max-inflight-requests", type=int, default=0,
                   help="admission cap: past this many accepted, unfinished engine requests (each prompt x n "
                        "counts) new ones get 503 with Retry-After (0: no cap)")
    s.add_argument("--metrics-prefix", default="moelab:",
                   help="prefix of every /metrics name; 'vllm:' gives vLLM's names, so its dashboards work")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--disable-uvicorn-access-log", action="store_true")
    e = p.add_argument_group("engine (see EngineConfig)")
    e.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    e.add_argument("--device", default="auto")
    e.add_argument("--max-model-len", type=int)
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--max-num-batched-tokens", type=int, default=8192)
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    e.add_argument("--num-kv-blocks", type=int)
    e.add_argument("--moe-backend", default="auto")
    e.add_argument("--attention", default="auto", choices=["auto", "sdpa", "triton"])
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--overrides", type=json.loads, default={},
                   help='preset shape overrides as JSON, e.g. \'{"layers": 2, "hidden_size": 128}\'')
    p.set_defaults(func=cmd_serve)

    b = bench_sub.add_parser("serve", help="serving benchmark of any OpenAI-compatible endpoint (-h for flags)",
                             add_help=False, prefix_chars="\0")
    b.add_argument("argv", nargs=argparse.REMAINDER)
    b.set_defaults(func=lambda args: _lab_main("moelab.lab.serving", args.argv))

    b = bench_sub.add_parser("soak", help="soak test of any OpenAI-compatible endpoint: memory slope, idle at the "
                             "end (-h for flags)", add_help=False, prefix_chars="\0")
    b.add_argument("argv", nargs=argparse.REMAINDER)
    b.set_defaults(func=lambda args: _lab_main("moelab.lab.soak", args.argv))

    p = sub.add_parser("launch", help="start vLLM or SGLang with a placement strategy, check it, stop it (-h)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _lab_main("moelab.lab.launch", args.argv))


def _lab_main(module: str, argv: list[str]) -> None:
    code = importlib.import_module(module).main(argv)
    if code:
        raise SystemExit(code)


def cmd_serve(args: argparse.Namespace) -> None:
    from moelab.engine.config import EngineConfig
    from moelab.engine.llm_engine import LLMEngine
    from moelab.server.app import create_app
    from moelab.server.chat_template import load_chat_template
    from moelab.server.metrics import check_prefix
    from moelab.server.serve import make_server

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.watchdog_timeout < 0 or args.max_inflight_requests < 0:  # before the model loads
        raise ValueError(f"--watchdog-timeout and --max-inflight-requests must be >= 0 (0: off), got "
                         f"{args.watchdog_timeout} and {args.max_inflight_requests}")
    check_prefix(args.metrics_prefix)
    if not args.api_key and os.environ.get("MOELAB_API_KEY", "").strip():  # keeps the key out of the process list
        args.api_key = [os.environ["MOELAB_API_KEY"].strip()]
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.getLogger("moelab.serve").warning(
            "listening on %s without --api-key: anyone who can reach this port can use the model", args.host)
    if not isinstance(args.overrides, dict):
        raise ValueError(f"--overrides must be a JSON object, got {args.overrides!r}")
    config = EngineConfig(model=args.model, overrides=args.overrides, **{k: getattr(args, k) for k in ENGINE_FLAGS})
    engine = LLMEngine(config)
    template, specials = load_chat_template(args.model)
    app = create_app(engine, args.served_model_name, args.api_key, args.max_body_bytes, template, specials,
                     watchdog_timeout=args.watchdog_timeout or None,
                     max_inflight_choices=args.max_inflight_requests or None, metrics_prefix=args.metrics_prefix)
    server = make_server(app, args.host, args.port, args.shutdown_timeout, args.log_level,
                         not args.disable_uvicorn_access_log)
    r = engine.resolved
    print(f"moelab serve: {args.model} as {', '.join(app.state.server.model.served_names)} on "
          f"http://{args.host}:{args.port} ({r.device}, {r.dtype}, moe={r.moe_backend}, attention={r.attention}, "
          f"max_model_len={engine.max_model_len}, kv_blocks={engine.num_blocks}, load {engine.load_seconds:.1f} s)",
          flush=True)
    server.run()
    if server.exit_code:
        from moelab.server.engine_loop import EngineStalledError

        if isinstance(app.state.server.engine_loop.dead, EngineStalledError):
            # the engine thread may still be stuck in a device call, which an orderly interpreter exit (CUDA
            # teardown) could wait on forever: leave at once
            logging.shutdown()
            os._exit(server.exit_code)
        raise SystemExit(server.exit_code)
