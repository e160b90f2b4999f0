"""The memory model on published configs, by hand."""

from __future__ import annotations

import pytest

from moelab.analysis.hardware import Cluster, parse_bytes
from moelab.analysis.layout import Layout, candidate_layouts, parse_layout
from moelab.analysis.memory import (
    EngineLimits,
    bytes_per_weight,
    kv_bytes_per_token,
    memory_report,
    weight_bytes,
)
from moelab.presets import PUBLISHED, preset_spec

ONE = Layout("TP", 1, 1, 1, 1)


@pytest.mark.parametrize("preset,gb", [("mixtral-8x7b", 93.4), ("qwen3-30b-a3b", 61.06), ("deepseek-v3", 1342.05),
                                       ("olmoe-1b-7b", 13.84)])
def test_bf16_weights_on_one_gpu_are_two_bytes_per_parameter(preset: str, gb: float) -> None:
    spec = preset_spec(preset)
    w = weight_bytes(spec, ONE)
    assert w.total == pytest.approx(2 * spec.param_counts().total)
    assert w.total / 1e9 == pytest.approx(gb, abs=0.01)
    assert w.total / 1e9 == pytest.approx(2 * PUBLISHED[preset].total / 1e9, rel=0.003)  # 46.7B x 2 = 93.4 GB


def test_quantized_weights() -> None:
    assert bytes_per_weight("fp8", 4096) == 1 + 4 / 16384
    assert bytes_per_weight("int8", 4096) == 1 + 4 / 4096
    with pytest.raises(ValueError, match="allowed: bf16, fp8, int8"):
        bytes_per_weight("fp4", 1)
    spec = preset_spec("mixtral-8x7b")
    w8 = weight_bytes(spec, ONE, "fp8")
    emb = 2 * spec.vocab_size * spec.hidden_size * 2.0  # embedding + LM head stay bf16
    assert w8.embedding_and_head == emb
    linear = spec.param_counts().total - 2 * spec.vocab_size * spec.hidden_size  # norms and router are tiny
    assert w8.total == pytest.approx(emb + linear * (1 + 4 / 16384), rel=1e-4)


def test_tp_splits_and_replicates_the_right_parts() -> None:
    spec = preset_spec("mixtral-8x7b")  # 32 heads, 8 KV heads of 128
    tp2 = weight_bytes(spec, Layout("TP", 2, 1, 2, 1))
    assert tp2.routed_experts == pytest.approx(weight_bytes(spec, ONE).routed_experts / 2)
    # TP16: q and o split 16 ways; each GPU keeps one whole KV head (8 heads replicated twice)
    tp16 = weight_bytes(spec, Layout("TP", 16, 1, 16, 1))
    D, hd = 4096, 128
    per_layer = 2 * D * 32 * hd / 16 + 2 * D * hd * 1
    assert tp16.attention == pytest.approx(32 * per_layer * 2.0)
    ep8 = weight_bytes(spec, Layout("EP", 8, 1, 1, 8))  # one whole expert per GPU per layer
    assert ep8.routed_experts == pytest.approx(32 * 3 * D * 14336 * 2.0)


def test_mla_down_projections_are_replicated() -> None:
    spec = preset_spec("deepseek-v3")
    w1, w8 = weight_bytes(spec, ONE), weight_bytes(spec, Layout("TP", 8, 1, 8, 1))
    D = spec.hidden_size
    down = D * (512 + 64) + 512 + D * 1536 + 1536
    assert w8.attention == pytest.approx(61 * ((spec.attention_params() - down) / 8 + down) * 2.0)
    assert w8.attention > w1.attention / 8


def test_kv_bytes_per_token() -> None:
    mix = preset_spec("mixtral-8x7b")
    assert kv_bytes_per_token(mix, 1) == 32 * 2 * 8 * 128 * 2 == 131072
    assert kv_bytes_per_token(mix, 8) == 16384  # one KV head per GPU
    assert kv_bytes_per_token(mix, 16) == 16384  # replicated once TP > KV heads
    assert kv_bytes_per_token(mix, 1, "fp8") == 65536
    ds = preset_spec("deepseek-v3")
    assert kv_bytes_per_token(ds, 1) == kv_bytes_per_token(ds, 8) == 61 * 576 * 2  # MLA latent is not split


def test_max_batch_and_fit_by_hand() -> None:
    spec = preset_spec("qwen3-30b-a3b")
    lim = EngineLimits(max_num_batched_tokens=1024, max_num_seqs=16, cuda_graph_max_bs=16)
    rep = memory_report(spec, ONE, Cluster(1, gpu_memory=80e9), limits=lim)
    assert rep.budget == 72e9
    per_tok = 48 * 2 * 4 * 128 * 2
    assert rep.kv_per_token == per_tok
    free = 72e9 - rep.weights.total - rep.activations - rep.cuda_graphs
    assert rep.kv_free == pytest.approx(free) and rep.comm_buffers == 0
    assert rep.kv_tokens == int(free // (per_tok * 16)) * 16
    assert rep.max_batch(1000) == rep.kv_tokens // 1008  # 1000 tokens take 63 blocks of 16
    ok, why = rep.fit(rep.max_batch(1000) + 1, 1000)
    assert not ok and "at most" in why and rep.fit(1, 1000)[0]
    assert "exceeds the model's 40960 positions" in rep.fit(1, 50000)[1]


def test_fit_reasons() -> None:
    rep = memory_report(preset_spec("mixtral-8x7b"), ONE, Cluster(1))
    ok, why = rep.fit(1, 1024)
    assert not ok and "weights 93.4 GB/GPU exceed the usable 72.0 GB" in why
    dp = memory_report(preset_spec("qwen3-30b-a3b"), Layout("DP", 1, 2, 1, 1, 2), Cluster(2))
    assert dp.max_batch(1024) == 2 * (dp.kv_tokens // 1024)  # two replicas


def test_layouts() -> None:
    spec = preset_spec("mixtral-8x7b")
    names = [lay.name for lay in candidate_layouts(spec, 16)]
    assert "TP16" in names and "EP8xTP2 (attn TP16)" in names and "EP16 (attn TP16)" not in names  # 8 experts
    assert all(not lay.problems(spec) for lay in candidate_layouts(spec, 16))
    assert Layout("TP", 3, 1, 3, 1).problems(spec)[0].startswith("attention TP3 does not divide 32 heads")
    assert parse_layout("dpa+ep:2", 8) == Layout("DPA+EP", 2, 4, 1, 8)
    assert parse_layout("dpa+ep:2", 8).all_to_all and not parse_layout("ep", 8).all_to_all
    with pytest.raises(ValueError, match="allowed: tp"):
        parse_layout("pp", 8)
    with pytest.raises(ValueError, match="attention uses 4 GPUs"):
        Layout("TP", 4, 1, 2, 1)


def test_parse_bytes_and_cluster() -> None:
    assert parse_bytes("80GB") == 80e9 and parse_bytes("80GiB") == 80 * 2 ** 30 and parse_bytes("1.5e9") == 1.5e9
    with pytest.raises(ValueError, match="bad memory size"):
        parse_bytes("80 gigs")
    c = Cluster(16)
    assert (c.nodes, c.node_size, c.group_bw(8), c.group_bw(16)) == (2, 8, 450e9, 50e9)
    assert Cluster(4).nodes == 1
    with pytest.raises(ValueError, match="whole nodes"):
        Cluster(12)


def test_activations_graphs_and_comm_buffers_by_hand() -> None:
    """The three terms the KV cache gets what is left of, computed by hand from published configs (not from the
    report's own numbers): per token 2 bytes x [3D + q/k/v widths + K_r (D + 3 I / moe_tp)], fp32 logits for
    max_num_seqs rows, the graph pool for the largest captured batch, 256 MiB NCCL (+1 GiB all-to-all)."""
    lim = EngineLimits(max_num_batched_tokens=1024, max_num_seqs=16, cuda_graph_max_bs=16)
    # Qwen3-30B-A3B (GQA): D 2048, 32 q heads, 4 KV heads of 128, top-8 of 128 experts, I 768, V 151936
    per_tok = 2 * (3 * 2048 + (32 + 2 * 4) * 128 + 8 * (2048 + 3 * 768))
    assert per_tok == 92160
    rep = memory_report(preset_spec("qwen3-30b-a3b"), ONE, Cluster(1, gpu_memory=80e9), limits=lim)
    assert rep.activations == 1024 * per_tok + 16 * 151936 * 4 and rep.cuda_graphs == 16 * per_tok
    # DeepSeek-V2-Lite (MLA): 16 heads x (qk 128 + 64, v 128), latent 512 + rope 64, top-6 of 64, I 1408, V 102400
    per_tok = 2 * (3 * 2048 + 16 * (192 + 128) + 512 + 64 + 6 * (2048 + 3 * 1408))
    assert per_tok == 98944
    rep = memory_report(preset_spec("deepseek-v2-lite"), ONE, Cluster(1, gpu_memory=80e9), limits=lim)
    assert rep.activations == 1024 * per_tok + 16 * 102400 * 4 and rep.cuda_graphs == 16 * per_tok
    # 8 GPUs. TP8: heads and expert widths / 8, all-reduce only (256 MiB); DPA+EP: whole heads, 8 local experts
    # take all top-8 pairs, all-to-all buffers (+1 GiB)
    spec = preset_spec("qwen3-30b-a3b")
    tp = memory_report(spec, parse_layout("tp", 8), Cluster(8, gpu_memory=80e9), limits=lim)
    per_tok = 2 * (3 * 2048 + (32 / 8 + 2 * 1) * 128 + 8 * (2048 + 3 * 768 / 8))
    assert tp.activations == pytest.approx(1024 * per_tok + 16 * (151936 // 8) * 4)
    assert tp.comm_buffers == 256 * 2 ** 20
    dpa = memory_report(spec, parse_layout("dpa+ep", 8), Cluster(8, gpu_memory=80e9), limits=lim)
    per_tok = 2 * (3 * 2048 + (32 + 2 * 4) * 128 + 8 * (2048 + 3 * 768))
    assert dpa.activations == pytest.approx(1024 * per_tok + 16 * 151936 * 4)
    assert dpa.comm_buffers == 256 * 2 ** 20 + 2 ** 30
