"""`moelab generate`: load a checkpoint (or make the tiny default) and generate greedily, printing tok/s."""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch

from moelab.checkpoint.synthetic import DTYPES, make_checkpoint, synthetic_config
from moelab.engine.reference_generate import generate_greedy
from moelab.models.loader import load_model, read_config

DEFAULT_PROMPTS = ["A mixture-of-experts layer", "The router scores all experts"]


def tiny_checkpoint(overrides: dict, seed: int = 0) -> Path:
    key = hashlib.sha256(json.dumps(synthetic_config("olmoe-1b-7b", "float32", **overrides), sort_keys=True)
                         .encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"moelab-tiny-olmoe-{key}-seed{seed}"
    if not (path / "config.json").is_file():
        make_checkpoint("olmoe-1b-7b", path, seed=seed, dtype="float32", **overrides)
    return path


def run_generate(args: argparse.Namespace, tiny: dict) -> None:
    from tokenizers import Tokenizer

    torch.manual_seed(args.seed)
    path = Path(args.model) if args.model else tiny_checkpoint(tiny, args.seed)
    t0 = time.perf_counter()
    model = load_model(path, dtype=DTYPES[args.dtype], device=args.device, moe_backend=args.moe_backend)
    load_s = time.perf_counter() - t0
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    prompts = args.prompt or DEFAULT_PROMPTS
    ids = [tok.encode(p).ids for p in prompts]
    start = time.perf_counter()
    gens = generate_greedy(model, ids, args.max_tokens, eos_token_id=None)
    end = time.perf_counter()
    cfg = read_config(path)
    print(f"model {path} ({cfg['architectures'][0]}), {args.dtype} on {args.device}, loaded in {load_s:.2f} s")
    for prompt, g in zip(prompts, gens):
        print(f"  {prompt!r} -> {tok.decode(g.token_ids)!r}")
        print(f"    token ids: {g.token_ids}")
    n_out = sum(len(g.token_ids) for g in gens)
    ttft = min(g.token_times[0] for g in gens) - start
    decode_s = end - min(g.token_times[0] for g in gens)
    decode_tokens = n_out - len(gens)
    print(f"batch {len(gens)}: {n_out} tokens in {end - start:.3f} s = {n_out / (end - start):.1f} tok/s; "
          f"prefill {ttft * 1e3:.1f} ms, decode {decode_tokens / max(decode_s, 1e-9):.1f} tok/s")
