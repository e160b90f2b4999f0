"""`moelab generate`: run the engine on a checkpoint or a preset (default: a tiny synthetic OLMoE on the CPU)
and print each output with its timings."""

from __future__ import annotations

import argparse
import statistics
import time

DEFAULT_PROMPTS = ["A mixture-of-experts layer", "The router scores all experts"]
DEFAULT_MODEL = "olmoe-1b-7b"


def run_generate(args: argparse.Namespace, tiny: dict, overrides: dict) -> None:
    from moelab.engine.sampling_params import SamplingParams
    from moelab.llm import LLM

    model = args.model or DEFAULT_MODEL
    if args.model is None:
        overrides = {**tiny, **overrides}
    t0 = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, device=args.device, moe_backend=args.moe_backend, attention=args.attention,
              max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, seed=args.seed,
              overrides=overrides)
    load_s = time.perf_counter() - t0
    r = llm.engine.resolved
    print(f"model {model}{' (tiny synthetic default)' if args.model is None else ''}: {r.dtype} on {r.device}, "
          f"moe {r.moe_backend}, attention {r.attention}, cuda graphs {'on' if r.cuda_graphs else 'off'}; "
          f"ready in {load_s:.2f} s, KV pool {llm.engine.num_blocks} blocks of {llm.config.block_size}")
    prompts = args.prompt or DEFAULT_PROMPTS
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            ignore_eos=args.ignore_eos, seed=args.seed if args.temperature > 0 else None)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    for o in outs:
        c = o.outputs[0]
        itl = o.metrics.itl
        print(f"  {o.prompt!r} -> {c.text!r}  [{c.finish_reason}]")
        print(f"    token ids: {c.token_ids}")
        print(f"    TTFT {o.metrics.ttft * 1e3:.1f} ms, ITL mean "
              f"{(statistics.fmean(itl) * 1e3 if itl else float('nan')):.2f} ms over {len(c.token_ids)} tokens")
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"batch {len(outs)}: {n_out} output tokens in {wall:.3f} s = {n_out / wall:.1f} output tok/s")
