"""The placement simulator on traces small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.analysis.hardware import Cluster
from moelab.analysis.placement import Placement, contiguous, round_robin
from moelab.analysis.simulate import compare, simulate, source_ranks
from moelab.analysis.trace import RoutingTrace
from moelab.roofline import moe_layer_floor

D, I = 8, 4
CLUSTER = Cluster(2, intra_node_bw=1e9, inter_node_bw=1e8, link_latency=1e-6)


def _trace(ids: list[list[int]], E: int = 4) -> RoutingTrace:
    a = np.array(ids)[:, None, :]  # [T, 1 layer, K]
    return RoutingTrace.from_topk(a, [len(ids)], E, spec_fields=dict(hidden_size=D, moe_intermediate_size=I))


def test_source_ranks_split_the_step_in_blocks() -> None:
    assert source_ranks(4, 2).tolist() == [0, 0, 1, 1]
    assert source_ranks(5, 2).tolist() == [0, 0, 0, 1, 1]


def test_contiguous_keeps_tokens_local_round_robin_sends_half() -> None:
    t = _trace([[0], [1], [2], [3]])  # tokens 0, 1 start on rank 0; tokens 2, 3 on rank 1
    local = simulate(t, contiguous(4, 2), CLUSTER)  # experts {0, 1} on rank 0, {2, 3} on rank 1
    assert local.dispatch_bytes.tolist() == [[0.0]] and local.comm_s.tolist() == [[0.0]]
    rr = simulate(t, round_robin(4, 2), CLUSTER)  # token 1 -> rank 1, token 2 -> rank 0
    assert rr.dispatch_bytes.tolist() == [[2 * D * 2.0]]
    one_way = D * 2.0 / 1e9 + 1e-6  # each rank sends and receives one vector
    assert rr.comm_s[0, 0] == pytest.approx(2 * one_way)
    assert rr.step_rank_load.tolist() == [[[2.0, 2.0]]]
    floor = moe_layer_floor(2, 1, D, I, 2.0, CLUSTER.ceilings, touched=2.0).seconds
    assert rr.compute_s[0, 0] == pytest.approx(floor)
    assert rr.step_s[0] == pytest.approx(floor + 2 * one_way)


def test_a_token_is_sent_once_per_remote_rank() -> None:
    t = _trace([[2, 3], [2, 3]], E=4)  # token 0 starts on rank 0, token 1 on rank 1; experts 2, 3 on rank 1
    r = simulate(t, contiguous(4, 2), CLUSTER)
    assert r.dispatch_bytes.tolist() == [[1 * D * 2.0]]  # token 0 once to rank 1; token 1 is already there
    assert r.step_rank_load.tolist() == [[[0.0, 4.0]]] and r.step_imbalance.tolist() == [[2.0]]


def test_without_ids_pairs_count_from_every_other_rank() -> None:
    t = RoutingTrace.from_counts([[[4, 0, 0, 0]]], 1, spec_fields=dict(hidden_size=D, moe_intermediate_size=I))
    r = simulate(t, contiguous(4, 2), CLUSTER)
    assert r.step_rank_load.tolist() == [[[4.0, 0.0]]]
    assert r.dispatch_bytes.tolist() == [[4 * 0.5 * D * 2.0]]  # half of expert 0's pairs come from rank 1
    assert not r.dedup and r.summary()["dedup"] == "pairs (no ids)"


def test_replicas_split_traffic_by_share() -> None:
    ids = [[0]] * 400
    t = _trace(ids, E=2)
    p = Placement.from_ranks([[[0, 1], [1]]], 2, shares=[[[0.25, 0.75], [1.0]]])
    r = simulate(t, p, CLUSTER, seed=3)
    load = r.step_rank_load[0, 0]
    assert load.sum() == 400 and abs(load[0] - 100) < 30


def test_inter_node_traffic_uses_the_network() -> None:
    cl = Cluster(2, gpus_per_node=1, intra_node_bw=1e9, inter_node_bw=1e8, link_latency=0.0)
    t = _trace([[0], [1], [2], [3]])
    r = simulate(t, round_robin(4, 2), cl)
    assert r.inter_node_bytes.tolist() == r.dispatch_bytes.tolist()
    assert r.comm_s[0, 0] == pytest.approx(2 * D * 2.0 / 1e8)
    assert r.summary()["inter-node %"] == pytest.approx(100.0)


def test_compare_and_errors() -> None:
    t = _trace([[0], [1], [2], [3]])
    df = compare(t, {"c": contiguous(4, 2), "r": round_robin(4, 2)}, CLUSTER)
    assert df["strategy"].tolist() == ["c", "r"] and df["a2a MB/step"].tolist()[0] == 0
    with pytest.raises(ValueError, match="placement has 4 ranks"):
        simulate(t, contiguous(4, 4), CLUSTER)
    bare = RoutingTrace.from_counts(t.counts, 1)
    with pytest.raises(ValueError, match="hidden_size"):
        simulate(bare, contiguous(4, 2), CLUSTER)


def test_the_slowest_rank_sets_the_step_and_pooled_imbalance_is_averaged_over_layers() -> None:
    """Uneven ranks: 3 of 4 tokens on rank 0's experts. The step's compute is rank 0's floor (the slowest), not
    rank 1's; step max/mean is 3 / 2; the pooled max/mean is the mean over layers of each layer's whole-trace
    max/mean (here two layers: one even, one 3:1)."""
    ids = np.array([[[0], [0]], [[1], [1]], [[0], [2]], [[1], [3]]])  # [T=4, L=2, K=1]
    t = RoutingTrace.from_topk(ids, [4], 4, spec_fields=dict(hidden_size=D, moe_intermediate_size=I))
    r = simulate(t, contiguous(4, 2), CLUSTER)  # experts {0, 1} on rank 0, {2, 3} on rank 1
    assert r.step_rank_load[0].tolist() == [[4.0, 0.0], [2.0, 2.0]]
    slow = moe_layer_floor(2, 1, D, I, 4.0, CLUSTER.ceilings, touched=2.0).seconds
    idle = moe_layer_floor(2, 1, D, I, 0.0, CLUSTER.ceilings, touched=0.0).seconds
    assert slow > idle and r.compute_s[0, 0] == pytest.approx(slow)
    s = r.summary()
    assert s["step max/mean"] == pytest.approx((2.0 + 1.0) / 2)
    assert s["pooled max/mean"] == pytest.approx((2.0 + 1.0) / 2)
