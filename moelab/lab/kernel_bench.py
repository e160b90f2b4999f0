"""The MoE kernel benchmark: every backend x weight format against the naive oracle on fresh random inputs, then
the whole layer timed as CUDA-graph replays against the floor; and the tile-config tuner. Used by
`moelab bench kernels`, `moelab tune-kernels` and scripts/bench_moe_gpu.py.

Floor (../shared/guide/MEASURING.md) = max(touched-expert weight bytes / copy bandwidth, FLOPs / matmul rate),
FLOPs = 2 M K 3 D I, touched experts = E (1 - (1 - K/E)^M) (uniform routing); 1 byte per weight for the 8-bit
formats. The matmul rate is the one measured for the arithmetic the kernel does: fp8 e4m3 for the fp8 formats,
fp32 for fp32, bf16 for the rest (int8_channel computes in bf16); a cell whose rate was not measured gets no floor.
On the CPU (Triton interpreter) only the checks mean anything; times are labelled device=cpu and have no floor.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from moelab.device import default_device

SHAPES = {"olmoe": (64, 8, 2048, 1024), "mixtral": (8, 2, 4096, 14336), "qwen3": (128, 8, 2048, 768),
          "dsv2-lite": (64, 6, 2048, 1408)}  # (E, K, D, I)
TINY_SHAPES = {"tiny": (8, 2, 64, 48), "tiny-e60": (60, 6, 32, 16)}
MS = (1, 16, 64, 256, 1024, 4096, 16384)
# published reference, bf16, H100, one CUDA graph (MEASURING.md), ms at MS
REFERENCE_MS = {"olmoe": (0.047, 0.310, 0.372, 0.401, 0.546, 1.212, 4.121),
                "mixtral": (0.245, 1.001, 1.008, 1.120, 1.828, 5.499, 20.41),
                "qwen3": (0.038, 0.348, 0.502, 0.535, 0.652, 1.012, 3.099),
                "dsv2-lite": (0.049, 0.362, 0.467, 0.504, 0.620, 1.512, 3.875)}
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANT_FORMATS = ("fp8_tensor", "fp8_channel", "fp8_block", "int8_channel")
DTYPES = tuple(FLOAT_DTYPES) + QUANT_FORMATS
ROTATE = 3  # input sets per timed graph
REL_ERR_MAX = 2e-2


@dataclass(frozen=True)
class KernelBenchConfig:
    """shapes: name -> (E, K, D, I); dtypes: keys of FLOAT_DTYPES or quantized formats (activations bf16, or
    fp32 on the CPU, where the interpreter's bf16 dots are wrong)."""

    shapes: dict[str, tuple[int, int, int, int]]
    ms: tuple[int, ...] = MS
    dtypes: tuple[str, ...] = ("bf16",)
    backends: tuple[str, ...] = ("naive", "grouped", "triton")
    routings: tuple[str, ...] = ("uniform", "skewed")
    time_layer: bool = True
    naive_max_m: int = 64  # the oracle loops over experts with host syncs: checked up to this M only
    seed: int = 0
    device: str = field(default_factory=default_device)

    def __post_init__(self) -> None:
        bad = [d for d in self.dtypes if d not in DTYPES]
        assert not bad, f"unknown dtype(s) {bad}; available: {', '.join(DTYPES)}"
        bad = [r for r in self.routings if r not in ("uniform", "skewed")]
        assert not bad, f"unknown routing(s) {bad}; available: uniform, skewed"


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """"E,K,D,I" -> (E, K, D, I); ValueError names the bad text."""
    try:
        E, K, D, I = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--shape wants E,K,D,I (four integers), got {text!r}") from None
    if min(E, K, D, I) < 1 or K > E:
        raise ValueError(f"--shape {text!r}: all sizes must be >= 1 and top-k K <= E")
    return E, K, D, I


# ---------------------------------------------------------------- inputs


def table_dtype(dtype: str) -> str:
    """The dtype name the tuned tables and fused_moe.config_for use: torch's name of a float dtype ("bf16" ->
    "bfloat16"), a quantized format's own name."""
    return str(FLOAT_DTYPES[dtype]).removeprefix("torch.") if dtype in FLOAT_DTYPES else dtype


def act_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype] if not (device == "cpu" and dtype == "bf16") else torch.float32
    return torch.bfloat16 if device != "cpu" else torch.float32


def make_weights(shape: tuple, dtype: str, device: str, g: torch.Generator) -> dict:
    """{"w13", "w2" (the backend's weights), "scales" (QuantScales | None), "w13_ref", "w2_ref" (the bf16-rounded
    float32 weights they came from: the unquantized oracle)}; N(0, 1/D) and N(0, 1/I)."""
    from moelab.layers.moe.quant import quantize_experts

    E, K, D, I = shape
    w13 = (torch.randn(E, 2 * I, D, device=device, generator=g) / D ** 0.5).bfloat16().float()
    w2 = (torch.randn(E, D, I, device=device, generator=g) / I ** 0.5).bfloat16().float()
    out = dict(w13_ref=w13, w2_ref=w2, scales=None)
    if dtype in FLOAT_DTYPES:
        ad = act_dtype(dtype, device)
        return dict(out, w13=w13.to(ad), w2=w2.to(ad))
    q13, q2, scales = quantize_experts(w13, w2, dtype)
    return dict(out, w13=q13, w2=q2, scales=scales)


def make_inputs(M: int, shape: tuple, dtype: torch.dtype, device: str, g: torch.Generator, skew: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, D], topk_ids [M, K] int64, topk_weights [M, K] fp32: uniform routing, or Zipf-skewed (expert
    popularity ~ 1/(e+1)^1.2, K distinct experts per token by Gumbel top-k)."""
    E, K, D, _ = shape
    x = torch.randn(M, D, device=device, generator=g).to(dtype)
    u = torch.rand(M, E, device=device, generator=g).clamp_min(1e-9)
    logits = -torch.log(-torch.log(u))
    if skew:
        logits = logits - 1.2 * torch.log(torch.arange(1, E + 1, device=device, dtype=torch.float32))
    vals, ids = logits.topk(K, dim=-1)
    return x, ids, vals.softmax(-1).float()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ---------------------------------------------------------------- timing


def graph_ms(fn: Callable[[int], torch.Tensor], n_sets: int, device: str, budget_ms: float = 150.0
             ) -> tuple[float, list[torch.Tensor]]:
    """fn(i) on input set i < n_sets captured as one CUDA graph: median replay ms / n_sets, and the outputs.
    On the CPU: one eager pass (wall clock), for labelling only."""
    outs = [fn(i) for i in range(n_sets)]  # compile and warm up
    if device == "cpu":
        t = time.perf_counter()
        outs = [fn(i) for i in range(n_sets)]
        return (time.perf_counter() - t) * 1e3 / n_sets, outs
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(i) for i in range(n_sets)]
    graph.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    graph.replay()
    e.record()
    e.synchronize()
    reps = int(min(100, max(7, budget_ms / max(s.elapsed_time(e), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / n_sets, outs


def measure_ceilings(device: str) -> dict:
    """Copy bandwidth (bytes read + written) and the bf16, fp32 and fp8 matmul rates, measured now by the lab's
    calibration (the engine benchmark's ceilings too; a rate it could not measure is None). On the CPU no floor is
    reported, and nothing is measured."""
    if device == "cpu":
        return {"copy_bytes_per_s": None, "matmul_flop_per_s": None, "measured": False}
    from moelab.lab.calibrate import measure

    v = measure(device)["values"]
    return {"copy_bytes_per_s": v["copy_bandwidth"], "matmul_flop_per_s": v["matmul_bf16"],
            "matmul_fp32_flop_per_s": v.get("matmul_fp32"), "matmul_fp8_flop_per_s": v.get("matmul_fp8"),
            "measured": True}


def matmul_rate(dtype: str, ceilings: dict) -> float | None:
    """The measured matmul rate of the arithmetic a `dtype` layer does, or None."""
    key = ("matmul_fp8_flop_per_s" if dtype.startswith("fp8") else "matmul_fp32_flop_per_s" if dtype == "fp32"
           else "matmul_flop_per_s")
    return ceilings.get(key)


def floor_ms(shape: tuple, M: int, dtype: str, ceilings: dict) -> tuple[float | None, float, float]:
    """(floor ms, touched-expert weight bytes, FLOPs) of one layer call; see the module docstring. The floor is
    None when the copy bandwidth or the dtype's matmul rate was not measured."""
    E, K, D, I = shape
    touched = E * (1 - (1 - K / E) ** M)
    wbytes = 1 if dtype in QUANT_FORMATS else FLOAT_DTYPES[dtype].itemsize
    nbytes, flops = touched * 3 * D * I * wbytes, 2 * M * K * 3 * D * I
    rate, copy = matmul_rate(dtype, ceilings), ceilings.get("copy_bytes_per_s")
    if not rate or not copy:
        return None, nbytes, flops
    return max(nbytes / copy, flops / rate) * 1e3, nbytes, flops


# ---------------------------------------------------------------- checks and timings


def _call(backend: str, x, ids, w, wts: dict) -> torch.Tensor:
    from moelab.layers.moe.backends import get_backend

    return get_backend(backend)(x, ids, w, wts["w13"], wts["w2"], wts["scales"])


def check_cell(cfg: KernelBenchConfig, name: str, shape: tuple, M: int, dtype: str, wts: dict,
               g: torch.Generator) -> list[dict]:
    """One row per (routing, backend): rel err vs the naive oracle of the same weights (quantized formats:
    dequantized weights, fp8 activation rounding), and vs the unquantized float32 oracle (rel_err_vs_float)."""
    from moelab.layers.moe.backends import naive_moe

    rows, ad = [], act_dtype(dtype, cfg.device)
    for routing in cfg.routings:
        x, ids, w = make_inputs(M, shape, ad, cfg.device, g, routing == "skewed")
        exact = naive_moe(x.float(), ids, w, wts["w13_ref"], wts["w2_ref"])
        ref = exact if wts["scales"] is None else naive_moe(x, ids, w, wts["w13"], wts["w2"], wts["scales"]).float()
        point = dict(shape=name, M=M, dtype=dtype, routing=routing)
        if wts["scales"] is not None:
            rows.append(dict(point, metric="rel_err_vs_float", value=rel_err(ref, exact), unit="", backend="naive"))
        for backend in cfg.backends:
            if backend == "naive" and M > cfg.naive_max_m:
                continue
            try:
                out = _call(backend, x, ids, w, wts)
            except NotImplementedError as exc:  # e.g. grouped has no quantized path
                rows.append(dict(point, metric="check", value=None, unit="", backend=backend, ok=None,
                                 note=f"unsupported: {exc}"))
                continue
            except Exception as exc:  # record and go on: the run reports every cell
                out, note = torch.full_like(x, float("nan")), f"{type(exc).__name__}: {str(exc)[:200]}"
            else:
                note = ""
            err = rel_err(out, ref)
            ok = bool(torch.isfinite(out).all()) and err < REL_ERR_MAX and out.dtype == x.dtype
            rows.append(dict(point, metric="rel_err", value=err, unit="", backend=backend, ok=ok, note=note,
                             rel_err_vs_float=rel_err(out, exact)))
    return rows


def time_cell(cfg: KernelBenchConfig, name: str, shape: tuple, M: int, dtype: str, backend: str, wts: dict,
              ceilings: dict, g: torch.Generator) -> list[dict]:
    """Whole layer of one backend, ROTATE input sets in one CUDA graph: ms, TFLOP/s, GB/s with the floor."""
    inputs = [make_inputs(M, shape, act_dtype(dtype, cfg.device), cfg.device, g) for _ in range(ROTATE)]
    ms, _ = graph_ms(lambda i: _call(backend, *inputs[i], wts), ROTATE, cfg.device)
    fl, nbytes, flops = floor_ms(shape, M, dtype, ceilings)
    on_gpu = cfg.device != "cpu"
    ref = REFERENCE_MS.get(name)
    point = dict(shape=name, E=shape[0], K=shape[1], D=shape[2], I=shape[3], M=M, dtype=dtype, backend=backend,
                 device=cfg.device, routing="uniform")
    has_floor = on_gpu and fl is not None
    rows = [dict(point, metric="layer_ms", value=ms, unit="ms", floor=fl if has_floor else None,
                 pct_of_floor=100 * fl / ms if has_floor else None),
            dict(point, metric="tflops", value=flops / ms * 1e-9, unit="TFLOP/s"),
            dict(point, metric="weight_gbps", value=nbytes / ms * 1e-6, unit="GB/s")]
    if ref and M in MS and dtype == "bf16" and on_gpu:
        rows.append(dict(point, metric="speedup_vs_reference", value=ref[MS.index(M)] / ms, unit="x"))
    return rows


def run(cfg: KernelBenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Checks (every backend, routing, dtype, M), then layer timings (cfg.time_layer; backends other than
    naive). Returns tidy rows (metric, value, unit, floor, pct_of_floor + point keys)."""
    from moelab.layers.moe.backends import BACKENDS

    missing = [b for b in cfg.backends if b not in BACKENDS]
    if missing:
        raise ValueError(f"unknown or unavailable backend(s) {missing}; available: {', '.join(BACKENDS)}")
    ceilings = measure_ceilings(cfg.device)
    rows: list[dict] = []
    for name, shape in cfg.shapes.items():
        for dtype in cfg.dtypes:
            g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
            wts = make_weights(shape, dtype, cfg.device, g)
            for M in cfg.ms:
                cell = check_cell(cfg, name, shape, M, dtype, wts, g)
                rows += cell
                bad = [r for r in cell if r.get("ok") is False]
                log(f"check {name} {dtype} M={M}: {len(cell) - len(bad)}/{len(cell)} ok" + "".join(
                    f"; FAILED {r['backend']} {r['routing']} rel err {r['value']:.2e} {r['note']}" for r in bad))
                for backend in cfg.backends if cfg.time_layer else ():
                    if backend == "naive" or any(r.get("backend") == backend and r["metric"] == "check"
                                                 for r in cell):
                        continue
                    rows += time_cell(cfg, name, shape, M, dtype, backend, wts, ceilings, g)
    return rows


def format_table(rows: list[dict]) -> str:
    """The timing rows as a text table (one line per shape, M, dtype, backend), checks summarised last."""
    timed = {}
    for r in rows:
        if r["metric"] in ("layer_ms", "tflops", "weight_gbps", "speedup_vs_reference"):
            timed.setdefault((r["shape"], r["M"], r["dtype"], r["backend"], r["device"]), {})[r["metric"]] = r
    lines = ["shape       M      dtype         backend  ms         TFLOP/s  GB/s    %floor  vs ref"]
    for (shape, M, dtype, backend, _), m in timed.items():
        ms = m["layer_ms"]
        pct = f"{ms['pct_of_floor']:.0f}" if ms.get("pct_of_floor") else "-"
        sp = f"{m['speedup_vs_reference']['value']:.2f}x" if "speedup_vs_reference" in m else "-"
        lines.append(f"{shape:11s} {M:<6d} {dtype:13s} {backend:8s} {ms['value']:<10.4f} {m['tflops']['value']:<8.1f} "
                     f"{m['weight_gbps']['value']:<7.0f} {pct:7s} {sp}")
    if any(k[4] == "cpu" for k in timed):
        lines.append("(device cpu: Triton interpreter wall-clock times, not GPU times; no floor)")
    checks = [r for r in rows if r["metric"] == "rel_err"]
    worst = max((r["value"] for r in checks), default=0.0)
    lines.append(f"checks: {sum(bool(r['ok']) for r in checks)}/{len(checks)} passed; worst rel err {worst:.2e}")
    return "\n".join(lines)


# ---------------------------------------------------------------- tuning


def gemm_candidates(device: str, dtype: str = "bf16", per_expert: float | None = None
                    ) -> list[tuple[int, int, int, int, bool]]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, tma) tried per GEMM; two tiny ones under the interpreter.

    8-bit weights move half the bytes per tile of bf16 ones, so their lists reach twice the BLOCK_K, and they
    depend on the regime (per_expert = M * top-k / E rows per expert): weight streaming (<= 16), the middle
    (<= 192) and compute-bound tiles. fp8_block keeps BLOCK_K <= 128 (a K-tile inside one scale block)."""
    if device == "cpu":
        return [(16, 32, 4, 3, False), (32, 16, 4, 3, True)]
    if not dtype.startswith("fp8"):
        return [(bn, bk, w, s, tma) for tma in (False, True) for bn, bk, w, s in (
            (32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (32, 256, 4, 3), (64, 256, 4, 3), (128, 64, 4, 4),
            (128, 128, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (256, 64, 8, 3))]
    pe = 0.0 if per_expert is None else per_expert
    if pe <= 16:
        tiles = [(32, 256, 4, 4), (64, 256, 4, 3), (32, 512, 4, 3), (64, 512, 4, 3), (128, 256, 4, 3),
                 (64, 128, 4, 4), (32, 128, 4, 4),
                 # BLOCK_N >= 64 at row blocks < 64 run transposed on fp8 wgmma (fused_moe.swap_ab): deeper pipelines
                 (64, 256, 4, 5), (64, 128, 4, 6), (128, 128, 4, 4), (128, 256, 8, 3)]
    elif pe <= 192:
        tiles = [(64, 128, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (128, 256, 4, 3), (128, 256, 8, 3),
                 (256, 128, 8, 3), (64, 256, 4, 3)]
    else:
        tiles = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 4), (256, 64, 8, 3), (256, 128, 8, 3),
                 (64, 128, 4, 4), (128, 128, 4, 3), (64, 128, 8, 4)]
    if dtype == "fp8_block":
        tiles = [t for t in tiles if t[1] <= 128]
    return [(bn, bk, w, s, tma) for tma in (False, True) for bn, bk, w, s in tiles]


# After the tiles, tune() tries these row-block groupings (fused_moe._tile) on each GEMM of the best config, where
# an expert has at least GROUP_M_MIN_ROWS rows: consecutive programs then share weight tiles in L2 instead of
# streaming them again for every row block (large experts at large M, e.g. Mixtral's 117 MB fp8 gate_up per expert).
GROUP_M_CANDIDATES = (1, 4, 8, 16, 32)
GROUP_M_MIN_ROWS = 512


def block_m_candidates(M: int, K: int, E: int) -> list[int]:
    per_expert = M * K / E
    return [16] if per_expert <= 8 else [16, 32] if per_expert <= 24 else [32, 64] if per_expert <= 96 else \
        [64, 128] if per_expert <= 768 else [128, 256]


def _layer_ms(c, inputs: list, wts: dict, quant: dict, device: str) -> float:
    """Whole-layer graph ms of fused_moe with config c; inf when the config does not compile or run."""
    from moelab.kernels import fused_moe as fm

    try:
        return graph_ms(lambda i: fm.fused_moe(*inputs[i], wts["w13"], wts["w2"], config=c, **quant), ROTATE,
                        device, budget_ms=60.0)[0]
    except Exception:  # out of shared memory / registers: not a candidate
        return math.inf


def _gemv_ms(inputs: list, wts: dict, quant: dict, device: str) -> float | None:
    """Whole-layer graph ms of fused_moe's one-token GEMV path, None where it does not apply (M > 1, CPU, fp8), inf
    where it fails."""
    from moelab.kernels import fused_moe as fm
    from moelab.kernels.moe_gemv import applies

    x = inputs[0][0]
    if not applies(x, wts["w13"], quant.get("quant"), wts["w2"], (quant.get("w13_scale"), quant.get("w2_scale"))):
        return None
    try:
        return graph_ms(lambda i: fm.fused_moe_gemv(*inputs[i], wts["w13"], wts["w2"], **quant), ROTATE, device,
                        budget_ms=60.0)[0]
    except Exception:  # a GEMV that does not compile or run here: the tiles win
        return math.inf


def _first_stage(shape: tuple, M: int, dtype: str, device: str, baseline: dict | None) -> list:
    """Every MoEConfig tune() times before its down pass: the heuristic, the baseline, and per BLOCK_M each
    gate_up candidate (down at the heuristic's); with each down candidate (gate_up at the heuristic's) they are
    all the kernel binaries tune() compiles."""
    from moelab.kernels.fused_moe import quant_config
    from moelab.kernels.fused_moe_config import GemmConfig, heuristic_config

    E, K, D, I = shape
    fmt = dtype if dtype not in FLOAT_DTYPES else None
    heur = heuristic_config(M, E, K, I, D, dtype, "cpu" if device == "cpu" else "cuda")
    out = [heur] + ([baseline[M]] if baseline and M in baseline else [])
    cands = [GemmConfig(bn, bk, 1, w, s, tma) for bn, bk, w, s, tma in gemm_candidates(device, dtype, M * K / E)]
    for bm in block_m_candidates(M, K, E):
        c = replace(heur, block_m=bm)
        out += [replace(c, gate_up=g) for g in cands] + [replace(c, down=d) for d in cands]
    return [quant_config(c, fmt) for c in out]  # as they run (fp8_block caps BLOCK_K), so tables record that


_COMPILE_WEIGHTS: dict = {}


def _compile_job(job: tuple) -> tuple[int, int, float]:
    """Worker of precompile(): run each (M, config) once on uninitialized weights of the real shape (the same
    strides, hence the same Triton specialization), so that the compiled kernels land in the on-disk cache."""
    from moelab.kernels import fused_moe as fm
    from moelab.kernels.fused_moe_config import MoEConfig
    from moelab.layers.moe.quant import QuantScales, qdtype

    shape, dtype, device, cells = job
    E, K, D, I = shape
    t0, failed = time.perf_counter(), 0
    key = (shape, dtype)
    if key not in _COMPILE_WEIGHTS:
        _COMPILE_WEIGHTS.clear()
        wd = FLOAT_DTYPES[dtype] if dtype in FLOAT_DTYPES else qdtype(dtype)
        quant = {}
        if dtype not in FLOAT_DTYPES:
            s13, s2 = QuantScales(dtype, torch.ones(1), torch.ones(1)).expected_shapes(E, D, I)
            quant = dict(quant=dtype, w13_scale=torch.ones(s13, device=device),
                         w2_scale=torch.ones(s2, device=device))
        _COMPILE_WEIGHTS[key] = (torch.zeros(E, 2 * I, D, dtype=wd, device=device),
                                 torch.zeros(E, D, I, dtype=wd, device=device), quant)
    w13, w2, quant = _COMPILE_WEIGHTS[key]
    g = torch.Generator(device=device).manual_seed(0)
    for M, cfg in cells:
        x, ids, w = make_inputs(M, shape, act_dtype(dtype, device), device, g)
        try:
            fm.fused_moe(x, ids, w, w13, w2, config=MoEConfig.from_dict(cfg), **quant)
            if device != "cpu":
                torch.cuda.synchronize()
        except Exception:  # does not fit: tune() skips it too
            failed += 1
    return len(cells), failed, time.perf_counter() - t0


def compile_cells(jobs: list[tuple], workers: int) -> tuple[int, int]:
    """jobs: (shape, dtype, device, [(M, MoEConfig dict), ...]) compiled on `workers` processes at once (Triton
    compiles on the CPU, one kernel at a time per process). Returns (configs, configs that do not run)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    split = [(shape, dt, dev, cells[i::workers]) for shape, dt, dev, cells in jobs for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_compile_job, [j for j in split if j[3]]))
    return sum(d[0] for d in done), sum(d[1] for d in done)


def precompile(shape: tuple, ms: tuple[int, ...], dtype: str, device: str, workers: int,
               baseline: dict | None = None, log: Callable[[str], None] = print) -> None:
    """Compile every kernel tune() will time, on `workers` processes; tune() then finds them in the cache."""
    seen, cells = set(), []
    for M in ms:
        for c in _first_stage(shape, M, dtype, device, baseline):
            if (M, c) not in seen:
                seen.add((M, c))
                cells.append((M, c.to_dict()))
    t0 = time.perf_counter()
    n, bad = compile_cells([(shape, dtype, device, cells)], workers)
    log(f"precompile {shape} {dtype}: {n} configs ({bad} do not run) on {workers} processes in "
        f"{time.perf_counter() - t0:.0f} s")


def precompile_in_use(shapes: dict, ms: tuple[int, ...], dtypes: tuple[str, ...], device: str, workers: int,
                      log: Callable[[str], None] = print) -> None:
    """Compile the kernels of the tile configs fused_moe will pick (tuned table or heuristic) for every shape,
    M and dtype of a benchmark, on `workers` processes, before the serial checks and timings."""
    from moelab.kernels.fused_moe_config import get_config

    name = torch.cuda.get_device_name(device)
    jobs = []
    for E, K, D, I in shapes.values():
        for dt in dtypes:
            cells = [(M, get_config(M, E, K, I, D, table_dtype(dt), "cuda", name).to_dict()) for M in ms]
            jobs.append(((E, K, D, I), dt, device, cells))
    t0 = time.perf_counter()
    n, bad = compile_cells(jobs, workers)
    log(f"precompiled the {n} configs in use ({bad} do not run) on {workers} processes in "
        f"{time.perf_counter() - t0:.0f} s")


def tune(shape: tuple, ms: tuple[int, ...], dtype: str, device: str, seed: int = 0,
         log: Callable[[str], None] = print, baseline: dict | None = None, workers: int = 1,
         tiles: bool = True) -> dict:
    """{M: best MoEConfig} by whole-layer graph time: per BLOCK_M, the gate_up tile (down at the heuristic),
    then the down tile, then the row-block grouping of each GEMM (GROUP_M_CANDIDATES); configs that fail to
    compile or run are skipped. baseline {M: MoEConfig} (e.g. the table in use) competes too, so a re-tune never
    replaces a faster config. workers > 1 (GPU): compile every candidate in that many processes first.
    tiles=False: only the grouping, starting from the baseline (or the heuristic) config."""
    from moelab.kernels.fused_moe import quant_config
    from moelab.kernels.fused_moe_config import GemmConfig, MoEConfig, heuristic_config

    E, K, D, I = shape
    fmt = dtype if dtype not in FLOAT_DTYPES else None
    if workers > 1 and device != "cpu" and tiles:
        try:
            precompile(shape, ms, dtype, device, workers, baseline, log)
        except Exception as exc:  # only a head start: the timings compile what is missing
            log(f"precompile failed ({type(exc).__name__}: {exc}); compiling during the timings")
    g = torch.Generator(device=device).manual_seed(seed)
    wts = make_weights(shape, dtype, device, g)
    quant = dict(quant=dtype, w13_scale=wts["scales"].w13_scale, w2_scale=wts["scales"].w2_scale) \
        if wts["scales"] is not None else {}
    best: dict[int, MoEConfig] = {}
    for M in ms:
        t0 = time.perf_counter()
        inputs = [make_inputs(M, shape, act_dtype(dtype, device), device, g) for _ in range(ROTATE)]
        layer_ms = functools.partial(_layer_ms, inputs=inputs, wts=wts, quant=quant, device=device)
        heur = quant_config(heuristic_config(M, E, K, I, D, dtype, "cpu" if device == "cpu" else "cuda"), fmt)
        trials: list[tuple[float, MoEConfig]] = [(layer_ms(heur), heur)]
        if baseline and M in baseline:
            trials.append((layer_ms(quant_config(baseline[M], fmt)), quant_config(baseline[M], fmt)))
        cands = [GemmConfig(bn, bk, 1, w, s, tma) for bn, bk, w, s, tma in gemm_candidates(device, dtype, M * K / E)]
        for bm in block_m_candidates(M, K, E) if tiles else ():
            c = replace(heur, block_m=bm)
            ups = [(layer_ms(replace(c, gate_up=up)), up) for up in cands]
            c = replace(c, gate_up=min(ups, key=lambda t: t[0])[1])
            downs = [(layer_ms(replace(c, down=d)), d) for d in cands]
            trials.append(min(((t, replace(c, down=d)) for t, d in downs), key=lambda t: t[0]))
        for gemm in ("gate_up", "down") if M * K / E >= GROUP_M_MIN_ROWS else ():  # then the row-block grouping
            c = min(trials, key=lambda t: t[0])[1]
            trials += [(layer_ms(cg), cg) for gm in GROUP_M_CANDIDATES
                       if (cg := replace(c, **{gemm: replace(getattr(c, gemm), group_m=gm)})) != c]
        ms_best, best[M] = min(trials, key=lambda t: t[0])
        gemv_ms = _gemv_ms(inputs, wts, quant, device)  # one token: the GEMVs fused_moe takes by default
        if gemv_ms is not None:
            best[M] = replace(best[M], gemv=gemv_ms <= ms_best)
            log(f"tune {shape} {dtype} M={M}: GEMVs {gemv_ms:.4f} ms against the best tiles' {ms_best:.4f} ms: "
                f"{'GEMVs' if best[M].gemv else 'tiles'} kept")
            ms_best = min(ms_best, gemv_ms)
        log(f"tune {shape} {dtype} M={M}: {ms_best:.4f} ms (heuristic {trials[0][0]:.4f} ms) {best[M].to_dict()} "
            f"[{time.perf_counter() - t0:.0f} s]")
    return best


def backend_names() -> tuple[str, ...]:
    """The MoE backends installed here (triton only where triton is)."""
    from moelab.layers.moe.backends import BACKENDS

    return tuple(BACKENDS)


def read_tuned(path: Path | str) -> dict:
    """{M: MoEConfig} of a tuned config file."""
    from moelab.kernels.fused_moe_config import load_config_file

    return load_config_file(Path(path))


def tuned_path(shape: tuple, dtype: str, device: str, out_dir: Path | str | None = None) -> Path:
    """Where the JSON config file of this shape, dtype and device goes (moelab/kernels/configs/ by default)."""
    from moelab.kernels.fused_moe_config import CONFIG_DIR, config_file_name

    E, K, D, I = shape
    dev_name = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    return Path(out_dir or CONFIG_DIR) / config_file_name(E, I, D, dev_name, table_dtype(dtype))


def write_tuned(shape: tuple, dtype: str, configs: dict, device: str, out_dir: Path | str | None = None) -> Path:
    """Write {M: MoEConfig} as the JSON config file of this shape, dtype and device (tuned_path)."""
    import triton

    from moelab.kernels.fused_moe_config import save_config_file

    path = tuned_path(shape, dtype, device, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    save_config_file(path, configs, note=f"moelab tune-kernels, top-k {shape[1]}, triton {triton.__version__}, "
                     f"torch {torch.__version__}, {dev_name}")
    return path
