"""Tune the fused MoE tiles of the engine's decode shapes on this GPU and merge them into its own table.

For each shape, `moelab.lab.kernel_bench.tune` times the candidate tiles at the given token counts; the result
overrides those entries of the table the GPU uses now (its family's, e.g. the H100's on an H200) and is written
as this GPU's own file in moelab/kernels/configs/ (and copied to $OUT), so the engine run that follows uses it.

    PYTHONPATH=. python scripts/tune_engine_shapes_gpu.py olmoe:64,256 qwen1.5:256
    PYTHONPATH=. python scripts/tune_engine_shapes_gpu.py --dtype fp8_channel olmoe:1,256,4096 qwen3:4096

--group-m-only: keep each entry's tiles and time only its row-block groupings (moelab.lab.kernel_bench's
GROUP_M_CANDIDATES, where an expert gets enough rows for them to matter).
--dtype: bf16 (default) or a quantized format of moelab.kernels.fused_moe.QUANT_FORMATS, whose table is named by
the format (dtype=fp8_channel). --deadline S: skip the shapes that would start after S seconds (the device's
per-call limit), so the tables already tuned are written and copied.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from moelab.kernels.fused_moe_config import (
    CONFIG_DIR,
    SHARED_TABLES,
    config_file_name,
    get_config,
    heuristic_config,
    save_config_file,
    tuned_configs,
)
from moelab.lab.kernel_bench import DTYPES, SHAPES, table_dtype, tune

EXTRA = {"qwen1.5": (60, 4, 2048, 1408)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cells", nargs="+", help="shape:M1,M2,... (shapes: " + ", ".join({**SHAPES, **EXTRA}) + ")")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--deadline", type=float, default=float("inf"))
    ap.add_argument("--group-m-only", action="store_true",
                    help="keep the tiles of the table in use and tune only each GEMM's row-block grouping")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1),
                    help="processes that compile the candidates before the timings")
    args = ap.parse_args()
    start = time.perf_counter()
    name = torch.cuda.get_device_name()
    dt = table_dtype(args.dtype)  # the name config_for looks a table up by
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    for arg in args.cells:
        if time.perf_counter() - start > args.deadline:
            print(f"deadline: {arg} not tuned", flush=True)
            continue
        key, ms = arg.split(":")
        E, K, D, I = shape = {**SHAPES, **EXTRA}[key]
        # the table in use: this format's own, else the one it shares (fp8_tensor <-> fp8_channel), as get_config
        table = dict(tuned_configs(E, I, D, name, dt) or tuned_configs(E, I, D, name, SHARED_TABLES.get(dt, dt)) or {})
        if not table:  # nothing tuned for this family: start from the heuristic at the usual token counts
            table = {m: heuristic_config(m, E, K, I, D, dt) for m in (1, 16, 64, 256, 1024, 4096, 16384)}
        before = {m: get_config(m, E, K, I, D, dt, "cuda", name) for m in map(int, ms.split(","))}
        best = tune(shape, tuple(before), args.dtype, "cuda", baseline=before, workers=args.workers,
                    tiles=not args.group_m_only)
        for m, c in best.items():
            print(f"{key} M={m}: {'kept' if c == before[m] else 'changed'} {c.to_dict()}", flush=True)
        table.update(best)
        path = CONFIG_DIR / config_file_name(E, I, D, name, dt)
        save_config_file(path, table, note=f"scripts/tune_engine_shapes_gpu.py on {name}: M={ms} tuned here, the "
                                           f"rest from the table in use before (the family's, else the heuristic's)")
        tuned_configs.cache_clear()
        shutil.copy(path, out / path.name.replace("=", "-").replace(",", "_"))  # the device tool refuses = and ,
        print(f"wrote {path.relative_to(CONFIG_DIR.parent.parent.parent)} at {time.perf_counter() - start:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
