"""Greedy ids with the finiteness check (moelab.kernels.argmax) against torch, under the interpreter."""

from __future__ import annotations

import pytest
import torch
from conftest import DEV

from moelab.kernels.argmax import MAX_ROWS, argmax_rows, argmax_rows_ref, default_splits


@pytest.mark.parametrize("num_splits,block", [(None, 2048), (1, 2048), (3, 2048), (7, 128), (1, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # no tl.dot: bf16 is fine here
def test_argmax_rows_matches_torch_and_flags_unusable_rows(num_splits, block, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5000, generator=g)
    x[1, 4321] = x[1, 17] = 50.0           # a tie across parts: the first index wins
    x[2, 2500] = float("nan")               # a NaN anywhere
    x[3, 10] = float("inf")                 # an infinite maximum
    x[4] = -float("inf")                    # nothing usable
    x[5, :4000] = -float("inf")             # usable values only in the last part
    x = x.to(DEV, dtype)
    got = argmax_rows(x, num_splits, block)
    want = argmax_rows_ref(x)
    assert got.shape == (2, 6) and torch.equal(got, want)
    assert got[0].tolist()[1:5] == [17, -1, -1, -1] and got[0, 0] == x[0].float().argmax()
    assert got[1].tolist()[1:5] == [17, 0, 0, 0] and got[1, 5] == got[0, 5] >= 4000
    assert torch.equal(argmax_rows(x, num_splits, block), got)  # the counters reset


def test_argmax_rows_checks_its_input():
    with pytest.raises(ValueError, match="unit last stride"):
        argmax_rows(torch.randn(8, 4, device=DEV).T)
    with pytest.raises(ValueError, match="num_splits must be in"):
        argmax_rows(torch.randn(2, 64, device=DEV), num_splits=33)
    with pytest.raises(ValueError, match="vocabulary of 0"):
        argmax_rows(torch.randn(2, 0, device=DEV))
    with pytest.raises(ValueError, match="block must be"):
        argmax_rows(torch.randn(2, 64, device=DEV), block=1000)
    assert argmax_rows(torch.randn(0, 64, device=DEV)).shape == (2, 0)


def test_default_splits_fill_the_gpu_and_respect_the_limits():
    assert default_splits(1, 50304, 132) == 24            # parts of at least 2048 values
    assert default_splits(256, 50304, 132) == 9           # about 16 programs per SM
    assert default_splits(1, 151936, 132) == 32           # at most MAX_SPLITS
    assert default_splits(MAX_ROWS + 1, 151936, 132) == 1  # the counters cover MAX_ROWS rows
    assert default_splits(4, 1000, 132) == 1


@pytest.mark.parametrize("num_splits", [1, 3])
def test_argmax_rows_writes_into_a_strided_out(num_splits):
    """out= (a decode graph's static [2, max_rows] buffer, viewed [:, :N]): both rows land at the buffer's row
    stride, nothing past N is touched; a wrong shape or dtype is refused."""
    x = torch.randn(3, 700, device=DEV)
    x[1, 5] = float("nan")
    buf = torch.full((2, 8), 99, dtype=torch.int64, device=DEV)
    got = argmax_rows(x, num_splits, 128, out=buf[:, :3])
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:, :3], argmax_rows_ref(x)) and (buf[:, 3:] == 99).all()
    with pytest.raises(ValueError, match="out must be int64"):
        argmax_rows(x, out=buf[:, :2])
    with pytest.raises(ValueError, match="out must be int64"):
        argmax_rows(x, out=torch.zeros(2, 3, dtype=torch.int32, device=DEV))
