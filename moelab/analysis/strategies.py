"""The placement strategies by name, each building a Placement from a RoutingTrace for G ranks in nodes of n.

contiguous, round_robin: ignore the loads. lpt: balanced by the trace's pooled per-layer loads. coactivation:
co-activation-aware grouping (needs per-token ids). eplb, eplb_global, eplb_hierarchical: hot-expert
replication with `redundant` extra slots per layer (eplb picks hierarchical when groups split over nodes).
"""

from __future__ import annotations

from collections.abc import Callable

from moelab.analysis.affinity import coactivation_grouped
from moelab.analysis.balance import coactivation
from moelab.analysis.eplb import eplb
from moelab.analysis.placement import Placement, balanced, contiguous, round_robin
from moelab.analysis.trace import RoutingTrace

Builder = Callable[..., Placement]


def _loads(trace: RoutingTrace):
    return trace.counts.sum(axis=0)  # [L, E]


STRATEGIES: dict[str, Builder] = {
    "contiguous": lambda t, G, n, **kw: contiguous(t.num_experts, G, num_layers=t.num_layers, gpus_per_node=n),
    "round_robin": lambda t, G, n, **kw: round_robin(t.num_experts, G, num_layers=t.num_layers, gpus_per_node=n),
    "lpt": lambda t, G, n, **kw: balanced(_loads(t), G, gpus_per_node=n),
    "coactivation": lambda t, G, n, **kw: coactivation_grouped(coactivation(t), G, gpus_per_node=n),
    "eplb": lambda t, G, n, redundant=0, num_groups=1, **kw: eplb(_loads(t), G, redundant, policy="auto",
                                                                 gpus_per_node=n, num_groups=num_groups),
    "eplb_global": lambda t, G, n, redundant=0, num_groups=1, **kw: eplb(_loads(t), G, redundant, policy="global",
                                                                        gpus_per_node=n, num_groups=num_groups),
    "eplb_hierarchical": lambda t, G, n, redundant=0, num_groups=1, **kw: eplb(
        _loads(t), G, redundant, policy="hierarchical", gpus_per_node=n, num_groups=num_groups),
}


def make_placement(strategy: str, trace: RoutingTrace, num_ranks: int, *, gpus_per_node: int = 8,
                   redundant: int = 0, num_groups: int = 1) -> Placement:
    """Build the named strategy's placement for `trace` on num_ranks GPUs."""
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if redundant and not strategy.startswith("eplb"):
        raise ValueError(f"redundant slots ({redundant}) need an eplb strategy, not {strategy!r}")
    return STRATEGIES[strategy](trace, num_ranks, min(gpus_per_node, num_ranks), redundant=redundant,
                                num_groups=num_groups)
