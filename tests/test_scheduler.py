"""Block manager and scheduler invariants under random workloads, with a stand-in for the model."""

from __future__ import annotations

import random

import pytest

from moelab.engine.block_manager import BlockManager
from moelab.engine.sampling_params import SamplingParams
from moelab.engine.scheduler import Scheduler
from moelab.engine.sequence import Sequence, SequenceStatus


def make_seq(i: int, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(temperature=0), max_tokens)


def test_block_manager_allocate_free_share() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = make_seq(0, 9, 1), make_seq(1, 4, 1)
    assert bm.blocks_needed(a, 9) == 3 and bm.can_allocate(a, 9)
    bm.allocate(a, 9)
    assert len(a.block_table) == 3 and 0 not in a.block_table and bm.num_free_blocks == 2
    bm.share(a, b, 2)
    bm.check_invariants([a, b])
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.free(a)
    bm.check_invariants([b])
    assert bm.num_free_blocks == 3  # the unshared block came back, shared ones are still held by b
    bm.free(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 5 and bm.usage == 0.0
    with pytest.raises(RuntimeError, match="blocks needed"):
        bm.allocate(make_seq(2, 30, 1), 30)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockManager(1, 4)


def run_random_workload(seed: int, num_blocks: int, block_size: int, max_num_seqs: int, budget: int,
                        abort_rate: float = 0.0) -> Scheduler:
    """Drive the scheduler like the engine does (a fake model emits token 7), checking invariants each step."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs, budget)
    max_len = (num_blocks - 1) * block_size  # a lone sequence always fits
    pending = [make_seq(i, rng.randint(1, max_len // 2), rng.randint(1, max_len // 2)) for i in range(40)]
    everyone = list(pending)
    steps = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        had_work = sched.has_unfinished()
        batch = sched.schedule()
        assert len(batch) > 0 or not had_work, "nothing scheduled while requests wait"
        assert batch.total_tokens <= budget and len(sched.running) <= max_num_seqs
        assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            assert seq.status is SequenceStatus.RUNNING
            samples = batch.samples(i)
            seq.num_computed_tokens += n
            assert len(seq.block_table) * block_size >= seq.num_computed_tokens
            if samples:
                seq.token_ids.append(7)
                if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= max_len:
                    seq.finish("length")
                    sched.finish(seq)
        if abort_rate and sched.running and rng.random() < abort_rate:
            victim = rng.choice(sched.running)
            victim.finish("abort")
            sched.finish(victim)
        bm.check_invariants(sched.running + list(sched.waiting))
        for s in sched.waiting:
            assert not s.block_table and s.num_computed_tokens == 0
        steps += 1
        assert steps < 10_000
    assert all(s.finished for s in everyone)
    assert bm.num_free_blocks == num_blocks - 1
    for s in everyone:
        if s.finish_reason == "length":
            assert s.num_output_tokens == min(s.max_tokens, max_len - s.num_prompt_tokens)
    return sched


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_keep_invariants_and_finish(seed: int) -> None:
    run_random_workload(seed, num_blocks=17, block_size=4, max_num_seqs=8, budget=24)


def test_tight_pool_preempts_and_still_finishes() -> None:
    sched = run_random_workload(1, num_blocks=9, block_size=2, max_num_seqs=16, budget=64)
    assert sched.num_preemptions > 0


def test_aborts_free_everything() -> None:
    run_random_workload(3, num_blocks=17, block_size=4, max_num_seqs=8, budget=16, abort_rate=0.3)


def test_decode_first_and_token_budget() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a = make_seq(0, 3, 5)
    sched.add(a)
    batch = sched.schedule()
    assert batch.seqs == [a] and batch.num_tokens == [3] and batch.samples(0)
    a.num_computed_tokens += 3
    a.token_ids.append(7)
    b = make_seq(1, 30, 5)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_tokens == [1, 9]  # decode first, then a 9-token chunk
    assert batch.samples(0) and not batch.samples(1)


def test_max_num_seqs_caps_admission() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        sched.add(make_seq(i, 3, 2))
    batch = sched.schedule()
    assert len(batch) == 2 and len(sched.waiting) == 2


def test_preemption_takes_the_newest_and_requeues_it_first() -> None:
    """Four one-block prompts fill 4 of 5 usable blocks; each decode then needs a second block and one is free.
    The oldest (A) gets it. B needs one: of C and D the newest, D, is preempted and B takes its block. C needs one:
    nothing newer runs, so C itself goes. Each preempted sequence loses its blocks and computed tokens and waits
    at the front of the queue, before a request that arrived later."""
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c, d, late = (make_seq(i, 4, 8) for i in range(5))
    for s in (a, b, c, d):
        sched.add(s)

    def step():
        batch = sched.schedule()
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            samples = batch.samples(i)
            seq.num_computed_tokens += n
            if samples:
                seq.token_ids.append(7)
        return batch

    first = step()
    assert first.seqs == [a, b, c, d] and bm.num_free_blocks == 1
    sched.add(late)
    second = step()
    assert second.preempted == [d, c] and second.seqs[:2] == [a, b]
    # C's freed block lets the admissions of the same step take the queue's front, C again (from its start), not
    # the request that arrived later
    assert second.seqs[2:] == [c] and second.num_tokens[2] == 4 and c.num_computed_tokens == 4
    assert list(sched.waiting) == [d, late]
    assert d.status is SequenceStatus.WAITING and not d.block_table and d.num_computed_tokens == 0
    assert c.num_preemptions == d.num_preemptions == 1 and sched.num_preemptions == 2
    bm.check_invariants(sched.running + list(sched.waiting))
