"""The floor arithmetic against hand-computed values and the floors published in MEASURING.md."""

from __future__ import annotations

import pytest

from moelab.hf_config import spec_from_hf_config
from moelab.presets import preset_config
from moelab.roofline import Ceilings, moe_layer_floor, offline_run_floor, step_floor, touched_experts_uniform

H100 = Ceilings(bandwidth=3.0e12, matmul=798e12)


def test_touched_experts() -> None:
    assert touched_experts_uniform(64, 8, 1) == pytest.approx(8)
    assert touched_experts_uniform(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))  # 3.5
    assert touched_experts_uniform(64, 8, 10_000) == pytest.approx(64)


@pytest.mark.parametrize("E,K,D,I,M,ms", [(64, 8, 2048, 1024, 1, 0.034), (64, 8, 2048, 1024, 4096, 0.517),
                                          (8, 2, 4096, 14336, 16384, 14.5), (128, 8, 2048, 768, 64, 0.396),
                                          (64, 6, 2048, 1408, 1024, 0.372)])
def test_moe_floor_matches_published_table(E, K, D, I, M, ms) -> None:
    assert moe_layer_floor(E, K, D, I, M, H100).seconds * 1e3 == pytest.approx(ms, rel=0.02)


def test_decode_step_floor_by_hand() -> None:
    spec = spec_from_hf_config(preset_config("olmoe-1b-7b"))
    f = step_floor(spec, [1], [128], H100)
    pc = spec.param_counts()
    b = pc.breakdown
    weights = pc.total - b["routed_experts"] - b["embedding"] + 16 * 8 * spec.expert_params()
    kv = 129 * 16 * 2 * 16 * 128 * 2  # 128 read + 1 written, 16 layers, K and V, 16 heads x 128
    expected = (weights + 2048) * 2 + kv
    assert f.bytes == pytest.approx(expected) and f.bound == "memory"
    assert f.seconds == pytest.approx(expected / 3.0e12)
    assert 0.7e-3 < f.seconds < 0.9e-3  # "about 0.8 ms" in MEASURING.md


def test_decode_step_floor_by_hand_shared_experts_and_mla() -> None:
    """Qwen1.5-MoE (QKV bias, a 5,632-wide shared expert and its gate) and DeepSeek-V2-Lite (MLA with its latent
    cache, a dense first layer, two shared experts), one token at context 128, every weight counted from the
    published shapes here rather than from param_counts."""
    D = 2048
    # Qwen1.5-MoE-A2.7B: 24 layers, 16 heads x 128, 60 experts (top-4) of 1,408, vocab 151,936
    attn = 4 * D * D + 3 * D                                 # q, k, v (with bias), o
    shared = 3 * D * 5632 + D                                # gate, up, down + the shared-expert gate
    layer = attn + shared + 60 * D + 2 * D                   # + router + two norms
    weights = 24 * layer + D + 151936 * D + 24 * 4 * 3 * D * 1408   # + final norm, LM head, touched experts
    kv = 129 * 24 * 2 * 16 * 128 * 2
    spec = spec_from_hf_config(preset_config("qwen1.5-moe-a2.7b"))
    assert step_floor(spec, [1], [128], H100).bytes == pytest.approx((weights + D) * 2 + kv)
    # DeepSeek-V2-Lite: 27 layers, MLA (q 16 x 192, latent 512 + rope 64, v 128), layer 0 dense (10,944),
    # 26 MoE layers of 64 experts (top-6) of 1,408 and two shared ones, vocab 102,400
    mla = D * 16 * 192 + D * 576 + 512 + 512 * 16 * 256 + 16 * 128 * D   # q, kv_a, kv_a norm, kv_b, o
    dense = 3 * D * 10944
    moe_fixed = 2 * 3 * D * 1408 + 64 * D                                 # shared experts + router
    weights = 27 * (mla + 2 * D) + dense + 26 * moe_fixed + D + 102400 * D + 26 * 6 * 3 * D * 1408
    kv = 129 * 27 * (512 + 64) * 2                                        # the latent cache, one row per token
    spec = spec_from_hf_config(preset_config("deepseek-v2-lite"))
    assert step_floor(spec, [1], [128], H100).bytes == pytest.approx((weights + D) * 2 + kv)


def test_tied_embeddings_are_read_once() -> None:
    """Tying the LM head to the embedding table changes the parameter count, not what a step reads or computes."""
    cfg = preset_config("olmoe-1b-7b")
    untied = spec_from_hf_config({**cfg, "tie_word_embeddings": False})
    tied = spec_from_hf_config({**cfg, "tie_word_embeddings": True})
    assert tied.param_counts().total < untied.param_counts().total
    for new, ctx in (([1], [128]), ([128] * 4, [128] * 4)):
        a, b = step_floor(untied, new, ctx, H100), step_floor(tied, new, ctx, H100)
        assert b.bytes == pytest.approx(a.bytes) and b.flops == pytest.approx(a.flops)


def test_prefill_is_compute_bound_and_run_floor_adds_steps() -> None:
    spec = spec_from_hf_config(preset_config("olmoe-1b-7b"))
    assert step_floor(spec, [4096], [4096], H100).bound == "compute"
    run = offline_run_floor(spec, 2, 16, 3, H100)
    parts = [step_floor(spec, [16, 16], [16, 16], H100), step_floor(spec, [1, 1], [17, 17], H100),
             step_floor(spec, [1, 1], [18, 18], H100)]
    assert run.seconds == pytest.approx(sum(p.seconds for p in parts))


def test_touched_must_cover_every_moe_layer() -> None:
    spec = spec_from_hf_config(preset_config("deepseek-v2-lite"))  # 26 MoE layers of 27
    with pytest.raises(ValueError, match="26 MoE layers"):
        step_floor(spec, [1], [1], H100, touched=[6.0] * 27)
