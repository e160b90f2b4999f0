"""The triton MoE pieces against their references: moe_align vs moe_align_ref, fused_moe vs naive, configs.

On the CPU these run under the Triton interpreter (conftest sets TRITON_INTERPRET=1): fp32 and fp16 only,
since bf16 `tl.dot` is wrong there (bf16 is checked on the GPU by scripts/bench_moe_gpu.py).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from conftest import DEV  # noqa: E402

from moelab.kernels import fused_moe as fm  # noqa: E402
from moelab.kernels.fused_moe_config import (  # noqa: E402
    GemmConfig,
    MoEConfig,
    config_file_name,
    get_config,
    heuristic_config,
    load_config_file,
    save_config_file,
    tuned_configs,
)
from moelab.kernels.moe_align import moe_align, moe_align_quant, moe_align_ref, padded_size  # noqa: E402
from moelab.kernels.moe_sum import moe_sum, moe_sum_ref  # noqa: E402
from moelab.layers.moe.backends import naive_moe  # noqa: E402


def routing(T: int, E: int, K: int, mode: str = "uniform") -> torch.Tensor:
    """[T, K] distinct experts per token. "skew": slot 0 of every token on expert 0; "one": every token on
    experts 0..K-1 (the other experts get no token)."""
    if mode == "one":
        return torch.arange(K).repeat(T, 1)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    if mode == "skew":
        ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(E - 1)[:K - 1]])
                           for _ in range(T)])
    return ids


def assert_align_equal(ids: torch.Tensor, E: int, block_m: int, out=None, **kw) -> None:
    """Same runs, blocks and total as the reference; inside a run the Triton order may differ (atomics).
    out: an AlignedRouting already computed (else moe_align's)."""
    out, ref = out if out is not None else moe_align(ids, E, block_m, **kw), moe_align_ref(ids, E, block_m)
    n = int(ref.num_padded)
    assert out.sorted_ids.numel() == padded_size(ids.numel(), E, block_m)
    assert int(out.num_padded) == n and n % block_m == 0
    assert torch.equal(out.expert_ids, ref.expert_ids)
    run = ref.expert_ids.long().repeat_interleave(block_m)[:n]  # expert of each row in use

    def canonical(a):  # rows sorted within each expert's run
        return torch.sort(run * (ids.numel() + 1) + a.sorted_ids[:n].long()).values

    assert torch.equal(canonical(out), canonical(ref))


@pytest.mark.parametrize("T,E,K,block_m,mode", [(1, 64, 8, 16, "uniform"), (33, 60, 6, 16, "uniform"),
                                                (16, 6, 3, 32, "skew"), (100, 8, 2, 64, "one"),
                                                (3, 256, 2, 16, "uniform"), (1, 1, 1, 128, "uniform")])
def test_align_matches_ref(T, E, K, block_m, mode) -> None:
    ids = routing(T, E, K, mode).to(DEV)
    assert_align_equal(ids, E, block_m)


@pytest.mark.parametrize("single", [1, 64])
def test_align_chunked_matches_ref(single) -> None:
    """The count + place launches (several chunks), with uneven chunk sizes and one hot expert."""
    ids = routing(300, 60, 6, "skew").to(DEV)
    assert_align_equal(ids, 60, 32, single_program_slots=single)


@pytest.mark.parametrize("T,K,D,single,chunk", [(5, 2, 48, None, None), (1, 6, 300, None, None),
                                                (40, 4, 100, 16, 16), (30, 6, 64, 1, 16), (30, 6, 64, 1, None)])
def test_align_quant_is_align_plus_per_token_quant(T, K, D, single, chunk, monkeypatch) -> None:
    """moe_align_quant's extra programs (in the one-program launch, or in the count launch of the chunked
    path, with one chunk or several) give per_token_quant's values; the routing is moe_align's."""
    import moelab.kernels.moe_align as ma
    from moelab.kernels.per_token_quant import per_token_quant

    if chunk:
        monkeypatch.setattr(ma, "CHUNK_SLOTS", chunk)  # several count/place programs before the quant ones
    ids = routing(T, 60, K, "skew").to(DEV)
    x = (torch.randn(T, D) * 10.0 ** torch.randint(-3, 3, (T, 1))).to(DEV)
    r, q, s = moe_align_quant(ids, 60, 16, x, single_program_slots=single)
    q0, s0 = per_token_quant(x)
    assert torch.equal(q.float(), q0.float()) and torch.equal(s, s0)
    assert_align_equal(ids, 60, 16, out=r)
    with pytest.raises(ValueError, match="moe_align_quant: want x"):
        moe_align_quant(ids, 60, 16, x[:-1])


def test_align_ref_layout() -> None:
    """Each expert's run is contiguous, in slot order, padded with the sentinel T*K up to the block size."""
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    a = moe_align_ref(ids, 4, 4)
    assert a.sorted_ids.tolist()[:12] == [1, 4, 6, 6, 3, 6, 6, 6, 0, 2, 5, 6]
    assert a.expert_ids.tolist() == [0, 1, 2, -1, -1] and int(a.num_padded) == 12


@pytest.mark.parametrize("T,K,D", [(1, 8, 48), (37, 6, 20), (5, 1, 2050)])
def test_moe_sum_matches_ref(T, K, D) -> None:
    y = torch.randn(T * K, D, device=DEV)
    assert torch.allclose(moe_sum(y, K), moe_sum_ref(y, K), atol=1e-5)


def case(T: int, E: int, K: int, D: int, I: int, mode: str, dtype: torch.dtype):
    x = torch.randn(T, D)
    w = torch.rand(T, K)
    w13, w2 = torch.randn(E, 2 * I, D) / D ** 0.5, torch.randn(E, D, I) / I ** 0.5
    ids = routing(T, E, K, mode)
    return x.to(DEV, dtype), ids.to(DEV), w.to(DEV), w13.to(DEV, dtype), w2.to(DEV, dtype)


# M=1 (naive blocks), M not a multiple of any block, E=60 top-6, empty experts, one hot expert, every token on
# the same experts, top-1, D/I not multiples of 16, two tokens on naive blocks.
CASES = [(1, 8, 2, 32, 16, "uniform"), (33, 60, 6, 32, 16, "uniform"), (16, 6, 3, 32, 16, "skew"),
         (20, 4, 2, 32, 16, "one"), (9, 64, 1, 16, 16, "uniform"), (21, 10, 3, 40, 24, "uniform"),
         (7, 5, 2, 20, 12, "skew"), (2, 64, 4, 24, 40, "uniform")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,E,K,D,I,mode", CASES)
def test_fused_moe_matches_naive(T, E, K, D, I, mode, dtype) -> None:
    x, ids, w, w13, w2 = case(T, E, K, D, I, mode, dtype)
    ref = naive_moe(x.float(), ids, w, w13.float(), w2.float())
    out = fm.fused_moe(x, ids, w, w13, w2)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


def test_fused_moe_ref_matches_naive() -> None:
    x, ids, w, w13, w2 = case(13, 12, 4, 16, 8, "uniform", torch.float32)
    assert torch.allclose(fm.fused_moe_ref(x, ids, w, w13, w2), naive_moe(x, ids, w, w13, w2), atol=1e-5)


@pytest.mark.parametrize("block_m,gate_up,down", [(32, GemmConfig(32, 16), GemmConfig(16, 32)),
                                                  (16, GemmConfig(16, 64, group_m=4), GemmConfig(64, 16, 3))])
def test_fused_moe_any_tile_config(block_m, gate_up, down) -> None:
    """Tiles wider than the matrix, group_m > 1, BLOCK_K not dividing D or I."""
    x, ids, w, w13, w2 = case(40, 6, 2, 48, 24, "uniform", torch.float32)
    out = fm.fused_moe(x, ids, w, w13, w2, config=MoEConfig(block_m, gate_up, down))
    ref = naive_moe(x, ids, w, w13, w2)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_fused_moe_empty_batch() -> None:
    x, ids, w, w13, w2 = case(1, 4, 2, 16, 16, "uniform", torch.float32)
    out = fm.fused_moe(x[:0], ids[:0], w[:0], w13, w2)
    assert out.shape == (0, 16)


def test_fused_moe_shape_errors() -> None:
    x, ids, w, w13, w2 = case(3, 4, 2, 16, 16, "uniform", torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        fm.fused_moe(x, ids, w, w13, w2[:, :8])
    with pytest.raises(ValueError, match="topk_weights"):
        fm.fused_moe(x, ids, w[:, :1], w13, w2)
    with pytest.raises(ValueError, match="share one of"):
        fm.fused_moe(x.half(), ids, w, w13, w2)
    with pytest.raises(ValueError, match="int32/int64"):
        fm.fused_moe(x, ids.float(), w, w13, w2)


def test_heuristic_configs_cover_any_shape() -> None:
    for M in (1, 7, 64, 1000, 20000):
        for E, K, N, D in ((8, 2, 14336, 4096), (128, 8, 768, 2048), (60, 6, 24, 40)):
            cfg = heuristic_config(M, E, K, N, D, "bfloat16")
            assert cfg.block_m in (16, 32, 64, 128) and min(cfg.gate_up.block_n, cfg.down.block_k) >= 16
            # float32: half the K step, the same bytes per stage as bf16's tiles (full width ran out of shared
            # memory on the H200: 262 KB asked, 227 KB there)
            f32 = heuristic_config(M, E, K, N, D, "float32")
            assert f32.block_m == cfg.block_m and f32.gate_up.block_n == cfg.gate_up.block_n
            assert (f32.gate_up.block_k, f32.down.block_k) == (cfg.gate_up.block_k // 2, cfg.down.block_k // 2)


def test_tuned_config_file_round_trip_and_nearest_m(tmp_path) -> None:
    name = config_file_name(64, 1024, 2048, "NVIDIA H100 80GB HBM3", "bfloat16")
    assert name == "E=64,N=1024,D=2048,device=NVIDIA_H100_80GB_HBM3,dtype=bf16.json"
    small, large = MoEConfig(16, GemmConfig(32, 128), GemmConfig(64, 128)), MoEConfig(
        128, GemmConfig(128, 64, 16, 8, 3), GemmConfig(128, 64, 8, 8, 4))
    save_config_file(tmp_path / name, {1: small, 4096: large}, note="test")
    assert load_config_file(tmp_path / name) == {1: small, 4096: large}
    assert json.loads((tmp_path / name).read_text())["_note"] == "test"
    table = tuned_configs(64, 1024, 2048, "NVIDIA H100 80GB HBM3", "bfloat16", str(tmp_path))
    assert table[4096] == large
    # no file for this device: the heuristic
    assert get_config(5, 64, 8, 1024, 2048, "bfloat16", "cuda", "no-such-gpu") == heuristic_config(
        5, 64, 8, 1024, 2048, "bfloat16")


def test_fp8_tensor_and_channel_share_a_tuned_table_block_scales_do_not(tmp_path) -> None:
    tuned = {1: MoEConfig(16, GemmConfig(32, 512), GemmConfig(64, 512, tma=True))}
    save_config_file(tmp_path / config_file_name(64, 1024, 2048, "NVIDIA H200", "fp8_channel"), tuned)
    args = (1, 64, 8, 1024, 2048)
    for fmt in ("fp8_channel", "fp8_tensor"):
        assert get_config(*args, fmt, "cuda", "NVIDIA H200", str(tmp_path)) == tuned[1]
    assert get_config(*args, "fp8_block", "cuda", "NVIDIA H200", str(tmp_path)) == heuristic_config(
        *args, "fp8_block")


def test_fp8_heuristic_tiles() -> None:
    """1-byte operands get 128-wide K steps where bf16 takes 64; block scales keep every K step inside one
    128-wide scale block and, at large M, narrow gate_up tiles (the bf16-sized ones spilled registers)."""
    for M in (1, 16, 4096, 16384):
        for fmt in ("fp8_tensor", "fp8_channel", "fp8_block"):
            c = heuristic_config(M, 64, 8, 1024, 2048, fmt)
            assert fmt != "fp8_block" or max(c.gate_up.block_k, c.down.block_k) <= 128
    for fmt in ("fp8_channel", "fp8_block"):  # streaming tiles wide enough for the transposed wgmma products
        c = heuristic_config(1, 64, 8, 1024, 2048, fmt)
        assert fm.swap_ab(c.block_m, c.gate_up, torch.float8_e4m3fn) and fm.swap_ab(c.block_m, c.down,
                                                                                     torch.float8_e4m3fn)
    big = heuristic_config(16384, 64, 8, 1024, 2048, "fp8_block")
    assert big.gate_up.block_n == 64 and big.block_m == 128
    assert heuristic_config(4096, 64, 8, 1024, 2048, "fp8_channel").gate_up.block_k == 128
    assert heuristic_config(4096, 64, 8, 1024, 2048, "bfloat16").gate_up.block_k == 64


def test_a_gpu_without_its_own_tuned_file_uses_its_familys() -> None:
    from moelab.kernels.fused_moe_config import tuned_configs

    h100 = tuned_configs(8, 14336, 4096, "NVIDIA H100 80GB HBM3", "bf16")  # Mixtral: tuned on the H100 only
    assert h100 and tuned_configs(8, 14336, 4096, "NVIDIA H200", "bf16") == h100
    assert tuned_configs(8, 14336, 4096, "NVIDIA H800", "bf16") == h100
    own = tuned_configs(64, 1024, 2048, "NVIDIA H200", "bf16")  # OLMoE: the H200's own file wins
    assert own and own != tuned_configs(64, 1024, 2048, "NVIDIA H100 80GB HBM3", "bf16")
    assert tuned_configs(64, 1024, 2048, "Tesla T4", "bf16") is None
    assert tuned_configs(64, 1024, 2048, "NVIDIA H200", "fp8_tensor") is None  # no tuned file of that dtype


def test_tuned_entry_decides_between_one_token_gemvs_and_tiles(monkeypatch) -> None:
    """One token on a GPU (moelab.device.is_gpu patched): fused_moe takes the GEMVs unless the config it picks says
    gemv false; an explicit config always asks for the tiles. Tables round-trip the choice and refuse other keys."""
    from dataclasses import replace

    import moelab.device
    from moelab.kernels.fused_moe_config import GemmConfig, MoEConfig

    monkeypatch.setattr(moelab.device, "is_gpu", lambda t: True)
    tiles = MoEConfig(16, GemmConfig(32, 32), GemmConfig(32, 32))
    calls = []
    monkeypatch.setattr(fm, "fused_moe_gemv", lambda *a, **k: calls.append("gemv") or "gemv")
    monkeypatch.setattr(fm, "route", lambda *a, **k: (_ for _ in ()).throw(LookupError("tiles")))
    x, w13, w2 = torch.randn(1, 32), torch.randn(4, 64, 32), torch.randn(4, 32, 32)
    ids, wts = torch.tensor([[0, 2]]), torch.full((1, 2), 0.5)
    for cfg, want in ((tiles, "gemv"), (replace(tiles, gemv=False), "tiles")):
        monkeypatch.setattr(fm, "config_for", lambda *a, _c=cfg, **k: _c)
        calls.clear()
        if want == "gemv":
            assert fm.fused_moe(x, ids, wts, w13, w2) == "gemv" and calls == ["gemv"]
        else:
            with pytest.raises(LookupError, match="tiles"):
                fm.fused_moe(x, ids, wts, w13, w2)
            assert not calls
    with pytest.raises(LookupError, match="tiles"):  # an explicit config: the tiles, whatever its gemv says
        fm.fused_moe(x, ids, wts, w13, w2, config=tiles)
    off = replace(tiles, gemv=False)
    assert MoEConfig.from_dict(off.to_dict()) == off and "gemv" not in tiles.to_dict()
    assert MoEConfig.from_dict(tiles.to_dict()) == tiles
    with pytest.raises(ValueError, match="gemv"):
        MoEConfig.from_dict({**tiles.to_dict(), "gemv": "no"})
    with pytest.raises(ValueError, match="block_m, gate_up, down"):
        MoEConfig.from_dict({**tiles.to_dict(), "gemm": False})
