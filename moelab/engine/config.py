"""EngineConfig: every knob of the engine in one flat, typed, frozen record (stored with each lab run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")
MOE_BACKEND_NAMES = ("auto", "naive", "grouped", "triton")  # moelab.layers.moe.backends (triton where installed)
ATTENTION_NAMES = ("auto", "sdpa", "triton")  # moelab.layers.attention.ATTENTION_IMPLS


@dataclass(frozen=True)
class EngineConfig:
    """model: a checkpoint directory, or a preset name (a synthetic model with seeded random weights made on
    the device; `overrides` changes its shape, e.g. {"layers": 2}, with the names of `moelab inspect`).

    dtype "auto" is bfloat16 on CUDA and float32 on the CPU. moe_backend "auto" is "triton" on CUDA and
    "grouped" on the CPU; attention "auto" is "triton" on CUDA and "sdpa" on the CPU. The KV pool takes
    gpu_memory_utilization of the GPU's memory minus weights and the measured activation peak, or exactly
    num_kv_blocks blocks when that is set (on the CPU: enough for max_num_seqs full-length sequences, capped
    by cpu_kv_cache_gib). CUDA graphs capture decode steps of up to cuda_graph_max_bs sequences unless
    enforce_eager. async_scheduling plans and launches each step before the previous one's tokens are on the
    host (they are fed on the device), so host bookkeeping overlaps the GPU; outputs then lag one step.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # default: min(max_position_embeddings, 8192)
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    num_kv_blocks: int | None = None
    cpu_kv_cache_gib: float = 2.0
    moe_backend: str = "auto"
    attention: str = "auto"
    enforce_eager: bool = False
    cuda_graph_max_bs: int = 256
    enable_chunked_prefill: bool = True
    top_k: int | None = None  # override of the model's experts per token
    seed: int = 0
    async_scheduling: bool = True  # overlap the host work of step N+1 with the device work of step N
    record_routing: bool = False  # tokens per expert per step and layer (moelab.engine.routing_recorder)
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from moelab.device import check_device_name

        check_device_name(self.device)
        checks = [
            (self.dtype in DTYPE_NAMES, f"dtype {self.dtype!r}; allowed: {', '.join(DTYPE_NAMES)}"),
            (self.moe_backend in MOE_BACKEND_NAMES,
             f"moe_backend {self.moe_backend!r}; allowed: {', '.join(MOE_BACKEND_NAMES)}"),
            (self.attention in ATTENTION_NAMES, f"attention {self.attention!r}; allowed: {', '.join(ATTENTION_NAMES)}"),
            (self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= 1, f"max_num_batched_tokens must be >= 1, got "
                                               f"{self.max_num_batched_tokens}"),
            (self.max_model_len is None or self.max_model_len >= 2,
             f"max_model_len must be >= 2, got {self.max_model_len}"),
            (self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
             f"block_size must be a power of two, got {self.block_size}"),
            (0 < self.gpu_memory_utilization <= 1,
             f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 2,
             f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}"),
            (self.cuda_graph_max_bs >= 1, f"cuda_graph_max_bs must be >= 1, got {self.cuda_graph_max_bs}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if not self.enable_chunked_prefill and self.max_model_len and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({self.max_model_len})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
