"""Programmatic dependent launch changes no output: greedy generations of a batch (mixed prompt lengths, so the
steps mix prefill chunks and decodes, then CUDA-graph decode steps) with PDL on and off must be equal token for
token. Prints one JSON line.

    PYTHONPATH=. python scripts/check_pdl_gpu.py [--model olmoe-1b-7b]
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from moelab.engine.sampling_params import SamplingParams
from moelab.kernels.pdl import set_enabled, use_pdl
from moelab.llm import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="olmoe-1b-7b")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 5000, (n,), generator=g).tolist() for n in (5, 77, 300, 1200, 9, 64, 2048, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    tokens = {}
    for on in (True, False):
        set_enabled(on)
        llm = LLM(args.model, max_model_len=4096, max_num_seqs=64, max_num_batched_tokens=2048,
                  gpu_memory_utilization=0.5)
        tokens[on] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        tokens[f"{on}_used"] = use_pdl(torch.device("cuda"))
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    same = [a == b for a, b in zip(tokens[True], tokens[False])]
    print(json.dumps({"kind": "pdl_check", "model": args.model, "pdl_used": tokens["True_used"],
                      "sequences": len(same), "identical": sum(same), "ok": all(same)}))


if __name__ == "__main__":
    main()
