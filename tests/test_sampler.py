"""The sampler: its distribution against the row-by-row reference, greedy, seeds, banned tokens."""

from __future__ import annotations

import pytest
import torch

from moelab.engine.sampler import SamplingBatch, sample, sampling_probs, sampling_probs_ref


def batch(temps, ks, ps, gens=None, banned=None) -> SamplingBatch:
    n = len(temps)
    return SamplingBatch(torch.tensor(temps, dtype=torch.float32), torch.tensor(ks), torch.tensor(ps),
                         gens or [None] * n, banned or [[]] * n, all(t == 0 for t in temps),
                         any(k > 0 for k in ks), any(p < 1 for p in ps))


def test_probs_match_reference() -> None:
    logits = torch.randn(6, 50) * 3
    temps, ks, ps = [1.0, 0.5, 2.0, 1.0, 0.7, 1.3], [0, 5, 0, 1, 10, 3], [1.0, 1.0, 0.8, 0.5, 0.3, 0.95]
    out = sampling_probs(logits, batch(temps, ks, ps))
    ref = sampling_probs_ref(logits, temps, ks, ps)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(6))
    assert (out[1] > 0).sum() == 5 and (out[3] > 0).sum() == 1


def test_a_top_p_that_rounds_to_zero_keeps_the_top_token() -> None:
    """top_p = 1e-300 passes the API's "> 0" check and is 0.0 in float32: every token has mass >= 0 before it, so
    without the rule "the top token always stays" the row would be all zeros and sample NaN."""
    logits = torch.randn(3, 40) * 2
    ps = [1e-300, 0.0, 1e-12]
    out = sampling_probs(logits, batch([1.0] * 3, [0] * 3, ps))
    ref = sampling_probs_ref(logits, [1.0] * 3, [0] * 3, ps)
    want = torch.nn.functional.one_hot(logits.argmax(-1), 40).float()
    assert torch.equal(out, want) and torch.equal(ref, want)
    ids = sample(logits, batch([1.0] * 3, [0] * 3, ps), torch.Generator().manual_seed(0))[0]
    assert torch.equal(ids, logits.argmax(-1))


def test_samples_follow_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -5.0]]).repeat(20000, 1)
    b = batch([1.0] * 20000, [0] * 20000, [1.0] * 20000)
    ids = sample(logits, b, torch.Generator().manual_seed(0))[0]
    freq = torch.bincount(ids, minlength=5).float() / 20000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.015)


def test_greedy_rows_take_argmax_and_banned_tokens_never_come() -> None:
    logits = torch.randn(4, 30)
    b = batch([0.0, 1.0, 0.0, 1.0], [0, 0, 0, 1], [1.0] * 4, banned=[[int(logits[0].argmax())], [], [], []])
    ids = sample(logits, b, torch.Generator().manual_seed(0))[0]
    assert ids[2] == logits[2].argmax() and ids[3] == logits[3].argmax()  # greedy; top-k 1
    assert ids[0] == logits[0].topk(2).indices[1]


def test_precomputed_greedy_ids_are_used_unless_tokens_are_banned() -> None:
    """A decode graph hands its argmax to sample(): used as is for the temperature-0 rows, recomputed when a row bans
    tokens (the graph's argmax saw the logits before the ban)."""
    from moelab.engine.sampler import greedy

    logits = torch.randn(3, 30)
    marker = torch.stack([torch.full((3,), 7), torch.full((3,), 7)])  # not the argmax of any row
    b = batch([0.0, 1.0, 0.0], [0, 0, 0], [1.0] * 3)
    ids = sample(logits, b, torch.Generator().manual_seed(0), greedy_ids=marker)
    assert ids[0, 0] == 7 and ids[0, 2] == 7  # taken as given
    top = int(logits[0].argmax())
    b = batch([0.0, 1.0, 0.0], [0, 0, 0], [1.0] * 3, banned=[[top], [], []])
    ids = sample(logits, b, torch.Generator().manual_seed(0), greedy_ids=greedy(logits))
    assert ids[0, 0] == logits[0].topk(2).indices[1] and ids[0, 2] == logits[2].argmax()


def test_banned_tokens_in_any_row_of_a_strided_batch() -> None:
    """Bans land on their own row (flat positions row * V + token), also for non-contiguous logits."""
    wide = torch.randn(30, 8)
    logits = wide.t()  # [8, 30], column-major
    top = logits.argmax(-1)
    banned = [[int(top[i])] if i % 2 else [] for i in range(8)]
    b = batch([0.0] * 8, [0] * 8, [1.0] * 8, banned=banned)
    ids = sample(logits, b)[0]
    for i in range(8):
        assert int(ids[i]) == (int(logits[i].topk(2).indices[1]) if i % 2 else int(top[i]))


@pytest.mark.parametrize("seed", [0, 7])
def test_seeded_rows_ignore_the_rest_of_the_batch(seed: int) -> None:
    logits = torch.randn(3, 100)

    def draw(rows: list[int]) -> int:
        g = torch.Generator().manual_seed(seed)
        gens = [g if r == 0 else None for r in rows]
        b = batch([1.0] * len(rows), [0] * len(rows), [1.0] * len(rows), gens=gens)
        ids = sample(logits[rows], b, torch.Generator().manual_seed(123 + len(rows)))[0]
        return int(ids[rows.index(0)])

    assert draw([0]) == draw([2, 0, 1]) == draw([1, 0])


@pytest.mark.parametrize("kw,msg", [
    ({"temperature": -0.1}, "temperature must be >= 0"), ({"top_p": 0}, "top_p must be in"),
    ({"top_p": 1.5}, "top_p must be in"), ({"top_k": -2}, "top_k must be -1"), ({"max_tokens": 0}, "max_tokens must"),
    ({"min_tokens": -1}, "min_tokens must be >= 0"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens \\(5\\) must"),
    ({"stop": [""]}, "stop must be non-empty"), ({"stop_token_ids": [-1]}, "stop_token_ids must be non-negative"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids must be"), ({"seed": 1.5}, "seed must be an integer"),
])
def test_sampling_params_refuse_bad_values(kw: dict, msg: str) -> None:
    """The offline API's own checks (the server repeats them at the HTTP boundary, LLM users have only these)."""
    from moelab.engine.sampling_params import SamplingParams

    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)
