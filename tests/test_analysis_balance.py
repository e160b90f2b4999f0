"""Load-balance metrics against hand-computed values, including the degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moelab.analysis.balance import (
    coactivation,
    coactivation_lift,
    cv,
    drift,
    gini,
    gpu_load,
    hot_cold,
    imbalance,
    js_distance,
    layer_table,
    load_metrics,
    normalized_entropy,
    step_imbalance,
)
from moelab.analysis.placement import Placement
from moelab.analysis.trace import RoutingTrace


def test_metrics_of_1_2_3_4() -> None:
    x = [1, 2, 3, 4]  # mean 2.5, population std sqrt(1.25)
    assert imbalance(x) == pytest.approx(1.6)
    assert cv(x) == pytest.approx(math.sqrt(1.25) / 2.5)
    assert gini(x) == pytest.approx(20 / 80)  # sum over ordered pairs |xi - xj| = 20; 2 n^2 mean = 80
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert normalized_entropy(x) == pytest.approx(-(p * np.log(p)).sum() / math.log(4))  # 0.9232
    assert normalized_entropy(x) == pytest.approx(0.92321, abs=1e-5)


def test_all_on_one_expert() -> None:
    x = [4, 0, 0, 0]
    assert (imbalance(x), gini(x), normalized_entropy(x)) == (4.0, 0.75, 0.0)
    assert cv(x) == pytest.approx(math.sqrt(3))


@pytest.mark.parametrize("x", [[0, 0, 0], [7], [5, 5, 5, 5]])
def test_degenerate_and_balanced_vectors_are_balanced(x: list[int]) -> None:
    m = load_metrics(x)
    assert (m["max/mean"], m["cv"], m["gini"], m["entropy"], m["hot"], m["cold"]) == (1, 0, 0, 1, 0, 0)


def test_bad_vectors() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        gini([])
    with pytest.raises(ValueError, match=">= 0"):
        cv([1, -1])


def test_hot_and_cold_thresholds() -> None:
    hot, cold = hot_cold([10, 1, 1, 0])  # mean 3: hot >= 6, cold <= 0.75
    assert hot.tolist() == [0] and cold.tolist() == [3]
    hot, cold = hot_cold([6, 2, 2, 2])  # mean 3: 6 is exactly 2x the mean
    assert hot.tolist() == [0] and cold.tolist() == []


def test_js_distance_by_hand() -> None:
    assert js_distance([1, 2], [2, 4]) == pytest.approx(0.0)
    assert js_distance([1, 0], [0, 3]) == pytest.approx(1.0)
    # P = (1, 0), Q = (.5, .5), M = (.75, .25): KL(P||M) = log2(4/3), KL(Q||M) = .5 log2(2/3) + .5
    js = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5) / 2
    assert js_distance([1, 0], [1, 1]) == pytest.approx(math.sqrt(js))
    assert math.isnan(js_distance([0, 0], [1, 1]))


def test_drift_and_step_imbalance() -> None:
    counts = np.array([[[2, 0]], [[0, 2]], [[1, 1]], [[0, 0]]])  # 4 steps, 1 layer, 2 experts
    assert drift(counts, 1)[:, 0][:2].tolist() == pytest.approx([1.0, js_distance([0, 2], [1, 1])])
    assert math.isnan(drift(counts, 1)[2, 0])  # the idle last step has no distribution
    assert drift(counts, 2).tolist() == [[pytest.approx(js_distance([2, 2], [1, 1]))]]  # = 0
    assert drift(counts, 3).shape == (0, 1)
    assert step_imbalance(counts)[:, 0].tolist() == [2.0, 2.0, 1.0, 1.0]


def test_coactivation_by_hand() -> None:
    ids = np.array([[[0, 1]], [[0, 2]], [[1, 2]], [[0, 1]]])
    t = RoutingTrace.from_topk(ids, [4], 3)
    C = coactivation(t)[0]
    assert C.tolist() == [[3, 2, 1], [2, 3, 1], [1, 1, 2]]
    lift = coactivation_lift(C, 4)
    assert lift[0, 1] == pytest.approx(2 * 4 / 9) and lift[0, 2] == pytest.approx(1 * 4 / 6) and lift[1, 1] == 0
    with pytest.raises(ValueError, match="per-token top-k ids"):
        coactivation(RoutingTrace.from_counts(t.counts, 2))


def test_layer_table_rows() -> None:
    t = RoutingTrace.from_counts([[[4, 0, 0, 0], [1, 1, 1, 1]], [[4, 0, 0, 0], [1, 1, 1, 1]]], 1, layer_ids=[2, 5])
    df = layer_table(t, drift_window=1)
    assert df["layer"].tolist() == [2, 5, "all layers", "worst layer"]
    assert df["max/mean"].tolist() == [4.0, 1.0, 2.5, 4.0]
    assert df["gini"].tolist() == [0.75, 0.0, 0.375, 0.75]
    assert df["entropy"].tolist()[-1] == 0.0  # worst = the lowest entropy
    assert df["top share"].tolist()[:2] == [1.0, 0.25] and df["drift"].tolist()[:2] == [0.0, 0.0]
    assert df["total"].tolist()[2] == 16


def test_gpu_load_under_a_placement_with_a_replica() -> None:
    t = RoutingTrace.from_counts([[[6, 2, 2, 2]]], 1)
    p = Placement.from_ranks([[[0, 1], [0], [1], [1]]], 2)  # expert 0 split evenly over both ranks
    assert gpu_load(t, p).tolist() == [[5.0, 7.0]]
    with pytest.raises(ValueError, match="does not match"):
        gpu_load(t, Placement.from_ranks([[[0], [1]]], 2))
