"""Tile configs of the fused MoE kernels: a heuristic for any shape, and tuned JSON files that override it.

A tuned file lives in `moelab/kernels/configs/`, named by shape, device and dtype, e.g.
`E=64,N=1024,D=2048,device=NVIDIA_H100_80GB_HBM3,dtype=bf16.json` (N = I, the expert intermediate size),
and maps the token count M to a config; the key nearest to M wins. `scripts/bench_moe_gpu.py --tune` writes
them. No torch import: callers pass the dtype and device names.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class GemmConfig:
    """Tile of one grouped GEMM: BLOCK_N output columns x BLOCK_K reduction per step; GROUP_M M-blocks
    share a column of tiles in launch order (L2 reuse of the weight tile); tma: weight tiles (and the down
    GEMM's contiguous rows) through TMA descriptors where the device and strides allow."""

    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False


@dataclass(frozen=True)
class MoEConfig:
    """BLOCK_M rows of the sorted routing per program (shared by both GEMMs), then each GEMM's tile. gemv: where
    fused_moe picks the config itself for one token on a GPU and moe_gemv applies, whether it takes the GEMVs
    (True, the default) or these tiles; a tuned table says False where its GEMMs timed faster (tune())."""

    block_m: int
    gate_up: GemmConfig
    down: GemmConfig
    gemv: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.gemv:  # the default is not written, so tables without the choice read the same
            del d["gemv"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        extra = set(d) - {"block_m", "gate_up", "down", "gemv"}
        if extra or not isinstance(d.get("gemv", True), bool):
            raise ValueError(f"a MoE config has block_m, gate_up, down and optionally gemv (true/false); got "
                             f"{sorted(d)} with gemv={d.get('gemv', True)!r}")
        return cls(d["block_m"], GemmConfig(**d["gate_up"]), GemmConfig(**d["down"]), d.get("gemv", True))


def use_naive_blocks(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Decode shortcut: one program row-block per slot, no sort. Exact when T == 1 (a token's slots have distinct
    experts); for sparse batches an expert's weights are read once per slot instead of once, so only when
    T*K*4 <= E."""
    return num_tokens == 1 or num_tokens * top_k * 4 <= num_experts


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return max(lo, min(hi, p))


def heuristic_config(M: int, E: int, K: int, N: int, D: int, dtype: str, device_type: str = "cuda") -> MoEConfig:
    """Config for M tokens, E experts, top-K, intermediate N (=I), hidden D; dtype like "bfloat16". float32
    operands take half the K step of the 2-byte tiles, so that a tile's shared memory is the same: the bf16 tiles
    fill most of an H100's 227 KB and at full width float32 ran out of it (262 KB asked, 227 KB there).
    """
    cfg = _heuristic_2byte(M, E, K, N, D, dtype, device_type)
    if dtype == "float32" and device_type == "cuda":
        cfg = replace(cfg, gate_up=replace(cfg.gate_up, block_k=max(16, cfg.gate_up.block_k // 2)),
                      down=replace(cfg.down, block_k=max(16, cfg.down.block_k // 2)))
    return cfg


def _heuristic_2byte(M: int, E: int, K: int, N: int, D: int, dtype: str, device_type: str) -> MoEConfig:
    """The tiles for 2-byte operands (1-byte fp8 where noted).

    Small M is weight-streaming: BLOCK_M 16 and narrow N tiles so that every SM has loads in flight. Large M is
    compute-bound: 128-row tiles, 8 warps. Under the interpreter (device "cpu") the fewest, largest programs."""
    if device_type == "cpu":
        bn, bk = _pow2_clamp(N, 16, 64), _pow2_clamp(D, 16, 64)
        return MoEConfig(16, GemmConfig(bn, bk), GemmConfig(_pow2_clamp(D, 16, 64), _pow2_clamp(N, 16, 64)))
    per_expert = M * K / E  # tiles below: the H100 tuning results of docs/perf/moe_kernels.md, generalised
    if dtype == "fp8_block" and per_expert > 192:
        # block scales promote each 128-wide K step's product into the accumulators: gate and up side by side
        # need narrow gate_up tiles or the registers spill (the bf16 tiles below ran at a third of bf16's speed)
        return MoEConfig(128, GemmConfig(64, 128, 1, 8, 4), GemmConfig(128, 128, 1, 4, 3, tma=True))
    if use_naive_blocks(M, K, E) or per_expert <= 16:
        if dtype.startswith("fp8"):  # 64-wide tiles: the transposed products on fp8 wgmma (fused_moe.swap_ab);
            stages = 6 if use_naive_blocks(M, K, E) else 4  # the modal H200 tiles at M = 1 / 16-64 (v5 tables)
            return MoEConfig(16, GemmConfig(64, 128, 1, 4, stages, tma=True), GemmConfig(64, 128, 1, 4, 4, tma=True))
        return MoEConfig(16, GemmConfig(32, 256, 1, 4, 3), GemmConfig(64, 256, 1, 4, 3, tma=True))
    if per_expert <= 48:
        return MoEConfig(32, GemmConfig(128, 128, 1, 4, 3), GemmConfig(128, 128, 1, 4, 3))
    fp8 = dtype.startswith("fp8")  # 1-byte operands: 128-wide K steps move as many bytes as bf16's 64
    if per_expert <= 192:
        return MoEConfig(64, GemmConfig(128, 128 if fp8 else 64, 1, 4, 4, tma=True),
                         GemmConfig(128, 128 if fp8 else 64, 8, 4, 4, tma=True))
    return MoEConfig(128, GemmConfig(128, 128 if fp8 else 64, 8, 8, 3, tma=True),
                     GemmConfig(256, 128 if fp8 else 64, 8, 8, 3, tma=True))


def config_file_name(E: int, N: int, D: int, device_name: str, dtype: str) -> str:
    """E experts, N = I intermediate, D hidden; device as torch names it (spaces become _), dtype like bfloat16."""
    return f"E={E},N={N},D={D},device={device_name.replace(' ', '_')},dtype={DTYPE_NAMES.get(dtype, dtype)}.json"


def load_config_file(path: Path) -> dict[int, MoEConfig]:
    """{M: MoEConfig} from a tuned file ({"<M>": {"block_m": .., "gate_up": {..}, "down": {..}}, ...})."""
    raw = json.loads(Path(path).read_text())
    return {int(m): MoEConfig.from_dict(c) for m, c in raw.items() if not m.startswith("_")}


def save_config_file(path: Path, configs: dict[int, MoEConfig], note: str = "") -> None:
    body = {"_note": note} if note else {}
    body.update({str(m): configs[m].to_dict() for m in sorted(configs)})
    tmp = Path(path).with_name(Path(path).name + ".tmp")  # a failed write leaves the old table whole
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, path)


# GPUs of one architecture share tile configs well enough to prefer a sibling's tuned file over the heuristic
# (same SMs and shared memory; only the memory bandwidth differs, e.g. H200 vs H100)
FAMILIES = (("H100", "H200", "H800", "H20", "GH200"), ("A100", "A800", "A30"))


def _family(device_name: str) -> tuple[str, ...]:
    words = device_name.upper().replace("-", " ").replace("_", " ").split()
    return next((f for f in FAMILIES if any(w in f for w in words)), ())


@cache
def tuned_configs(E: int, N: int, D: int, device_name: str, dtype: str, config_dir: str = str(CONFIG_DIR)
                  ) -> dict[int, MoEConfig] | None:
    """The tuned table for this device, else one tuned on a GPU of the same family (FAMILIES), else None."""
    path = Path(config_dir) / config_file_name(E, N, D, device_name, dtype)
    if path.is_file():
        return load_config_file(path)
    family = _family(device_name)
    if family:
        prefix = config_file_name(E, N, D, "", dtype).split("device=")[0] + "device="
        for sibling in sorted(Path(config_dir).glob(f"{prefix}*,dtype={DTYPE_NAMES.get(dtype, dtype)}.json")):
            name = sibling.name[len(prefix):].split(",dtype=")[0]
            if _family(name) == family:
                return load_config_file(sibling)
    return None


# formats whose kernels differ only in the epilogue share a tuned table when one of them has none
SHARED_TABLES = {"fp8_tensor": "fp8_channel", "fp8_channel": "fp8_tensor"}


def get_config(M: int, E: int, K: int, N: int, D: int, dtype: str, device_type: str, device_name: str,
               config_dir: str = str(CONFIG_DIR)) -> MoEConfig:
    """The tuned config whose M is nearest (ties to the smaller M), else the heuristic. fp8_tensor and
    fp8_channel (per-expert vs per-channel scale, applied once after the K loop) use each other's table."""
    table = None
    if device_type == "cuda":
        table = tuned_configs(E, N, D, device_name, dtype, config_dir)
        if not table and dtype in SHARED_TABLES:
            table = tuned_configs(E, N, D, device_name, SHARED_TABLES[dtype], config_dir)
    if not table:
        return heuristic_config(M, E, K, N, D, dtype, device_type)
    return table[min(table, key=lambda m: (abs(m - M), m))]
