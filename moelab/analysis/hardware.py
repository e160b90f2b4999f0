"""Cluster: the hardware a deployment runs on (GPU count and nodes, memory, HBM/matmul ceilings, link bandwidths).

Defaults are one H100 SXM node: HBM copy 3.0 TB/s and bf16 matmul 798 TFLOP/s (measured on the project's H100,
../shared/guide/MEASURING.md); NVLink 450 GB/s per GPU per direction and 50 GB/s per GPU between nodes
(400 Gb/s NDR InfiniBand) are nominal vendor numbers, not measured here. Override any of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from moelab.roofline import Ceilings

H100 = Ceilings(bandwidth=3.0e12, matmul=798e12, name="H100 SXM (measured copy bw, bf16 matmul)")

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str | float | int) -> float:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '1.5e9' -> 1.5e9. GB and G are decimal (10^9), GiB binary."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"bad memory size {text!r}; use a number with an optional unit: "
                         f"{', '.join(u for u in _UNITS if u)} (e.g. 80GB = 80e9 bytes, 80GiB = 80 * 2^30)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


@dataclass(frozen=True)
class Cluster:
    """gpus GPUs in nodes of gpus_per_node (a cluster smaller than one node is one node).

    gpu_memory: bytes per GPU; memory_utilization: the share of it the engine may use (vLLM's
    gpu_memory_utilization; the rest covers the CUDA context and allocator slack). intra_node_bw / inter_node_bw:
    bytes/s one GPU can send (and, at the same time, receive) over NVLink / the network. link_latency: seconds
    added to every collective (all-reduce, all-to-all); an assumption, not measured.
    """

    gpus: int = 1
    gpus_per_node: int = 8
    gpu_memory: float = 80e9
    memory_utilization: float = 0.90
    ceilings: Ceilings = field(default=H100)
    intra_node_bw: float = 450e9
    inter_node_bw: float = 50e9
    link_latency: float = 10e-6

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(f"gpus ({self.gpus}) and gpus_per_node ({self.gpus_per_node}) must be >= 1")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ValueError(f"{self.gpus} GPUs do not fill whole nodes of {self.gpus_per_node}; "
                             "use a multiple of gpus_per_node")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        for name in ("gpu_memory", "intra_node_bw", "inter_node_bw"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def node_size(self) -> int:
        """GPUs per node actually used (the whole cluster when it is smaller than one node)."""
        return min(self.gpus, self.gpus_per_node)

    @property
    def nodes(self) -> int:
        return self.gpus // self.node_size

    @property
    def usable_memory(self) -> float:
        return self.gpu_memory * self.memory_utilization

    def node_of(self, rank: int) -> int:
        return rank // self.node_size

    def group_bw(self, group_size: int) -> float:
        """Per-GPU bandwidth of a collective over `group_size` consecutive ranks: NVLink inside one node,
        the network once the group spans nodes (a ring over nodes is limited by its slowest hop)."""
        return self.intra_node_bw if group_size <= self.node_size else self.inter_node_bw

    def with_gpus(self, gpus: int) -> Cluster:
        return Cluster(gpus, self.gpus_per_node, self.gpu_memory, self.memory_utilization, self.ceilings,
                       self.intra_node_bw, self.inter_node_bw, self.link_latency)
