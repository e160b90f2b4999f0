"""Placement: the type, JSON, and every strategy on cases whose optimal answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moelab.analysis.affinity import coactivation_grouped, cut_weight
from moelab.analysis.balance import coactivation
from moelab.analysis.eplb import eplb, replicate
from moelab.analysis.placement import Placement, balanced, contiguous, lpt_pack, round_robin
from moelab.analysis.strategies import make_placement
from moelab.analysis.trace import RoutingTrace


def test_contiguous_and_round_robin_maps() -> None:
    c, r = contiguous(8, 4), round_robin(8, 4)
    assert [c.local_experts(k) for k in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [r.local_experts(k) for k in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert r.expert_map(1).tolist() == [-1, 0, -1, -1, -1, 1, -1, -1]
    assert c.ranks_of(5) == (2,) and c.slots().tolist() == [2, 2, 2, 2]
    assert contiguous(6, 4).slots().tolist() == [2, 1, 2, 1]  # uneven: floor(e * 4 / 6)
    with pytest.raises(ValueError, match="16 ranks for 8 experts"):
        contiguous(8, 16)


def test_json_round_trip_keeps_replicas_and_shares(tmp_path: Path) -> None:
    p = Placement.from_ranks([[[0, 1], [1], [0]], [[0], [1], [0, 1]]], 2,
                             shares=[[[0.25, 0.75], [1.0], [1.0]], [[1.0], [1.0], [0.5, 0.5]]], strategy="x")
    q = Placement.load(p.save(tmp_path / "p.json"))
    assert q.ranks == p.ranks and q.shares == p.shares and q.strategy == "x" and q.num_layers == 2
    assert q.share_matrix(0).tolist() == [[0.25, 0.75], [0, 1], [1, 0]]
    assert q.local_experts(1, layer=1) == [1, 2] and q.num_replicas(0) == 4


@pytest.mark.parametrize("ranks,shares,match", [
    ([[[0], [0]]], None, r"ranks \[1\] hold no expert"),
    ([[[0, 0], [1]]], None, "must be distinct"),
    ([[[0], [2]]], None, r"in \[0, 2\)"),
    ([[[0, 1], [1]]], [[[0.5, 0.6], [1.0]]], "sum to 1"),
    ([[[0], []]], None, ">= 1 rank"),
])
def test_invalid_placements(ranks: list, shares: list | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Placement.from_ranks(ranks, 2, shares=shares)


def test_lpt_finds_the_optimum_where_it_exists() -> None:
    a = lpt_pack([4, 3, 2, 1], 2, capacity=2)
    assert np.bincount(a, weights=[4, 3, 2, 1]).tolist() == [5.0, 5.0]
    w = [5, 5, 4, 4, 3, 3]
    assert np.bincount(lpt_pack(w, 3, capacity=2), weights=w).tolist() == [8.0, 8.0, 8.0]


def test_lpt_misses_the_optimum_on_graham_s_example() -> None:
    # [3, 3, 2, 2, 2] on 2 machines: the optimum is 6 ({3, 3} | {2, 2, 2}); LPT gives 7, within its 4/3 bound
    w = [3, 3, 2, 2, 2]
    assert np.bincount(lpt_pack(w, 2), weights=w).max() == 7.0


def test_lpt_capacity_and_labels() -> None:
    a = lpt_pack([10, 1, 1, 1], 2, capacity=2)
    assert np.bincount(a).tolist() == [2, 2]
    with pytest.raises(ValueError, match="fits no pack"):
        lpt_pack([1, 1, 1], 2, capacity=2, labels=[0, 0, 0])


def test_balanced_placement_per_layer() -> None:
    p = balanced([[4, 3, 2, 1], [1, 2, 3, 4]], 2)
    for l in range(2):
        loads = p.rank_load([[4, 3, 2, 1], [1, 2, 3, 4]][l], layer=l)
        assert loads.tolist() == [5.0, 5.0]
    assert p.info["capacity"] == 2


def test_replicate_gives_slots_to_the_largest_load_per_replica() -> None:
    assert replicate([60, 20, 20], 5, 4).tolist() == [3, 1, 1]  # 60 -> 30 -> 20
    assert replicate([70, 10], 6, 4).tolist() == [4, 2]  # capped at 4 replicas, the rest to expert 1
    with pytest.raises(ValueError, match="exceed"):
        replicate([1, 1], 9, 4)


def test_eplb_global_spreads_one_very_hot_expert_to_perfect_balance() -> None:
    loads = [60, 20, 20, 20, 20, 20]  # 160 tokens on 4 GPUs: 40 each is optimal
    p = eplb([loads], 4, 2, policy="global")
    assert len(p.ranks_of(0)) == 3 and p.shares_of(0) == pytest.approx((1 / 3,) * 3)
    assert p.rank_load(loads).tolist() == pytest.approx([40.0] * 4)
    assert p.slots().tolist() == [2, 2, 2, 2]
    assert balanced([loads], 4).rank_load(loads).max() >= 60  # without replication the hot expert dominates


def test_eplb_hierarchical_keeps_groups_on_nodes() -> None:
    loads = np.array([10, 10, 1, 1, 8, 8, 3, 3])  # 4 groups of 2: [20, 2, 16, 6] -> nodes {g0, g1} | {g2, g3}
    p = eplb([loads], 4, 0, policy="hierarchical", gpus_per_node=2, num_groups=4)
    node = [p.node_of(p.ranks_of(e)[0]) for e in range(8)]
    assert node == [0, 0, 0, 0, 1, 1, 1, 1]
    assert p.rank_load(loads).tolist() == [11.0, 11.0, 11.0, 11.0]
    with pytest.raises(ValueError, match="hierarchical EPLB needs"):
        eplb([loads], 4, 0, policy="hierarchical", gpus_per_node=2, num_groups=1)
    with pytest.raises(ValueError, match="multiple of 4 GPUs"):
        eplb([loads], 4, 1)
    assert eplb([loads], 4, 0, gpus_per_node=2, num_groups=4).strategy == "eplb_hierarchical"  # auto


def test_eplb_replicates_experts_when_gpus_outnumber_them() -> None:
    p = eplb([[5, 1]], 4, 2, policy="global")  # 2 experts, 4 GPUs: 4 slots
    assert p.slots().tolist() == [1, 1, 1, 1] and len(p.ranks_of(0)) == 3


def test_coactivation_grouping_keeps_co_chosen_experts_together() -> None:
    ids = np.array([[[0, 2]], [[1, 3]]] * 50)  # tokens pick {0, 2} or {1, 3}
    t = RoutingTrace.from_topk(ids, [100], 4)
    C = coactivation(t)
    p = coactivation_grouped(C, 2)
    groups = sorted(sorted(p.local_experts(r)) for r in range(2))
    assert groups == [[0, 2], [1, 3]]
    assert p.info["cut"] == 0 and cut_weight(C[0] - np.diag(np.diag(C[0])), np.array([0, 0, 1, 1])) == 100
    assert make_placement("coactivation", t, 2).local_experts(0) in ([0, 2], [1, 3])


def test_make_placement_errors() -> None:
    t = RoutingTrace.from_counts([[[1, 1, 1, 1]]], 1)
    with pytest.raises(ValueError, match="allowed: contiguous"):
        make_placement("random", t, 2)
    with pytest.raises(ValueError, match="need an eplb strategy"):
        make_placement("lpt", t, 2, redundant=2)
    assert make_placement("eplb", t, 2, redundant=2).num_replicas() == 6


def test_eplb_hierarchical_with_redundant_slots_by_hand() -> None:
    """Groups [32, 4, 16, 6] go two to a node by LPT: {g0, g1} | {g2, g3}. Each node gets (8 + 4) / 2 = 6 slots for
    its 4 experts, so 2 extra replicas (at most 2 per expert, one per GPU of the node): node 0 gives them to
    expert 0 (30) and, 0 being capped, expert 1 (ties of 2: lowest id); node 1 to experts 4 and 5 (8 each).
    Packed 3 slots a GPU: node 0 carries 15 + 1 + 2 on each GPU, node 1 4 + 4 + 3."""
    loads = np.array([30, 2, 2, 2, 8, 8, 3, 3])
    p = eplb([loads], 4, 4, policy="hierarchical", gpus_per_node=2, num_groups=4)
    assert [len(p.ranks_of(e)) for e in range(8)] == [2, 2, 1, 1, 2, 2, 1, 1]
    assert all(set(p.ranks_of(e)) <= {0, 1} for e in range(4)) and all(set(p.ranks_of(e)) <= {2, 3}
                                                                       for e in range(4, 8))
    assert p.shares_of(0) == pytest.approx((0.5, 0.5)) and p.slots().tolist() == [3, 3, 3, 3]
    assert p.rank_load(loads).tolist() == pytest.approx([18.0, 18.0, 11.0, 11.0])
