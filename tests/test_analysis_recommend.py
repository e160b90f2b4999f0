"""The analytic step model and the recommender."""

from __future__ import annotations

import math

import pytest

from moelab.analysis.hardware import H100, Cluster
from moelab.analysis.layout import Layout, parse_layout
from moelab.analysis.recommend import recommend, recommendation_table
from moelab.analysis.throughput import (
    Workload,
    estimate_run,
    expected_imbalance,
    rank_hit_probability,
    step_time,
)
from moelab.presets import preset_spec
from moelab.roofline import step_floor

ONE = Layout("TP", 1, 1, 1, 1)


def test_workload_parse() -> None:
    assert Workload.parse("in=1024,out=256,batch=64") == Workload(1024, 256, 64)
    assert Workload.parse("input_len=8, output_len=2, b=1").context == 10
    with pytest.raises(ValueError, match="lacks batch"):
        Workload.parse("in=1,out=2")
    with pytest.raises(ValueError, match="bad workload item 'x=1'"):
        Workload.parse("x=1")


def test_imbalance_and_hit_probability_by_hand() -> None:
    assert expected_imbalance(64, 8, 100, 1) == 1.0 and expected_imbalance(64, 8, 0, 8) == 1.0
    # E=128, K=8, T=64 on 8 ranks: mean 64 pairs, var 64 * 8 * 1/8 * 7/8 * 120/127
    sigma = math.sqrt(64 * 8 * (1 / 8) * (7 / 8) * 120 / 127)
    assert expected_imbalance(128, 8, 64, 8) == pytest.approx(1 + sigma * math.sqrt(2 * math.log(8)) / 64)
    # one token, K=2 over 8 ranks of one expert each: max load 1 pair, mean 0.25 -> the cap, 4
    assert expected_imbalance(8, 2, 1, 8) == pytest.approx(4.0)
    assert rank_hit_probability(8, 2, 8) == pytest.approx(1 - 21 / 28)  # 1 - C(7,2)/C(8,2)
    assert rank_hit_probability(64, 8, 1) == 1.0


def test_one_gpu_decode_step_matches_the_roofline_step_floor() -> None:
    spec = preset_spec("olmoe-1b-7b")
    ours = step_time(spec, ONE, Cluster(1), tokens=1, context_tokens=127, key_pairs=128, logits_rows=1)
    ref = step_floor(spec, [1], [128], H100)
    assert ours.seconds == pytest.approx(ref.seconds, rel=0.01)
    assert ours.parts["comm"] == 0 and ours.comm_bytes == 0
    assert ours.parts["weights"] > 0.9 * ours.seconds


def test_tp_adds_all_reduce_time() -> None:
    spec = preset_spec("qwen3-30b-a3b")
    cl = Cluster(2, link_latency=0.0)
    st = step_time(spec, Layout("TP", 2, 1, 2, 1), cl, tokens=64, context_tokens=0, key_pairs=64, logits_rows=64)
    msg = 64 * spec.hidden_size * 2.0
    assert st.parts["comm"] == pytest.approx(2 * spec.num_layers * (2 * 0.5 * msg) / 450e9)
    assert st.comm_bytes == pytest.approx(2 * spec.num_layers * msg)


def test_estimate_run_waves_when_kv_is_short() -> None:
    spec = preset_spec("qwen3-30b-a3b")
    est = estimate_run(spec, ONE, Cluster(1), Workload(4096, 4096, 64))
    assert est is not None and est.waves > 1 and est.concurrency < 64
    assert est.output_tok_s == pytest.approx(64 * 4096 / est.seconds)
    assert estimate_run(preset_spec("mixtral-8x7b"), ONE, Cluster(1), Workload(128, 128, 1)) is None


def test_recommend_ranks_fitting_layouts_first() -> None:
    recs = recommend(preset_spec("mixtral-8x7b"), Cluster(4), Workload(1024, 256, 64))
    fits = [r.fits for r in recs]
    assert fits == sorted(fits, reverse=True) and fits[0] and not fits[-1]
    tok = [r.estimate.output_tok_s for r in recs if r.fits]
    assert tok == sorted(tok, reverse=True)
    assert recs[-1].layout.name == "DP4" and "exceed the usable" in recs[-1].why
    df = recommendation_table(recs)
    assert df["#"].tolist()[0] == 1 and df["#"].tolist()[-1] == "-"
    assert {"layout", "weights GB/GPU", "out tok/s", "total tok/s", "why"} <= set(df.columns)


def test_recommend_on_one_gpu() -> None:
    (r,) = recommend(preset_spec("qwen3-30b-a3b"), Cluster(1), Workload(1024, 256, 64))
    assert r.fits and r.layout.name == "1 GPU" and r.why.startswith("decode: weight reads")
    (m,) = recommend(preset_spec("mixtral-8x7b"), Cluster(1), Workload(1024, 256, 64))
    assert not m.fits and m.why.startswith("does not fit: weights 93.4 GB/GPU")


def test_dpa_ep_dispatch_and_combine_by_hand() -> None:
    """DPA+EP on 8 GPUs of one node: no all-reduce (attention TP 1); each MoE layer sends every token to each of
    the 7 other ranks that holds one of its experts (probability 1 - C(112, 8) / C(128, 8) for Qwen3's 128 experts,
    16 a rank) and gets the results back: 2 x that many vectors of D bf16 values, over the intra-node links."""
    spec = preset_spec("qwen3-30b-a3b")
    cl = Cluster(8, link_latency=0.0)
    st = step_time(spec, parse_layout("dpa+ep", 8), cl, tokens=64, context_tokens=0, key_pairs=64, logits_rows=64,
                   imbalance=1.0)
    hit = 1 - math.comb(112, 8) / math.comb(128, 8)
    out = 64 * hit * 7 * spec.hidden_size * 2.0
    assert st.comm_bytes == pytest.approx(spec.num_moe_layers * 2 * out)
    assert st.parts["comm"] == pytest.approx(spec.num_moe_layers * 2 * out / cl.intra_node_bw)
