"""Every MoE backend against the naive oracle; the oracle against a dense per-token computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.layers.moe.backends import BACKENDS, get_backend, naive_moe


def dense_moe(x, ids, w, w13, w2):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k]
            g, u = (w13[e] @ x[t]).chunk(2)
            out[t] += w[t, k] * (w2[e] @ (F.silu(g) * u))
    return out


def make_case(T, E, K, D, I, skew=False):
    x = torch.randn(T, D)
    if skew:  # every token on expert 0 first
        ids = torch.stack([torch.zeros(T, dtype=torch.long)] + [torch.randint(1, E, (T,)) for _ in range(K - 1)], 1)
    else:
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    return x, ids, w, torch.randn(E, 2 * I, D) / D ** 0.5, torch.randn(E, D, I) / I ** 0.5


@pytest.mark.parametrize("T,E,K,D,I,skew", [(1, 8, 2, 16, 8, False), (7, 60, 6, 32, 24, False),
                                            (33, 6, 3, 16, 8, True), (5, 64, 1, 8, 4, False)])
def test_naive_matches_dense(T, E, K, D, I, skew) -> None:
    x, ids, w, w13, w2 = make_case(T, E, K, D, I, skew)
    assert torch.allclose(naive_moe(x, ids, w, w13, w2), dense_moe(x, ids, w, w13, w2), atol=1e-5)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backends_match_naive(name) -> None:
    x, ids, w, w13, w2 = make_case(17, 12, 3, 32, 16)
    ref = naive_moe(x, ids, w, w13, w2)
    out = get_backend(name)(x, ids, w, w13, w2, None)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_unknown_backend_lists_available() -> None:
    with pytest.raises(ValueError, match="available: naive"):
        get_backend("cutlass")
