"""Placement: which GPU ranks hold each routed expert (with replicas and their traffic shares), per MoE layer.

It is what the engine's expert parallelism consumes: local_experts(rank, layer) lists the experts a rank loads,
expert_map(rank, layer) maps global expert id -> local slot (-1 when absent), ranks_of(expert, layer) lists the
replicas a token can go to and share_matrix(layer) how its traffic splits. A placement with one layer applies to
every layer. JSON round trip with save / load. The load-free strategies (contiguous, round-robin) and LPT live
here; replication (EPLB) in eplb.py, co-activation grouping in affinity.py, the registry in strategies.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "moelab-placement"
VERSION = 1


@dataclass(frozen=True, eq=False)
class Placement:
    """ranks[l][e]: the ranks holding a replica of expert e in layer l; shares[l][e]: the share of e's tokens
    each replica serves (positive, summing to 1). gpus_per_node groups ranks into nodes (rank // gpus_per_node)."""

    num_experts: int
    num_ranks: int
    ranks: tuple[tuple[tuple[int, ...], ...], ...]
    shares: tuple[tuple[tuple[float, ...], ...], ...]
    gpus_per_node: int = 8
    strategy: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        E, G = self.num_experts, self.num_ranks
        if E < 1 or G < 1 or self.gpus_per_node < 1:
            raise ValueError(f"placement needs experts, ranks and gpus_per_node >= 1, got {E}, {G}, "
                             f"{self.gpus_per_node}")
        if not self.ranks or len(self.ranks) != len(self.shares):
            raise ValueError("placement needs >= 1 layer and one shares entry per layer")
        for l, (rl, sl) in enumerate(zip(self.ranks, self.shares)):
            if len(rl) != E or len(sl) != E:
                raise ValueError(f"layer {l}: {len(rl)} experts placed, expected {E}")
            for e, (r, s) in enumerate(zip(rl, sl)):
                if not r or len(r) != len(s):
                    raise ValueError(f"layer {l} expert {e}: needs >= 1 rank and one share per rank, got {r}, {s}")
                if len(set(r)) != len(r) or min(r) < 0 or max(r) >= G:
                    raise ValueError(f"layer {l} expert {e}: ranks {r} must be distinct and in [0, {G})")
                if min(s) <= 0 or abs(sum(s) - 1) > 1e-6:
                    raise ValueError(f"layer {l} expert {e}: shares {s} must be > 0 and sum to 1")
            if G <= E and any(n == 0 for n in self.slots(l)):
                raise ValueError(f"layer {l}: ranks {np.flatnonzero(self.slots(l) == 0).tolist()} hold no expert")

    # ----- construction -----
    @classmethod
    def from_ranks(cls, ranks: Sequence[Sequence[Sequence[int]]], num_ranks: int, *,
                   shares: Sequence[Sequence[Sequence[float]]] | None = None, gpus_per_node: int = 8,
                   strategy: str = "", info: dict | None = None) -> Placement:
        """ranks[l][e] -> list of ranks; shares default to an equal split over an expert's replicas."""
        r = tuple(tuple(tuple(int(x) for x in e) for e in layer) for layer in ranks)
        if shares is None:
            s = tuple(tuple(tuple(1.0 / len(e) for _ in e) for e in layer) for layer in r)
        else:
            s = tuple(tuple(tuple(float(x) for x in e) for e in layer) for layer in shares)
        num_experts = len(r[0]) if r else 0
        return cls(num_experts, num_ranks, r, s, gpus_per_node, strategy, dict(info or {}))

    @classmethod
    def from_assignment(cls, assign: np.ndarray, num_ranks: int, **kw: Any) -> Placement:
        """From a [L, E] (or [E]) array of one rank per expert (no replicas)."""
        a = np.atleast_2d(np.asarray(assign))
        return cls.from_ranks([[[int(x)] for x in row] for row in a], num_ranks, **kw)

    # ----- views -----
    @property
    def num_layers(self) -> int:
        return len(self.ranks)

    @property
    def num_nodes(self) -> int:
        return -(-self.num_ranks // self.gpus_per_node)

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def _layer(self, layer: int) -> int:
        if self.num_layers == 1:
            return 0
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers})")
        return layer

    def ranks_of(self, expert: int, layer: int = 0) -> tuple[int, ...]:
        return self.ranks[self._layer(layer)][expert]

    def shares_of(self, expert: int, layer: int = 0) -> tuple[float, ...]:
        return self.shares[self._layer(layer)][expert]

    def local_experts(self, rank: int, layer: int = 0) -> list[int]:
        """Experts rank `rank` holds in `layer`, ascending: the order of its local weight slots."""
        return [e for e, r in enumerate(self.ranks[self._layer(layer)]) if rank in r]

    def expert_map(self, rank: int, layer: int = 0) -> np.ndarray:
        """[E] int32: the local slot of each global expert on `rank`, -1 where the rank does not hold it."""
        out = np.full(self.num_experts, -1, dtype=np.int32)
        local = self.local_experts(rank, layer)
        out[local] = np.arange(len(local), dtype=np.int32)
        return out

    def slots(self, layer: int = 0) -> np.ndarray:
        """[G] experts (replicas included) held by each rank."""
        out = np.zeros(self.num_ranks, dtype=np.int64)
        for r in self.ranks[self._layer(layer)]:
            out[list(r)] += 1
        return out

    def num_replicas(self, layer: int = 0) -> int:
        return int(sum(len(r) for r in self.ranks[self._layer(layer)]))

    def share_matrix(self, layer: int = 0) -> np.ndarray:
        """[E, G]: the share of expert e's tokens served by rank g (rows sum to 1)."""
        l = self._layer(layer)
        m = np.zeros((self.num_experts, self.num_ranks))
        for e, (r, s) in enumerate(zip(self.ranks[l], self.shares[l])):
            m[e, list(r)] = s
        return m

    def rank_load(self, expert_load: Any, layer: int = 0) -> np.ndarray:
        """[G] load of each rank when expert e receives expert_load[e] tokens."""
        return np.asarray(expert_load, dtype=np.float64) @ self.share_matrix(layer)

    # ----- JSON -----
    def to_dict(self) -> dict[str, Any]:
        layers = []
        for rl, sl in zip(self.ranks, self.shares):
            equal = all(all(abs(x - 1 / len(s)) < 1e-12 for x in s) for s in sl)
            layers.append({"ranks": [list(r) for r in rl], **({} if equal else {"shares": [list(s) for s in sl]})})
        return dict(format=FORMAT, version=VERSION, num_experts=self.num_experts, num_ranks=self.num_ranks,
                    gpus_per_node=self.gpus_per_node, strategy=self.strategy, info=self.info, layers=layers)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Placement:
        if d.get("format") != FORMAT or d.get("version", 0) > VERSION:
            raise ValueError(f"not a {FORMAT} v<={VERSION} document: format {d.get('format')!r}")
        layers = d["layers"]
        shares = None
        if any("shares" in x for x in layers):
            shares = [x.get("shares") or [[1.0 / len(r)] * len(r) for r in x["ranks"]] for x in layers]
        p = cls.from_ranks([x["ranks"] for x in layers], d["num_ranks"], shares=shares,
                           gpus_per_node=d.get("gpus_per_node", 8), strategy=d.get("strategy", ""),
                           info=d.get("info", {}))
        if p.num_experts != d["num_experts"]:
            raise ValueError(f"placement lists {p.num_experts} experts, header says {d['num_experts']}")
        return p

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"cannot read a placement from {path}: {err}") from None


# ----- strategies that need no or only per-expert loads -----
def require_experts_per_rank(num_experts: int, num_ranks: int) -> None:
    """Expert parallelism without replicas needs at least one expert per rank."""
    if num_ranks > num_experts:
        raise ValueError(f"{num_ranks} ranks for {num_experts} experts: without replicas some ranks hold none; "
                         "use an EPLB strategy with redundant slots, or TP inside the experts")


def contiguous(num_experts: int, num_ranks: int, *, num_layers: int = 1, gpus_per_node: int = 8) -> Placement:
    """Expert e on rank floor(e * G / E): blocks of consecutive ids (vLLM's default "linear" placement)."""
    require_experts_per_rank(num_experts, num_ranks)
    a = np.arange(num_experts) * num_ranks // num_experts
    return Placement.from_assignment(np.tile(a, (num_layers, 1)), num_ranks, gpus_per_node=gpus_per_node,
                                     strategy="contiguous")


def round_robin(num_experts: int, num_ranks: int, *, num_layers: int = 1, gpus_per_node: int = 8) -> Placement:
    """Expert e on rank e mod G."""
    require_experts_per_rank(num_experts, num_ranks)
    a = np.arange(num_experts) % num_ranks
    return Placement.from_assignment(np.tile(a, (num_layers, 1)), num_ranks, gpus_per_node=gpus_per_node,
                                     strategy="round_robin")


def lpt_pack(weights: Any, num_packs: int, capacity: int | None = None, labels: Any = None) -> np.ndarray:
    """Longest processing time first: items by weight descending (ties: lower index first), each into the pack with
    the least load among those with room (< capacity items) and, when labels are given, no item of the same label;
    ties go to the pack with fewer items, then the lower index. Returns the pack of each item. Graham's bound: the
    max load is <= 4/3 of the optimum without capacity."""
    w = np.asarray(weights, dtype=np.float64)
    n = len(w)
    cap = n if capacity is None else capacity
    if cap * num_packs < n:
        raise ValueError(f"{n} items do not fit {num_packs} packs of capacity {cap}")
    lab = None if labels is None else np.asarray(labels)
    load, count = np.zeros(num_packs), np.zeros(num_packs, dtype=np.int64)
    held: list[set] = [set() for _ in range(num_packs)]
    out = np.empty(n, dtype=np.int64)
    for i in np.argsort(-w, kind="stable"):
        best = None
        for p in range(num_packs):
            if count[p] >= cap or (lab is not None and lab[i] in held[p]):
                continue
            if best is None or (load[p], count[p]) < (load[best], count[best]):
                best = p
        if best is None:
            raise ValueError(f"item {i} (label {None if lab is None else lab[i]}) fits no pack: every pack with "
                             "room already holds its label")
        out[i], load[best], count[best] = best, load[best] + w[i], count[best] + 1
        if lab is not None:
            held[best].add(lab[i])
    return out


def balanced(loads: Any, num_ranks: int, *, capacity: int | None = None, gpus_per_node: int = 8) -> Placement:
    """Greedy balance by measured load, per layer: LPT (lpt_pack) of the experts' loads [L, E] over the ranks, at
    most `capacity` experts per rank (default ceil(E / G), so memory stays even)."""
    x = np.atleast_2d(np.asarray(loads, dtype=np.float64))
    E = x.shape[1]
    require_experts_per_rank(E, num_ranks)
    cap = capacity or -(-E // num_ranks)
    a = np.stack([lpt_pack(row, num_ranks, cap) for row in x])
    return Placement.from_assignment(a, num_ranks, gpus_per_node=gpus_per_node, strategy="lpt",
                                     info={"capacity": cap})
