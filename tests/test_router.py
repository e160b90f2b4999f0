"""Routing schemes on hand-made logits."""

from __future__ import annotations

import torch

from moelab.layers.moe.router import RouterConfig, route


def test_softmax_topk_renormalized_and_not() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    w, ids = route(logits, RouterConfig(top_k=2))
    assert ids.tolist() == [[3, 2]] and torch.allclose(w, torch.tensor([[0.4, 0.3]]))
    w, _ = route(logits, RouterConfig(top_k=2, norm_topk_prob=True))
    assert torch.allclose(w, torch.tensor([[4 / 7, 3 / 7]]))
    w, _ = route(logits, RouterConfig(top_k=1, norm_topk_prob=True))
    assert torch.allclose(w, torch.tensor([[1.0]]))


def test_group_limited_greedy_picks_inside_best_groups() -> None:
    # 3 groups of 2; group maxima 0.30, 0.25, 0.28 -> topk_group=1 keeps group 0 only
    p = torch.tensor([[0.30, 0.01, 0.25, 0.16, 0.28, 0.00]])
    w, ids = route(torch.log(p + 1e-12), RouterConfig(top_k=2, topk_method="group_limited_greedy", n_group=3,
                                                      topk_group=1, routed_scaling_factor=2.0))
    assert sorted(ids[0].tolist()) == [0, 1]
    assert torch.allclose(w.sort(descending=True).values, torch.tensor([[0.60, 0.02]]), atol=1e-6)


def test_noaux_tc_bias_selects_but_does_not_weigh() -> None:
    logits = torch.zeros(1, 4)  # sigmoid = 0.5 everywhere
    bias = torch.tensor([0.0, 0.0, 1.0, 0.9])  # groups {0,1}: 1.0, {2,3}: 2.9
    cfg = RouterConfig(top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                       norm_topk_prob=True, routed_scaling_factor=2.5)
    w, ids = route(logits, cfg, bias)
    assert sorted(ids[0].tolist()) == [2, 3]
    assert torch.allclose(w, torch.tensor([[1.25, 1.25]]))


def test_noaux_tc_masks_groups_with_minus_inf() -> None:
    # all biased scores negative: a 0.0 fill would let a masked expert win; -inf must not
    logits = torch.full((1, 4), -10.0)
    bias = torch.tensor([-1.0, -1.0, -0.5, -0.6])
    cfg = RouterConfig(top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1)
    _, ids = route(logits, cfg, bias)
    assert sorted(ids[0].tolist()) == [2, 3]
