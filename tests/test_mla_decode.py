"""MLA's decode preparation in one kernel (moelab.kernels.mla_decode) against the five steps it replaces, under the
interpreter (fp32 / fp16): the absorbed query and the cache rows it writes, both RoPE layouts, several tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import DEV

from moelab.kernels.mla_decode import mla_prep, mla_prep_ref, mla_uv, mla_uv_ref


def _inputs(T, H, nope, R, rope, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H * (nope + rope), generator=g).to(dtype)
    kv = (torch.randn(T, R + rope, generator=g) * 3).to(dtype)
    w_uk = (torch.randn(H, nope, R, generator=g) / nope ** 0.5).to(dtype)
    nw = (torch.rand(R, generator=g) + 0.5).to(dtype)
    P = 64
    freqs = torch.arange(P)[:, None] * (1.0 / (1e4 ** (torch.arange(0, rope, 2) / rope)))[None, :]
    cos, sin = freqs.cos().float(), freqs.sin().float()
    positions = torch.randint(0, P, (T,), generator=g)
    slots = torch.randperm(40, generator=g)[:T]
    cache = torch.zeros(40, R + rope).to(dtype)
    return [t.to(DEV) for t in (q, kv, positions, cos, sin, w_uk, nw, cache, slots)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("T,interleaved,block_r", [(1, True, 16), (3, False, 32), (2, True, 64)])
def test_mla_prep_matches_the_steps_it_replaces(dtype, tol, T, interleaved, block_r):
    H, nope, R, rope = 4, 16, 64, 8
    q, kv, pos, cos, sin, w_uk, nw, cache, slots = _inputs(T, H, nope, R, rope, dtype, seed=T)
    want_cache = cache.clone()
    want = mla_prep_ref(q, kv, pos, cos, sin, w_uk, nw, 1e-6, want_cache, slots, interleaved)
    got = mla_prep(q, kv, pos, cos, sin, w_uk, nw, 1e-6, cache, slots, interleaved, block_r=block_r)
    assert got.shape == (T, H, R + rope) and got.dtype == dtype
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (got.float() - want.float()).abs().max()
    assert torch.allclose(cache.float(), want_cache.float(), atol=tol, rtol=tol)
    untouched = torch.ones(cache.shape[0], dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert not cache[untouched.to(DEV)].any()  # only the tokens' slots were written


def test_mla_prep_shape_errors():
    from moelab.kernels.mla_decode import supports

    assert supports(128, 512, 64, 128) and not supports(128, 512, 9) and not supports(96, 512, 64)
    assert not supports(128, 512, 64, 96)
    q, kv, pos, cos, sin, w_uk, nw, cache, slots = _inputs(1, 4, 16, 64, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"q must be \[T, H \* \(nope \+ rope\)\]"):
        mla_prep(q[:, :-1], kv, pos, cos, sin, w_uk, nw, 1e-6, cache, slots)
    with pytest.raises(ValueError, match="must be powers of two"):
        mla_prep(q, kv[:, :56], pos, cos, sin, w_uk[..., :48].contiguous(), nw[:48], 1e-6, cache[:, :56], slots)
    with pytest.raises(ValueError, match="cache rows must be"):
        mla_prep(q, kv, pos, cos, sin, w_uk, nw, 1e-6, cache[:, :8], slots)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("T,block_v", [(1, 8), (2, 32)])
def test_mla_uv_matches_its_twin(dtype, tol, T, block_v):
    g = torch.Generator().manual_seed(T)
    H, R, V = 4, 64, 16
    o_full = torch.randn(T, H, R + 8, generator=g).to(dtype).to(DEV)
    o_lat = o_full[..., :R]  # strided rows, as attention's output view can be
    w = (torch.randn(H, R, V, generator=g) / R ** 0.5).to(dtype).to(DEV)
    got = mla_uv(o_lat, w, block_v=block_v)
    assert got.shape == (T, H, V) and torch.allclose(got.float(), mla_uv_ref(o_lat, w).float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="mla_uv: o_lat"):
        mla_uv(o_lat[:, :2], w)


def test_an_odd_rope_width_is_refused():
    q, kv, pos, cos, sin, w_uk, nw, cache, slots = _inputs(1, 4, 16, 64, 8, torch.float32, seed=0)
    q9 = torch.zeros(1, 4 * (16 + 9), device=q.device)
    kv9 = torch.zeros(1, 64 + 9, device=q.device)
    with pytest.raises(ValueError, match="rope even"):
        mla_prep(q9, kv9, pos, cos, sin, w_uk, nw, 1e-6, torch.zeros(40, 73, device=q.device), slots)
