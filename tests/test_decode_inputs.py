"""The decode graph's input fix-up (moelab.kernels.decode_inputs) against its torch twin, under the interpreter."""

from __future__ import annotations

import pytest
import torch
from conftest import DEV

from moelab.kernels.decode_inputs import feed_decode_inputs, feed_decode_inputs_ref


@pytest.mark.parametrize("n", [1, 5, 300])
def test_feed_matches_the_reference(n):
    g = torch.Generator().manual_seed(n)
    staging = torch.randint(0, 1000, (5, n), generator=g)
    staging[3] = torch.where(torch.rand(n, generator=g) < 0.5, torch.randint(0, 40, (n,), generator=g), -1)
    staging[3, 0] = 39  # the last row of the token buffer
    tokens = torch.randint(0, 50_000, (40,), generator=g)
    want_st, want_len = staging.clone(), torch.zeros(n, dtype=torch.int32)
    feed_decode_inputs_ref(want_st, tokens, want_len)
    assert want_st[0, 0] == tokens[39] and torch.equal(want_len, staging[4].int())
    assert torch.equal(want_st[1:], staging[1:])
    fed = staging[3] >= 0
    assert torch.equal(want_st[0][~fed], staging[0][~fed]) and torch.equal(want_st[0][fed], tokens[staging[3][fed]])
    st, lens = staging.to(DEV), torch.zeros(n, dtype=torch.int32, device=DEV)
    feed_decode_inputs(st, tokens.to(DEV), lens)
    assert torch.equal(st.cpu(), want_st) and torch.equal(lens.cpu(), want_len)


def test_feed_checks_its_buffers():
    st = torch.zeros(5, 4, dtype=torch.int64, device=DEV)
    tok = torch.zeros(8, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="staging must be"):
        feed_decode_inputs(st[:4], tok, torch.zeros(4, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="seq_lens must be"):
        feed_decode_inputs(st, tok, torch.zeros(4, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="tokens must be"):
        feed_decode_inputs(st, tok.int(), torch.zeros(4, dtype=torch.int32, device=DEV))
