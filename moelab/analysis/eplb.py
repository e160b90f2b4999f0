"""Hot-expert replication with a budget of redundant slots: DeepSeek EPLB's global and hierarchical policies.

Our own implementation of the published algorithm (deepseek-ai/EPLB), per MoE layer, on measured loads:
1. replicate: E logical experts get E + R physical slots; each extra slot goes to the expert with the highest
   load per replica (load / replicas), never more replicas than GPUs that can hold them;
2. pack: replicas (weight load / replicas each) go to GPUs by LPT with exactly (E + R) / G per GPU and never two
   replicas of one expert on one GPU. A token of expert e is split evenly over e's replicas.
Hierarchical first packs the E / g expert groups (contiguous ids, DeepSeek's routing groups) onto the nodes, g / N
groups per node, then replicates and packs inside each node, so group-limited routing keeps a token's traffic on
few nodes. Global replicates and packs over all GPUs at once (the choice when groups do not split over nodes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.analysis.placement import Placement, lpt_pack


def replicate(loads: Any, num_slots: int, max_replicas: int) -> np.ndarray:
    """[n] replicas per expert: start at 1, then each of num_slots - n extra slots to the expert with the largest
    load / replicas (ties: lowest id) among those below max_replicas."""
    x = np.asarray(loads, dtype=np.float64)
    n = len(x)
    if num_slots < n:
        raise ValueError(f"{num_slots} slots for {n} experts: need at least one slot per expert")
    if num_slots > n * max_replicas:
        raise ValueError(f"{num_slots} slots exceed {n} experts x {max_replicas} replicas each")
    count = np.ones(n, dtype=np.int64)
    for _ in range(num_slots - n):
        per = np.where(count < max_replicas, x / count, -np.inf)
        count[int(np.argmax(per))] += 1
    return count


def _pack_replicas(loads: np.ndarray, experts: np.ndarray, count: np.ndarray, gpus: list[int]) -> dict[int, list]:
    """Place count[i] replicas of experts[i] on `gpus` (equal slots each); returns expert -> [ranks]."""
    labels = np.repeat(experts, count)
    weights = np.repeat(loads / count, count)
    cap = len(labels) // len(gpus)
    pack = lpt_pack(weights, len(gpus), cap, labels)
    out: dict[int, list] = {}
    for e, p in zip(labels, pack):
        out.setdefault(int(e), []).append(gpus[p])
    return out


def _layer_global(x: np.ndarray, G: int, R: int) -> list[list[int]]:
    E = len(x)
    count = replicate(x, E + R, G)
    where = _pack_replicas(x, np.arange(E), count, list(range(G)))
    return [sorted(where[e]) for e in range(E)]


def _layer_hierarchical(x: np.ndarray, G: int, R: int, node_size: int, groups: int) -> list[list[int]]:
    E, nodes = len(x), G // node_size
    size = E // groups
    group_node = lpt_pack(x.reshape(groups, size).sum(axis=1), nodes, groups // nodes)
    out: list[list[int]] = [[] for _ in range(E)]
    for n in range(nodes):
        experts = np.concatenate([np.arange(g * size, (g + 1) * size) for g in np.flatnonzero(group_node == n)])
        count = replicate(x[experts], (E + R) // nodes, node_size)
        where = _pack_replicas(x[experts], experts, count, list(range(n * node_size, (n + 1) * node_size)))
        for e, ranks in where.items():
            out[e] = sorted(ranks)
    return out


def eplb(loads: Any, num_ranks: int, redundant: int, *, policy: str = "auto", gpus_per_node: int = 8,
         num_groups: int = 1) -> Placement:
    """EPLB placement of loads [L, E] on num_ranks GPUs with `redundant` extra slots per layer.

    policy: "global", "hierarchical" (needs E % num_groups == 0, num_groups % nodes == 0 and redundant % nodes
    == 0), or "auto" (hierarchical when those hold and there is more than one node, else global, as DeepSeek
    does). Always (E + redundant) % num_ranks == 0, so every GPU holds the same number of slots.
    """
    x = np.atleast_2d(np.asarray(loads, dtype=np.float64))
    L, E = x.shape
    G, R = num_ranks, redundant
    node_size = min(G, gpus_per_node)
    nodes = G // node_size
    if R < 0 or (E + R) % G or E + R < G:
        raise ValueError(f"EPLB needs (experts {E} + redundant {R}) to be a positive multiple of {G} GPUs")
    if G % node_size:
        raise ValueError(f"{G} GPUs do not fill whole nodes of {gpus_per_node}")
    fits = num_groups >= 1 and E % num_groups == 0 and num_groups % nodes == 0 and R % nodes == 0
    if policy == "auto":
        policy = "hierarchical" if fits and nodes > 1 else "global"
    if policy == "hierarchical" and not fits:
        raise ValueError(f"hierarchical EPLB needs experts {E} % groups {num_groups} == 0, groups % nodes {nodes} "
                         f"== 0 and redundant {R} % nodes == 0; use policy 'global'")
    if policy not in ("global", "hierarchical"):
        raise ValueError(f"EPLB policy {policy!r}; allowed: auto, global, hierarchical")
    if policy == "global":
        ranks = [_layer_global(row, G, R) for row in x]
    else:
        ranks = [_layer_hierarchical(row, G, R, node_size, num_groups) for row in x]
    return Placement.from_ranks(ranks, G, gpus_per_node=node_size, strategy=f"eplb_{policy}",
                                info={"redundant": R, "num_groups": num_groups})
