"""W8A8 at decode: the CUDA-core GEMV path (moelab/kernels/w8a8_decode.py) against the tensor-core path, and its tiles.

    PYTHONPATH=. python scripts/tune_w8a8_decode_gpu.py --ms 1 --formats fp8_channel fp8_block

For each benchmark shape (moelab.lab.kernel_bench.SHAPES) and M on naive blocks: the whole layer (CUDA graph, three
input sets, as `moelab bench kernels`) for bf16, the fp8 tensor-core path (fused_moe.DECODE_GEMV off), the GEMV path
with its default tiles, and with each candidate tile (the same for both GEMMs); every GEMV result is checked against
the tensor-core one. Prints a line per cell; writes $OUT/w8a8_decode.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch

from moelab.kernels import fused_moe as fm
from moelab.kernels.w8a8_decode import GemvConfig, w8a8_decode_moe
from moelab.lab import kernel_bench as kb

TILES = [GemvConfig(bn, bk) for bn, bk in itertools.product((8, 16, 32), (128, 256, 512))]


def layer_ms(fn, sets) -> tuple[float, list[torch.Tensor]]:
    return kb.graph_ms(lambda i: fn(*sets[i]), kb.ROTATE, "cuda")


def rel(outs, refs) -> float:
    return max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(outs, refs))


def cell(name: str, M: int, fmts: list[str], rows: list[dict]) -> None:
    shape = kb.SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = kb.make_weights(shape, "bf16", "cuda", g)
    sets = [kb.make_inputs(M, shape, torch.bfloat16, "cuda", g) for _ in range(kb.ROTATE)]
    t_bf = layer_ms(lambda x, ids, w: fm.fused_moe(x, ids, w, bf["w13"], bf["w2"]), sets)[0]
    for fmt in fmts:
        rows.append(format_cell(name, M, fmt, kb.make_weights(shape, fmt, "cuda", g), sets, t_bf))


def format_cell(name: str, M: int, fmt: str, wts: dict, sets: list, t_bf: float) -> dict:
    s = wts["scales"]

    def layer(x, ids, w):
        return fm.fused_moe(x, ids, w, wts["w13"], wts["w2"], quant=fmt, w13_scale=s.w13_scale, w2_scale=s.w2_scale)

    def gemv(x, ids, w, tile):
        return w8a8_decode_moe(x, ids, w.reshape(-1).float(), wts["w13"], wts["w2"], fmt, s.w13_scale, s.w2_scale,
                               configs=(tile, tile))

    fm.DECODE_GEMV = False
    t_tc, ref = layer_ms(layer, sets)
    fm.DECODE_GEMV = True
    t_def, outs = layer_ms(layer, sets)
    line = dict(shape=name, M=M, fmt=fmt, bf16_ms=t_bf, tensor_core_ms=t_tc, gemv_default_ms=t_def,
                default_rel_err=rel(outs, ref), tiles=[])
    for tile in TILES:
        if fmt == "fp8_block" and tile.block_k > 128:
            continue
        try:
            t, outs = layer_ms(lambda x, ids, w, tile=tile: gemv(x, ids, w, tile), sets)
        except Exception as exc:  # a tile that does not compile
            print(f"{name} M={M} {fmt} {tuple(tile)}: {type(exc).__name__}: {exc}"[:300], flush=True)
            continue
        line["tiles"].append(dict(tile=tile._asdict(), ms=t, rel_err=rel(outs, ref)))
    ok = [t for t in line["tiles"] if t["rel_err"] < 1e-2]
    best = min(ok, key=lambda t: t["ms"]) if ok else None
    print(f"{name} M={M} {fmt}: bf16 {t_bf * 1e3:.1f} us; tensor cores {t_tc * 1e3:.1f} us ({t_bf / t_tc:.2f}x); "
          f"gemv default {t_def * 1e3:.1f} us ({t_bf / t_def:.2f}x, err {line['default_rel_err']:.1e}); best "
          + (f"{best['ms'] * 1e3:.1f} us ({t_bf / best['ms']:.2f}x) {tuple(best['tile'].values())}" if best
             else "none"), flush=True)
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1")
    ap.add_argument("--formats", nargs="+", default=["fp8_channel", "fp8_block"])
    ap.add_argument("--shapes", nargs="+", default=list(kb.SHAPES))
    args = ap.parse_args()
    rows: list[dict] = []
    for name in args.shapes:
        for M in map(int, args.ms.split(",")):
            cell(name, M, args.formats, rows)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "w8a8_decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
