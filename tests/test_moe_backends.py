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


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("T,E,K,skew", [(1, 8, 2, False), (33, 60, 6, False), (16, 6, 3, True), (9, 64, 8, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_odd_sizes_and_dtypes(name, T, E, K, skew, dtype) -> None:
    """M=1, T not a multiple of any block, E=60, top-6/8, experts with no token, every token on one expert."""
    x, ids, w, w13, w2 = (t.to(dtype) if t.is_floating_point() else t for t in make_case(T, E, K, 32, 16, skew))
    ref = naive_moe(x.float(), ids, w, w13.float(), w2.float())
    out = get_backend(name)(x, ids, w, w13, w2, None)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_grouped_loop_fallback_matches(monkeypatch) -> None:
    from moelab.layers.moe.backends import grouped

    x, ids, w, w13, w2 = make_case(21, 10, 3, 16, 8)
    fused = grouped.grouped_moe(x, ids, w, w13, w2)
    monkeypatch.setattr(grouped, "_has_grouped_mm", lambda *a: False)
    assert torch.allclose(grouped.grouped_moe(x, ids, w, w13, w2), fused, atol=1e-5)


def test_model_output_same_with_grouped_backend(tiny_checkpoints) -> None:
    from moelab.context import ForwardContext, forward_context
    from moelab.models.loader import load_model

    path = tiny_checkpoints["deepseek-v3"]
    ids = torch.randint(4, 320, (11,))
    outs = []
    for backend in ("naive", "grouped"):
        model = load_model(path, moe_backend=backend)
        with torch.no_grad(), forward_context(ForwardContext.for_prompts([11])):
            outs.append(model(ids, torch.arange(11)))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
