"""Paged attention kernel against its torch reference (Triton interpreter on CPU: fp32 and fp16 only, bf16 dots are
wrong there); the reference against dense causal SDPA on contiguous data."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_gpu

from moelab.kernels.paged_attention import (
    PagedAttentionConfig,
    paged_attention,
    paged_attention_ref,
    set_fused_reduce,
    value_is_key_prefix,
)

GARBAGE_BLOCK = 1 << 30  # block-table entries past a sequence's end must never be read


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, Dk]
    k_cache: torch.Tensor  # [N, bs, KV, Dk]
    v_cache: torch.Tensor  # [N, bs, KV, Dv]
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    scale: float
    max_query_len: int

    def args(self) -> tuple:
        return self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens, self.block_tables, self.scale


def make_batch(qlens: list[int], seq_lens: list[int], KV: int, group: int, Dk: int, Dv: int, bs: int = 4,
               dtype: torch.dtype = torch.float32, mla: bool = False, pad_row: bool = False) -> Batch:
    """Shuffled, non-contiguous blocks; NaN in every cache slot no sequence holds. MLA: KV=1, v views k's storage.
    pad_row appends a CUDA-graph padding row (qlen 1, seq_len 1, a block table of zeros)."""
    need = [-(-n // bs) for n in seq_lens]
    N = sum(need) + 3
    if mla:
        latent = torch.full((N, bs, Dk), float("nan"), dtype=dtype)
        k_cache, v_cache = latent.view(N, bs, 1, Dk), latent[..., :Dv].unsqueeze(2)
    else:  # one tensor [2, N, bs, KV, D] as the engine allocates it
        kv = torch.full((2, N, bs, KV, max(Dk, Dv)), float("nan"), dtype=dtype)
        k_cache, v_cache = kv[0, ..., :Dk], kv[1, ..., :Dv]
    perm = torch.randperm(N).tolist()
    tables = torch.full((len(seq_lens) + pad_row, max(need, default=0) + 2), GARBAGE_BLOCK, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        blocks, perm = perm[:need[b]], perm[need[b]:]
        tables[b, :need[b]] = torch.tensor(blocks, dtype=torch.int32)
        pos = torch.arange(n)
        idx = (torch.tensor(blocks, dtype=torch.long)[pos // bs], pos % bs)
        k_cache[idx] = torch.randn(n, k_cache.shape[2], Dk).to(dtype)
        if not mla:
            v_cache[idx] = torch.randn(n, KV, Dv).to(dtype)
    if pad_row:
        qlens, seq_lens = qlens + [1], seq_lens + [1]
        tables[-1] = 0
        k_cache[0, 0] = torch.randn(k_cache.shape[2], Dk).to(dtype)
        v_cache[0, 0] = v_cache[0, 0].nan_to_num(0.5)
    cu = torch.tensor([0] + qlens).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), KV * group, Dk).to(dtype)
    return Batch(q, k_cache, v_cache, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, Dk ** -0.5,
                 max(qlens, default=1))


def as_float(args: tuple) -> list:
    return [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def check(batch: Batch, atol: float = 2e-5, **kw) -> torch.Tensor:
    out = paged_attention(*batch.args(), batch.max_query_len, **kw)
    ref = paged_attention_ref(*as_float(batch.args()))
    assert out.dtype == batch.q.dtype and out.shape == ref.shape
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)
    return out


SMALL_TILES = PagedAttentionConfig(block_q=2, heads_per_prog=2, block_n=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("config", [None, SMALL_TILES], ids=["default", "small_tiles"])
def test_prefill(group: int, config: PagedAttentionConfig | None) -> None:
    lens = [5, 17, 1, 33]
    check(make_batch(lens, lens, KV=2, group=group, Dk=32, Dv=32), config=config)


@pytest.mark.parametrize("config", [None, SMALL_TILES], ids=["default", "small_tiles"])
def test_chunked_prefill(config: PagedAttentionConfig | None) -> None:
    check(make_batch([7, 20, 3], [30, 20, 70], KV=2, group=2, Dk=64, Dv=64, bs=8), config=config)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode(group: int) -> None:
    check(make_batch([1] * 5, [1, 9, 64, 65, 130], KV=2, group=group, Dk=16, Dv=16, bs=16))


@pytest.mark.parametrize("config", [None, SMALL_TILES], ids=["default", "small_tiles"])
def test_mixed_batch(config: PagedAttentionConfig | None) -> None:
    check(make_batch([1, 12, 1, 5, 1], [40, 12, 3, 25, 77], KV=1, group=4, Dk=32, Dv=16), config=config)


def test_fp16() -> None:
    check(make_batch([1, 9, 1], [50, 30, 100], KV=2, group=2, Dk=64, Dv=64, bs=16, dtype=torch.float16), atol=2e-3)


@pytest.mark.parametrize("heads", [4, 16])
def test_mla_latent(heads: int) -> None:
    batch = make_batch([1, 6, 1], [35, 20, 90], KV=1, group=heads, Dk=40, Dv=32, mla=True, bs=16)
    assert value_is_key_prefix(batch.k_cache, batch.v_cache)  # the kernel reads V from the K tile
    check(batch)
    check(make_batch([1, 1, 1], [35, 200, 90], KV=1, group=heads, Dk=40, Dv=32, mla=True, bs=16), max_seq_len=4096)


@pytest.mark.parametrize("num_splits", [None, 3, 8])
def test_split_decode(num_splits: int | None) -> None:
    """max_seq_len far above the real lengths forces splits (most of them empty for the short sequences)."""
    check(make_batch([1] * 4, [3, 70, 300, 129], KV=2, group=4, Dk=32, Dv=32, bs=16), max_seq_len=2048,
          num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [2, 5, 16])
def test_split_reduce_inside_the_kernel(num_splits: int) -> None:
    """Decode splits combined by their last program (no reduce launch): right against the reference, the same as
    the separate reduce kernel to float32 rounding, and the arrival counters left at zero (a second call agrees)."""
    batch = make_batch([1] * 5, [1, 20, 70, 129, 300], KV=2, group=2, Dk=32, Dv=32, bs=16)
    fused = check(batch, max_seq_len=2048, num_splits=num_splits)
    assert torch.equal(check(batch, max_seq_len=2048, num_splits=num_splits), fused)
    set_fused_reduce(False)
    try:
        separate = check(batch, max_seq_len=2048, num_splits=num_splits)
    finally:
        set_fused_reduce(True)
    torch.testing.assert_close(fused, separate, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_splits,Dv", [(11, 64), (40, 64), (5, 256)])
def test_split_reduce_unrolled_and_looped(num_splits: int, Dv: int) -> None:
    """The reduce kernel unrolls up to 16 splits of a Dv <= 128 (masked beyond num_splits), loops over more."""
    check(make_batch([1] * 2, [300, 1000], KV=1, group=2, Dk=32, Dv=Dv, bs=16), max_seq_len=4096,
          num_splits=num_splits)


@pytest.mark.parametrize("unroll", [True, False])
@pytest.mark.parametrize("num_splits", [1, 5, 16])
def test_split_reduce_kernel_reads_only_its_splits(unroll: bool, num_splits: int) -> None:
    """Both reduce paths weight each split's partial output by its softmax mass; slots past num_splits (NaN here)
    are never read, and an empty split (lse -inf) contributes nothing."""
    import triton

    from moelab.kernels.paged_attention import _split_reduce_kernel

    T, H, Dv, pad = 2, 3, 24, 32
    g = torch.Generator().manual_seed(num_splits)
    lse = torch.randn(T * H * num_splits + 64, generator=g)
    part = torch.randn((T * H * num_splits + 64) * pad, generator=g)
    lse[T * H * num_splits:] = float("nan")
    part[T * H * num_splits * pad:] = float("nan")
    if num_splits > 1:
        lse[1] = float("-inf")  # token 0, head 0, split 1: no key
    out = torch.empty(T, H, Dv)
    _split_reduce_kernel[(T, H)](part, lse, out, H, num_splits, out.stride(0), out.stride(1), DV=Dv, DV_PAD=pad,
                                 SPLITS_PAD=max(16, triton.next_power_of_2(num_splits)), UNROLL=unroll)
    L = lse[:T * H * num_splits].view(T, H, num_splits)
    P = part[:T * H * num_splits * pad].view(T, H, num_splits, pad)[..., :Dv]
    w = torch.softmax(L * torch.log(torch.tensor(2.0)), dim=-1)  # the kernel's lse is in log2 units
    want = (w[..., None] * P).sum(2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_padding_and_empty_rows() -> None:
    """A CUDA-graph padding row, a sequence with no query this step, and a query with no key give no NaN."""
    check(make_batch([1, 0, 1], [20, 9, 5], KV=2, group=2, Dk=16, Dv=16, pad_row=True))
    check(make_batch([1, 0, 1], [20, 9, 5], KV=2, group=2, Dk=16, Dv=16, pad_row=True), max_seq_len=1024)
    batch = make_batch([1, 1], [0, 5], KV=1, group=2, Dk=16, Dv=16)  # position -1: attends to nothing
    assert check(batch)[0].abs().max() == 0


def test_value_is_key_prefix() -> None:
    kv = torch.randn(2, 3, 4, 2, 16)
    assert not value_is_key_prefix(kv[0], kv[1])
    assert value_is_key_prefix(kv[0], kv[0, ..., :8])
    latent = torch.randn(3, 4, 40)
    assert value_is_key_prefix(latent.view(3, 4, 1, 40), latent[..., :32].unsqueeze(2))
    assert not value_is_key_prefix(latent.view(3, 4, 1, 40), latent[..., 8:].unsqueeze(2))


def test_strided_q_and_out_buffer() -> None:
    batch = make_batch([3, 1], [10, 6], KV=2, group=2, Dk=16, Dv=16)
    qkv = torch.randn(batch.q.shape[0], 4 + 2 + 2, 16)
    batch.q = qkv[:, :4]
    out = torch.full((batch.q.shape[0], 4, 16), float("nan"))
    assert check(batch, out=out) is out


def test_bad_inputs() -> None:
    batch = make_batch([2], [5], KV=2, group=2, Dk=16, Dv=16)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(batch.q.half(), *batch.args()[1:], 2)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(*batch.args()[:4], batch.seq_lens.long(), *batch.args()[5:], 2)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(batch.q[:, :3], *batch.args()[1:], 2)


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Tq, H, d], k/v [Tk, KV, d] contiguous; query i at position Tk - Tq + i."""
    Tq, Tk, rep = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("mla", [False, True])
def test_ref_matches_dense_sdpa(mla: bool) -> None:
    qlens, lens = [4, 1, 9], [4, 13, 30]
    batch = make_batch(qlens, lens, KV=1 if mla else 2, group=4 if mla else 2, Dk=40 if mla else 16,
                       Dv=32 if mla else 16, bs=4, mla=mla)
    ref = paged_attention_ref(*batch.args())
    cu = batch.cu_seqlens_q.tolist()
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        blocks = batch.block_tables[b, pos // 4].long()
        k, v = batch.k_cache[blocks, pos % 4], batch.v_cache[blocks, pos % 4]
        dense = dense_causal(batch.q[cu[b]:cu[b + 1]], k, v, batch.scale)
        torch.testing.assert_close(ref[cu[b]:cu[b + 1]], dense, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_bf16_cuda_graph() -> None:
    """bf16 on the GPU, captured in a CUDA graph and replayed after the metadata changed in place."""
    batch = make_batch([1] * 3, [100, 7, 300], KV=2, group=4, Dk=128, Dv=128, bs=16, dtype=torch.bfloat16)
    dev = [t.cuda() for t in batch.args()[:-1]]
    out = torch.empty(3, 8, 128, dtype=torch.bfloat16, device="cuda")
    run = lambda: paged_attention(*dev, batch.scale, 1, out, max_seq_len=512)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    dev[4].copy_(torch.tensor([50, 7, 299], dtype=torch.int32))
    graph.replay()
    ref = paged_attention_ref(*as_float(dev), batch.scale)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


@needs_gpu
def test_split_reduce_inside_the_kernel_cuda() -> None:
    """The in-kernel split reduce compiled, bf16 at OLMoE's head shape, with its arrival counters reused across
    calls: close to the separate reduce (one bf16 rounding apart at most) and to the float32 reference."""
    lens = [1, 16, 33, 150, 511, 1000]
    batch = make_batch([1] * len(lens), lens, KV=16, group=1, Dk=128, Dv=128, bs=16, dtype=torch.bfloat16)
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in batch.args()]
    ref = paged_attention_ref(*as_float(args))
    for num_splits in (None, 4, 16):
        fused = [paged_attention(*args, 1, max_seq_len=1024, num_splits=num_splits) for _ in range(2)]
        assert torch.equal(fused[0], fused[1])
        set_fused_reduce(False)
        try:
            separate = paged_attention(*args, 1, max_seq_len=1024, num_splits=num_splits)
        finally:
            set_fused_reduce(True)
        torch.testing.assert_close(fused[0].float(), separate.float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(fused[0].float(), ref, atol=2e-2, rtol=2e-2)
