"""Tune the fused MoE tiles of the engine's decode shapes on this GPU and merge them into its own table.

For each shape, `moelab.lab.kernel_bench.tune` times the candidate tiles at the given token counts; the result
overrides those entries of the table the GPU uses now (its family's, e.g. the H100's on an H200) and is written
as this GPU's own file in moelab/kernels/configs/ (and copied to $OUT), so the engine run that follows uses it.

    PYTHONPATH=. python scripts/tune_engine_shapes_gpu.py olmoe:64,256 qwen1.5:256
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from moelab.kernels.fused_moe_config import (
    CONFIG_DIR,
    config_file_name,
    get_config,
    heuristic_config,
    save_config_file,
    tuned_configs,
)
from moelab.lab.kernel_bench import SHAPES, tune

EXTRA = {"qwen1.5": (60, 4, 2048, 1408)}


def main() -> None:
    name = torch.cuda.get_device_name()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    for arg in sys.argv[1:]:
        key, ms = arg.split(":")
        E, K, D, I = shape = {**SHAPES, **EXTRA}[key]
        table = dict(tuned_configs(E, I, D, name, "bfloat16") or {})
        if not table:  # nothing tuned for this family: start from the heuristic at the usual token counts
            table = {m: heuristic_config(m, E, K, I, D, "bfloat16") for m in (1, 16, 64, 256, 1024, 4096, 16384)}
        before = {m: get_config(m, E, K, I, D, "bfloat16", "cuda", name) for m in map(int, ms.split(","))}
        best = tune(shape, tuple(before), "bf16", "cuda", baseline=before)
        for m, c in best.items():
            print(f"{key} M={m}: {'kept' if c == before[m] else 'changed'} {c.to_dict()}", flush=True)
        table.update(best)
        path = CONFIG_DIR / config_file_name(E, I, D, name, "bfloat16")
        save_config_file(path, table, note=f"scripts/tune_engine_shapes_gpu.py on {name}: M={ms} tuned here, the "
                                           f"rest from the table in use before (the family's, else the heuristic's)")
        tuned_configs.cache_clear()
        shutil.copy(path, out / path.name.replace("=", "-").replace(",", "_"))  # the device tool refuses = and ,
        print(f"wrote {path.relative_to(CONFIG_DIR.parent.parent.parent)}", flush=True)


if __name__ == "__main__":
    main()
