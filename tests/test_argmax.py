"""Greedy ids with the finiteness check (moelab.kernels.argmax) against torch, under the interpreter."""

from __future__ import annotations

import pytest
import torch
from conftest import DEV

from moelab.kernels.argmax import argmax_rows, argmax_rows_ref


@pytest.mark.parametrize("num_splits", [None, 1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # no tl.dot: bf16 is fine here
def test_argmax_rows_matches_torch_and_flags_unusable_rows(num_splits, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5000, generator=g)
    x[1, 4321] = x[1, 17] = 50.0           # a tie across parts: the first index wins
    x[2, 2500] = float("nan")               # a NaN anywhere
    x[3, 10] = float("inf")                 # an infinite maximum
    x[4] = -float("inf")                    # nothing usable
    x[5, :4000] = -float("inf")             # usable values only in the last part
    x = x.to(DEV, dtype)
    got = argmax_rows(x, num_splits)
    want = argmax_rows_ref(x)
    assert got.shape == (2, 6) and torch.equal(got, want)
    assert got[0].tolist()[1:5] == [17, -1, -1, -1] and got[0, 0] == x[0].float().argmax()
    assert got[1].tolist()[1:5] == [17, 0, 0, 0] and got[1, 5] == got[0, 5] >= 4000
    assert torch.equal(argmax_rows(x, num_splits), got)  # the counters reset


def test_argmax_rows_checks_its_input():
    with pytest.raises(ValueError, match="unit last stride"):
        argmax_rows(torch.randn(8, 4, device=DEV).T)
    with pytest.raises(ValueError, match="num_splits must be in"):
        argmax_rows(torch.randn(2, 64, device=DEV), num_splits=33)
    assert argmax_rows(torch.randn(0, 64, device=DEV)).shape == (2, 0)
