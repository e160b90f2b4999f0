"""Quantized experts: format round trips, the naive oracle against a dense dequantized computation, the triton
backend against the oracle for every format (under the Triton interpreter on the CPU, whose fp8 dots are right;
its fp32 -> fp8 cast is not, which per_token_quant rounds around), and the checkpoint converter and collector."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DEV
from safetensors import safe_open
from test_moe_backends import dense_moe, make_case

from moelab.layers.moe.backends import BACKENDS, naive_moe
from moelab.layers.moe.quant import (
    BLOCK,
    FORMATS,
    QuantScales,
    dequantize,
    fake_quant_per_token,
    is_w8a8,
    quantize_experts,
    quantize_weight,
)

# triton against the dequantized oracle: the interpreter computes exactly what the oracle does; on the GPU fp8 tensor
# cores accumulate with fewer bits, float32 operands run as tf32, and an h value at an fp8 rounding boundary moves by
# one fp8 step when its float32 sum differs in the last bit; the GPU figure is the kernel bench's check (2e-2).
ORACLE_TOL = 1e-5 if DEV == "cpu" else 2e-2
# worst relative error of one quantize-dequantize round trip (fp8 e4m3: 3 mantissa bits; int8: 127 levels)
ROUND_TRIP = {"fp8_tensor": 0.06, "fp8_channel": 0.06, "fp8_block": 0.06, "int8_channel": 0.02}


def weights(E: int, D: int, I: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(E, 2 * I, D) / D ** 0.5, torch.randn(E, D, I) / I ** 0.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def flag_ab(monkeypatch, flag: str, args: list, **kw) -> dict[bool, torch.Tensor]:
    """{False: layer, True: layer}: fused_moe with the fused_moe module flag off and on."""
    from moelab.kernels import fused_moe as fm

    outs = {}
    for on in (False, True):
        monkeypatch.setattr(fm, flag, on)
        outs[on] = fm.fused_moe(*args, **kw).cpu()
    return outs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D,I", [(64, 32), (200, 136)])  # 136, 200: blocks cut short at the edges
def test_round_trip(fmt, D, I) -> None:
    w13, w2 = weights(3, D, I)
    w13[1] *= 50  # experts of very different ranges
    w2[0, :, : I // 2] = 0  # all-zero channels / blocks get a tiny scale, not NaN
    q13, q2, s = quantize_experts(w13.bfloat16(), w2, fmt)
    d13, d2 = dequantize(q13, q2, s)
    assert d13.dtype == torch.float32 and torch.isfinite(d13).all() and torch.isfinite(d2).all()
    assert rel(d13, w13) < ROUND_TRIP[fmt] and rel(d2, w2) < ROUND_TRIP[fmt]
    E, nb = 3, math.ceil(I / BLOCK)
    want = {"fp8_tensor": ((E,), (E,)), "fp8_channel": ((E, 2 * I), (E, D)), "int8_channel": ((E, 2 * I), (E, D)),
            "fp8_block": ((E, 2 * nb, math.ceil(D / BLOCK)), (E, math.ceil(D / BLOCK), nb))}[fmt]
    assert (tuple(s.w13_scale.shape), tuple(s.w2_scale.shape)) == want
    assert q13.dtype == (torch.float8_e4m3fn if is_w8a8(fmt) else torch.int8)
    assert (d2[0, :, : I // 2] == 0).all()


def test_block_scales_are_per_block() -> None:
    """One large value raises the scale of its own 128x128 block only; gate and up rows are blocked apart."""
    w = torch.randn(1, 2 * 136, 256) * 0.01
    w[0, 5, 200] = 10.0  # gate block (0, 1)
    q, s = quantize_weight(w, "fp8_block", halves=2)
    assert s.shape == (1, 4, 2)
    assert s[0, 0, 1] == 10.0 / 448 and (s.flatten().argmax() == 1)
    assert s[0, 2:].max() < 0.1 / 448  # up blocks do not see it


def test_int8_is_symmetric_per_channel() -> None:
    w = torch.randn(2, 8, 32)
    q, s = quantize_weight(w, "int8_channel")
    assert q.abs().max() == 127 and torch.allclose(s, w.abs().amax(-1) / 127)


def test_fake_quant_per_token() -> None:
    x = torch.randn(5, 40) * torch.tensor([1e-3, 1.0, 1e3, 0.0, 7.0])[:, None]
    y = fake_quant_per_token(x)
    assert torch.isfinite(y).all() and (y[3] == 0).all()
    assert ((y - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-30))[[0, 1, 2, 4]].max() < 0.06
    assert torch.equal(y.abs().amax(1), x.abs().amax(1))  # the largest value of a row is exact


def test_bad_input() -> None:
    w13, w2 = weights(2, 16, 8)
    with pytest.raises(ValueError, match="available: fp8_tensor"):
        quantize_experts(w13, w2, "int4")
    with pytest.raises(ValueError, match="want w13"):
        quantize_experts(w13, w2[:, :8], "fp8_channel")
    q13, q2, s = quantize_experts(w13, w2, "fp8_channel")
    with pytest.raises(ValueError, match="do not fit"):
        naive_moe(torch.randn(2, 16), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), q13, q2,
                  QuantScales("fp8_channel", s.w13_scale[:, :4], s.w2_scale))
    with pytest.raises(ValueError, match="must be"):
        naive_moe(torch.randn(2, 16), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), w13, w2, s)


def dense_quantized(x, ids, w, q13, q2, s):
    """Per token and slot, in float32: dequantized weights; fp8 formats round x and h per token."""
    d13, d2 = dequantize(q13, q2, s)
    xq = fake_quant_per_token(x) if is_w8a8(s.format) else x
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            g, u = (d13[ids[t, k]] @ xq[t]).chunk(2)
            h = torch.nn.functional.silu(g) * u
            h = fake_quant_per_token(h[None])[0] if is_w8a8(s.format) else h
            out[t] += w[t, k] * (d2[ids[t, k]] @ h)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T,E,K,D,I,skew", [(1, 8, 2, 16, 8, False), (7, 60, 6, 32, 24, False),
                                            (9, 6, 3, 16, 8, True)])
def test_naive_quantized_matches_dense(fmt, T, E, K, D, I, skew) -> None:
    x, ids, w, w13, w2 = make_case(T, E, K, D, I, skew)
    q13, q2, s = quantize_experts(w13, w2, fmt)
    out = naive_moe(x, ids, w, q13, q2, s)
    assert torch.allclose(out, dense_quantized(x, ids, w, q13, q2, s), atol=1e-5)
    assert rel(out, dense_moe(x, ids, w, w13, w2)) < (0.12 if is_w8a8(fmt) else 0.03)  # the format's own error


# M=1 (decode blocks), E=60 top-6 with experts that get no token, all
# tokens on one expert, sizes that are not multiples of any block (D 40 / 200, I 24 / 136: edge blocks of the
# 128x128 scales), top-1, two tokens on decode blocks with odd sizes.
TRITON_CASES = [(1, 8, 2, 32, 16, "uniform"), (5, 60, 6, 32, 16, "uniform"), (12, 6, 3, 40, 24, "skew"),
                (10, 4, 2, 32, 16, "one"), (6, 3, 1, 200, 136, "uniform"), (2, 64, 4, 200, 136, "uniform")]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T,E,K,D,I,mode", TRITON_CASES)
def test_triton_quantized_matches_naive(fmt, T, E, K, D, I, mode) -> None:
    from test_fused_moe import routing

    x, w = torch.randn(T, D), torch.rand(T, K)
    w13, w2 = weights(E, D, I)
    q13, q2, s = quantize_experts(w13, w2, fmt)
    ids = routing(T, E, K, mode)
    ref = naive_moe(x, ids, w, q13, q2, s)
    to = (lambda t: t.to(DEV))  # noqa: E731
    s_dev = QuantScales(fmt, to(s.w13_scale), to(s.w2_scale))
    out = BACKENDS["triton"](to(x), to(ids), to(w), to(q13), to(q2), s_dev).cpu()
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert rel(out, ref) < ORACLE_TOL, rel(out, ref)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
def test_triton_quantized_tile_configs() -> None:
    """BLOCK_K 256 is capped at 128 for block scales; TMA and group_m > 1 tiles; fp16 activations."""
    from moelab.kernels import fused_moe as fm
    from moelab.kernels.fused_moe_config import GemmConfig, MoEConfig

    x, ids, w, w13, w2 = make_case(40, 6, 2, 256, 136)
    for fmt in ("fp8_block", "int8_channel", "fp8_channel"):
        q13, q2, s = quantize_experts(w13, w2, fmt)
        ref = naive_moe(x.half(), ids, w, q13, q2, s).float()
        cfg = MoEConfig(32, GemmConfig(32, 256, tma=True), GemmConfig(64, 64, group_m=4))
        out = fm.fused_moe(*(t.to(DEV) for t in (x.half(), ids, w, q13, q2)), config=cfg, quant=fmt,
                           w13_scale=s.w13_scale.to(DEV), w2_scale=s.w2_scale.to(DEV)).cpu()
        assert out.dtype == torch.float16 and rel(out, ref) < max(2e-3, ORACLE_TOL), (fmt, rel(out, ref))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("fmt", ["fp8_channel", "fp8_block"])
@pytest.mark.parametrize("T,E,K,D,I", [(1, 8, 2, 200, 136), (1, 60, 6, 32, 16), (7, 6, 3, 40, 24),
                                       (30, 60, 6, 32, 136)])
def test_w8a8_activation_quant_fused_equals_separate(fmt, T, E, K, D, I, monkeypatch) -> None:
    """x quantized by moe_align_quant's extra programs (also in the chunked count launch; at decode blocks, which
    have no align launch, by per_token_quant) gives the layer the values of its own per_token_quant launch, bit
    for bit."""
    from test_fused_moe import routing

    from moelab.kernels import fused_moe as fm
    from moelab.kernels import moe_align as ma

    monkeypatch.setattr(ma, "SINGLE_PROGRAM_SLOTS", 64)  # T=30 x top-6: the count + place launches,
    monkeypatch.setattr(ma, "CHUNK_SLOTS", 64)  # over three chunks
    x, w = torch.randn(T, D) * 3, torch.rand(T, K)
    w13, w2 = weights(E, D, I)
    q13, q2, s = quantize_experts(w13, w2, fmt)
    ids = routing(T, E, K, "skew" if T > 1 else "uniform")
    args = [t.to(DEV) for t in (x, ids, w, q13, q2)]
    kw = dict(quant=fmt, w13_scale=s.w13_scale.to(DEV), w2_scale=s.w2_scale.to(DEV))
    outs = {}
    for mode in ("separate", "fused"):
        monkeypatch.setattr(fm, "ACT_QUANT", mode)
        outs[mode] = fm.fused_moe(*args, **kw).cpu()
    assert torch.equal(outs["fused"], outs["separate"])
    assert rel(outs["fused"], naive_moe(x, ids, w, q13, q2, s)) < ORACLE_TOL
    with pytest.raises(ValueError, match="must be 'fused' or 'separate'"):
        fm.set_act_quant("inline")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("fmt", ["fp8_tensor", "fp8_block"])
@pytest.mark.parametrize("T,tma", [(1, False), (1, True), (9, False), (9, True)])
def test_fp8_swapped_products_equal_unswapped(fmt, T, tma, monkeypatch) -> None:
    """fp8 GEMMs with row blocks < 64 computed transposed (swap_ab) give the products of the untransposed
    kernels, with pointer and TMA weight loads (rows of 16-byte multiples), K not a multiple of BLOCK_K (208, 144
    against 64 / 128), block scales."""
    from test_fused_moe import routing

    from moelab.kernels import fused_moe as fm
    from moelab.kernels.fused_moe_config import GemmConfig, MoEConfig

    E, K, D, I = 6, 2, 208, 144
    x, w = torch.randn(T, D), torch.rand(T, K)
    w13, w2 = weights(E, D, I)
    q13, q2, s = quantize_experts(w13, w2, fmt)
    ids = routing(T, E, K)
    cfg = MoEConfig(16, GemmConfig(64, 64, tma=tma), GemmConfig(64, 128, tma=tma))
    assert fm.swap_ab(16, cfg.gate_up, torch.float8_e4m3fn) and not fm.swap_ab(64, cfg.gate_up, torch.float8_e4m3fn)
    assert fm._tma_ok(q13) and fm._tma_ok(q2)  # the tma=True cases take the descriptor path
    args = [t.to(DEV) for t in (x, ids, w, q13, q2)]
    kw = dict(config=cfg, quant=fmt, w13_scale=s.w13_scale.to(DEV), w2_scale=s.w2_scale.to(DEV))
    outs = flag_ab(monkeypatch, "SWAP_AB_FP8", args, **kw)
    # (on the GPU the two run on different instructions: fp8 wgmma against fp16 mma after a conversion)
    assert rel(outs[True], outs[False]) < (1e-6 if DEV == "cpu" else ORACLE_TOL)
    assert rel(outs[True], naive_moe(x, ids, w, q13, q2, s)) < ORACLE_TOL


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("bn,bk", [(32, 64), (64, 128)])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # silu of the 1e3-scaled gate rows: exactly 0
def test_gate_up_merged_equals_separate(bn, bk, monkeypatch) -> None:
    """gate_up with gate and up as one dot operand (merge_gate_up, block scales loaded one K-tile ahead) gives the
    two-operand kernel's layer: 128x128 scale blocks of ranges six decades apart (gate against up rows, and
    within each), N = I not a multiple of BLOCK_N (136), K = D not a multiple of BLOCK_K (264), an expert with no
    token; and the flag sends block scales with pointer tiles, and nothing else, to the merged loop."""
    from test_fused_moe import routing

    from moelab.kernels import fused_moe as fm
    from moelab.kernels.fused_moe_config import GemmConfig, MoEConfig

    E, K, T, D, I, fmt = 5, 2, 40, 264, 136, "fp8_block"
    x, w = torch.randn(T, D), torch.rand(T, K)
    w13, w2 = weights(E, D, I)
    w13[:, :128, :128] *= 1e3  # gate block (0, 0)
    w13[:, I:I + 128, 128:256] *= 1e-3  # up block (0, 1)
    w13[:, 128:I, 256:] *= 30.0  # gate rows of the second block, last (short) K block
    q13, q2, s = quantize_experts(w13, w2, fmt)
    ids = routing(T, E, K, "skew")
    ids[ids == 3] = 4  # expert 3 gets no token
    cfg = MoEConfig(64, GemmConfig(bn, bk, group_m=2), GemmConfig(64, 64))
    args = [t.to(DEV) for t in (x, ids, w, q13, q2)]
    kw = dict(config=cfg, quant=fmt, w13_scale=s.w13_scale.to(DEV), w2_scale=s.w2_scale.to(DEV))
    outs = flag_ab(monkeypatch, "MERGE_GU_BLOCK", args, **kw)
    assert rel(outs[True], outs[False]) < (1e-6 if DEV == "cpu" else 1e-3), rel(outs[True], outs[False])
    assert rel(outs[True], naive_moe(x, ids, w, q13, q2, s)) < ORACLE_TOL
    assert fm.merge_gate_up(3, tma=False, swap=False)
    assert not fm.merge_gate_up(3, tma=True, swap=False) and not fm.merge_gate_up(3, tma=False, swap=True)
    assert not fm.merge_gate_up(2, tma=False, swap=False)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("fmt", [None, "fp8_block"])
def test_down_warp_specialized_equals_plain(fmt, monkeypatch) -> None:
    """The down GEMM in its warp-specialized form (warp_spec_down: no early return; row blocks past the padded
    count take no K step and store nothing) gives the plain kernel's layer, with TMA tiles and 4 warps, row blocks
    past the padded rows (the grid is sized for the worst routing), an expert with no token; and the flag asks
    for it only where Triton can do it."""
    from test_fused_moe import routing

    from moelab.kernels import fused_moe as fm
    from moelab.kernels.fused_moe_config import GemmConfig, MoEConfig

    E, K, T, D, I = 6, 2, 24, 64, 144
    x, w = torch.randn(T, D), torch.rand(T, K)
    w13, w2 = weights(E, D, I)
    ids = routing(T, E, K, "skew")
    ids[ids == 2] = 3  # expert 2 gets no token
    cfg = MoEConfig(16, GemmConfig(32, 64), GemmConfig(32, 64, num_warps=4, tma=True))
    if fmt:
        q13, q2, s = quantize_experts(w13, w2, fmt)
        kw = dict(quant=fmt, w13_scale=s.w13_scale.to(DEV), w2_scale=s.w2_scale.to(DEV))
        ref = naive_moe(x, ids, w, q13, q2, s)
    else:
        q13, q2, kw, ref = w13, w2, {}, dense_moe(x, ids, w, w13, w2)
    assert fm._tma_ok(q2) and not fm.swap_ab(16, cfg.down, torch.float8_e4m3fn)  # 32-wide tiles: not transposed
    args = [t.to(DEV) for t in (x, ids, w, q13, q2)]
    empty = torch.empty

    def poisoned(*a, **k):  # unwritten routing entries name slot 0 and expert 0, unwritten rows hold NaN
        t = empty(*a, **k)
        return t.fill_(0 if not (t.is_floating_point() or t.is_complex()) else float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned)
    outs = flag_ab(monkeypatch, "WARP_SPEC_DOWN", args, config=cfg, **kw)
    monkeypatch.setattr(torch, "empty", empty)
    assert torch.equal(outs[True], outs[False]) if DEV == "cpu" else rel(outs[True], outs[False]) < 1e-3
    assert rel(outs[True], ref) < (ORACLE_TOL if fmt else 1e-5 if DEV == "cpu" else 2e-2)
    assert fm.warp_spec_down(tma=True, num_warps=4, swap=False)
    assert not fm.warp_spec_down(tma=False, num_warps=4, swap=False)
    assert not fm.warp_spec_down(tma=True, num_warps=8, swap=False)
    assert not fm.warp_spec_down(tma=True, num_warps=4, swap=True)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
def test_per_token_quant_kernel_matches_ref() -> None:
    from moelab.kernels.per_token_quant import per_token_quant, per_token_quant_ref

    x = torch.cat([torch.randn(6, 300) * 10 ** torch.arange(-3, 3)[:, None], torch.zeros(1, 300)]).to(DEV)
    x[0, :4] = torch.tensor([126.8, -0.0146, 1e-30, 447.9])  # a binade carry, e4m3 subnormals, tiny
    q, s = per_token_quant(x)
    qr, sr = per_token_quant_ref(x)
    assert torch.equal(s, sr) and torch.equal(q.float(), qr.float())
    q2, _ = per_token_quant(x, num_rows=torch.tensor([3], dtype=torch.int32, device=DEV))
    assert torch.equal(q2[:3].float(), qr[:3].float())
    x = (torch.randn(3, 4100) * torch.tensor([[1.0], [1e-3], [30.0]])).to(DEV)  # two chunks: the first kept
    x[1, 4099] = 5.0  # the row's largest value in the second chunk
    q, s = per_token_quant(x)
    qr, sr = per_token_quant_ref(x)
    assert torch.equal(s, sr) and torch.equal(q.float(), qr.float())


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
def test_triton_quantized_shape_errors() -> None:
    from moelab.kernels import fused_moe as fm

    x, ids, w, w13, w2 = (t.to(DEV) for t in make_case(3, 4, 2, 16, 8))
    q13, q2, s = quantize_experts(w13, w2, "fp8_channel")
    with pytest.raises(ValueError, match="float32 scales of shapes"):
        fm.fused_moe(x, ids, w, q13, q2, quant="fp8_channel", w13_scale=s.w13_scale, w2_scale=None)
    with pytest.raises(ValueError, match="weights must be"):
        fm.fused_moe(x, ids, w, w13, w2, quant="fp8_channel", w13_scale=s.w13_scale, w2_scale=s.w2_scale)
    with pytest.raises(ValueError, match="unknown quant format"):
        fm.fused_moe(x, ids, w, q13, q2, quant="fp4", w13_scale=s.w13_scale, w2_scale=s.w2_scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_converter_and_collector(fmt, tmp_path) -> None:
    """quantize_checkpoint writes a directory whose config names the format, and loading it the way
    moelab/models/loader.py will (QuantExpertLoader.claim / finish) gives the in-memory quantization."""
    from conftest import write_tiny

    from moelab.hf_config import spec_from_hf_config
    from moelab.layers.moe.quant_load import QuantExpertLoader, quant_format, quantize_checkpoint
    from moelab.models.loader import _Targets, build_model, load_model, read_config, shard_files

    src = write_tiny("olmoe", tmp_path / "src")
    dst = quantize_checkpoint(src, tmp_path / fmt, fmt)
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert quant_format(cfg) == fmt and qc["moelab_format"] == fmt
    assert qc["quant_method"] == ("fp8" if is_w8a8(fmt) else "moelab")
    assert (qc.get("weight_block_size") == [128, 128]) == (fmt == "fp8_block")
    assert "model.layers.0.self_attn.q_proj" in qc["modules_to_not_convert"]
    assert (dst / "tokenizer.json").is_file() == (src / "tokenizer.json").is_file()

    ref_model = load_model(src)
    model = build_model(spec_from_hf_config(read_config(dst)), torch.float32, "cpu")
    targets = _Targets(model)
    collector = QuantExpertLoader(targets.experts, model.expert_proj_names, quant_format(read_config(dst)))
    for f in shard_files(dst):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if not collector.claim(name, sf.get_tensor(name)):
                    targets.load(name, sf.get_tensor(name), f)
    collector.finish()
    targets.expert_filled |= collector.filled
    targets.check_complete(dst)
    for prefix, module in targets.experts.items():
        ref = dict(ref_model.named_modules())[prefix]
        q13, q2, s = quantize_experts(ref.w13.data, ref.w2.data, fmt)
        d13, d2 = dequantize(module.w13, module.w2, module.scales)
        r13, r2 = dequantize(q13, q2, s)
        assert rel(d2, r2) < 1e-6  # per tensor: gate and up requantized to one scale (rounded twice)
        assert rel(d13, r13) < 1e-6 if fmt != "fp8_tensor" else rel(d13, ref.w13) < ROUND_TRIP[fmt]
        x = torch.randn(5, d13.shape[2])
        ids = torch.stack([torch.randperm(module.num_experts)[:2] for _ in range(5)])
        out = naive_moe(x, ids, torch.rand(5, 2), module.w13, module.w2, module.scales)
        assert torch.isfinite(out).all()



@pytest.mark.parametrize("fmt", ["int8_channel", "fp8_channel"])
def test_quantized_checkpoint_through_the_engine(fmt, tmp_path) -> None:
    """A quantized checkpoint loads through load_model / LLM; naive and triton agree on its logits and the engine
    generates from it."""
    from conftest import write_tiny

    from moelab.context import ForwardContext, forward_context
    from moelab.engine.sampling_params import SamplingParams
    from moelab.layers.moe.quant_load import quantize_checkpoint
    from moelab.llm import LLM
    from moelab.models.loader import load_model

    dst = quantize_checkpoint(write_tiny("olmoe", tmp_path / "src"), tmp_path / fmt, fmt)
    ids = torch.randint(4, 320, (7,))
    logits = {}
    for backend in ("naive", "triton"):
        model = load_model(dst, moe_backend=backend, device=DEV)
        assert model.model.layers[0].mlp.experts.scales is not None
        with torch.no_grad(), forward_context(ForwardContext.for_prompts([7], device=DEV)):
            logits[backend] = model.compute_logits(model(ids.to(DEV), torch.arange(7, device=DEV))).cpu()
    assert rel(logits["triton"], logits["naive"]) < ORACLE_TOL
    out = LLM(str(dst), max_model_len=32).generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4,
                                                                              ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
