"""RoutingTrace construction, validation and file round trip; the synthetic baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moelab.analysis.synthetic import parse_baseline, popularity, synthetic_like, synthetic_trace
from moelab.analysis.trace import RoutingTrace, counts_from_topk
from moelab.presets import preset_spec

IDS = np.array([[[0, 1]], [[0, 2]], [[1, 2]], [[0, 1]]])  # 4 tokens, 1 layer, K = 2, E = 3


def test_from_topk_counts_by_hand() -> None:
    t = RoutingTrace.from_topk(IDS, [3, 1], 3, model="m", source="engine")
    assert t.counts.tolist() == [[[2, 2, 2]], [[1, 1, 0]]]
    assert t.tokens.tolist() == [3, 1] and t.num_tokens == 4 and t.has_token_ids
    assert t.step_offsets().tolist() == [0, 3, 4]
    sub = t.steps(1, 2)
    assert sub.counts.tolist() == [[[1, 1, 0]]] and sub.topk_ids.tolist() == [[[0, 1]]]


def test_from_counts_derives_tokens_and_layers() -> None:
    t = RoutingTrace.from_counts([[[2, 0, 2], [1, 1, 2]]], top_k=2, layer_ids=[3, 4])
    assert t.tokens.tolist() == [2] and t.layer_ids == (3, 4) and t.source == "engine"
    assert t.counts.dtype == np.int32 and not t.has_token_ids


@pytest.mark.parametrize("kw,match", [
    (dict(counts=[[[2, 0, 1]]], top_k=2, tokens=[2]), "counts sum to 3"),
    (dict(counts=[[[2, 0, 2]]], top_k=2, source="made-up"), "source 'made-up'"),
    (dict(counts=[[[2, 0, 2]]], top_k=4), "top_k 4 outside"),
    (dict(counts=[[[2, -1, 3]]], top_k=2), ">= 0"),
    (dict(counts=[[2, 0, 2]], top_k=2), r"\[steps, layers, experts\]"),
    (dict(counts=[[[2, 0, 2]]], top_k=2, layer_ids=[0, 1]), "layer_ids"),
])
def test_bad_traces_are_rejected_with_the_reason(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoutingTrace.from_counts(**kw)


def test_ids_must_agree_with_counts() -> None:
    with pytest.raises(ValueError, match="disagree"):
        RoutingTrace.from_counts([[[2, 2, 2]], [[2, 0, 0]]], 2, topk_ids=IDS)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        RoutingTrace.from_topk(np.array([[[0, 3]]]), [1], 3)


@pytest.mark.parametrize("keep_ids", [True, False])
def test_save_load_round_trip(tmp_path: Path, keep_ids: bool) -> None:
    t = synthetic_trace("zipf", 16, 4, layers=3, steps=5, tokens_per_step=32, keep_ids=keep_ids, model="x",
                        spec_fields={"hidden_size": 64})
    u = RoutingTrace.load(t.save(tmp_path / "t.npz"))
    assert np.array_equal(u.counts, t.counts) and np.array_equal(u.tokens, t.tokens)
    assert u.meta() == t.meta() and u.source == "synthetic-zipf" and u.spec_fields == {"hidden_size": 64}
    assert (u.topk_ids is None) == (not keep_ids)
    if keep_ids:
        assert np.array_equal(u.topk_ids, t.topk_ids)
        assert np.allclose(u.topk_weights, t.topk_weights, atol=1e-3)


def test_load_rejects_other_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="lacks the 'meta'"):
        RoutingTrace.load(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="no routing trace"):
        RoutingTrace.load(tmp_path / "missing.npz")


def test_counts_from_topk_is_a_bincount() -> None:
    ids = np.array([[[1, 0], [2, 1]], [[1, 2], [0, 1]]])  # 2 tokens, 2 layers
    assert counts_from_topk(ids, np.array([1, 1]), 3).tolist() == [[[1, 1, 0], [0, 1, 1]], [[0, 1, 1], [1, 1, 0]]]


def test_popularity_shapes() -> None:
    assert np.allclose(popularity("uniform", 4), 0.25)
    z = popularity("zipf", 3, s=1.0)
    assert np.allclose(z, np.array([1, 1 / 2, 1 / 3]) / (11 / 6))
    h = popularity("hotset", 8, hot_fraction=0.25, hot_share=0.6)
    assert np.allclose(h, [0.3, 0.3] + [0.4 / 6] * 6)
    with pytest.raises(ValueError, match="allowed: uniform, zipf, hotset"):
        popularity("pareto", 4)


def test_synthetic_traces_are_labelled_skewed_and_shuffled() -> None:
    z = synthetic_trace("zipf", 32, 4, layers=4, steps=4, tokens_per_step=512, s=1.2, seed=1)
    u = synthetic_trace("uniform", 32, 4, layers=4, steps=4, tokens_per_step=512, seed=1)
    assert z.source == "synthetic-zipf" and u.source == "synthetic-uniform"
    assert z.provenance["s"] == 1.2 and "s" not in u.provenance
    zl, ul = z.counts.sum(axis=0), u.counts.sum(axis=0)
    assert (zl.max(axis=1) / zl.mean(axis=1)).min() > 3 > (ul.max(axis=1) / ul.mean(axis=1)).max()
    # each token's K experts are distinct, and the hottest expert differs between layers (shuffled ids)
    assert all(len(set(row)) == 4 for row in z.topk_ids[:, 0].tolist())
    assert len(set(np.argmax(zl, axis=1).tolist())) > 1
    assert np.allclose(z.topk_weights.sum(axis=2), 1, atol=1e-5)


def test_synthetic_like_copies_the_shape() -> None:
    spec = preset_spec("deepseek-v2-lite")  # layer 0 is dense
    t = synthetic_like(spec, "hotset", steps=2, tokens_per_step=8)
    assert t.layer_ids == tuple(range(1, 27)) and (t.num_experts, t.top_k) == (64, 6)
    assert t.spec_fields["hidden_size"] == 2048
    b = synthetic_like(t, "uniform")
    assert (b.num_layers, b.num_steps, b.num_tokens, b.layer_ids) == (26, 2, 16, t.layer_ids)


def test_parse_baseline() -> None:
    assert parse_baseline("zipf:1.2") == ("zipf", {"s": 1.2})
    assert parse_baseline("hotset:0.1:0.7") == ("hotset", {"hot_fraction": 0.1, "hot_share": 0.7})
    assert parse_baseline("uniform") == ("uniform", {})
    with pytest.raises(ValueError, match="allowed: uniform"):
        parse_baseline("zipf:1:2")


def test_a_baseline_copies_the_traces_own_step_sizes() -> None:
    """A real trace has one large prefill step and many small decode steps; its baseline has the same steps, so
    per-step metrics (step max/mean, drift) compare routing, not step sizes. A uniform trace against its uniform
    baseline: equal within sampling noise (the mean-size steps of before gave 1.59 against 1.87)."""
    from moelab.analysis.synthetic import baseline_summary, synthetic_like, synthetic_trace

    steps = [8192] + [64] * 127
    t = synthetic_trace("uniform", 64, 8, layers=2, steps=128, step_tokens=steps, seed=1)
    b = synthetic_like(t, "uniform", seed=3)
    assert list(b.tokens) == steps and b.num_tokens == t.num_tokens
    s = baseline_summary(t, ["uniform"], 0).set_index("routing")
    assert s.loc["baseline uniform", "step max/mean"] == pytest.approx(s.loc["trace", "step max/mean"], rel=0.05)
    with pytest.raises(ValueError, match="finite number > 0"):
        synthetic_trace("zipf", 8, 2, s=float("nan"))
    with pytest.raises(ValueError, match="step_tokens must be 3 counts"):
        synthetic_trace("uniform", 8, 2, steps=3, step_tokens=[1, 2])
