"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

Policy, per step, within a token budget (max_num_batched_tokens) and a sequence cap (max_num_seqs):
1. decode first: every running sequence that waits for one token gets it, oldest first. When the KV cache
   has no block for it, the newest running sequence not yet scheduled this step is preempted (recompute:
   its blocks are freed and it goes back to the front of the waiting queue); when no such sequence is left,
   the sequence itself is preempted.
2. then running sequences in the middle of a chunked prefill continue;
3. then waiting sequences are admitted in arrival order, each with a chunk of its prompt as large as the
   remaining budget and the free blocks allow (chunked prefill); admission never preempts.
4. if that schedules nothing (prompt chunks of several sequences hold every block), the newest running
   sequence is preempted and the step is planned again.
A lone sequence always fits: the engine refuses a KV pool smaller than max_model_len tokens, and
requests longer than max_model_len are refused when added. So no request waits forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moelab.engine.block_manager import BlockManager
from moelab.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens fed per sequence this step
    preempted: list[Sequence] = field(default_factory=list)
    all_decode: bool = False  # every sequence feeds its one last sampled token (set by the scheduler)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def is_pure_decode(self) -> bool:
        return all(n == 1 for n in self.num_tokens) and all(s.is_decode for s in self.seqs)

    def samples(self, i: int) -> bool:
        """Does sequence i reach its last token this step (so a token is sampled for it)?"""
        s = self.seqs[i]
        return s.num_computed_tokens + self.num_tokens[i] == s.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = True) -> None:
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def may_preempt(self) -> bool:
        """Could the next schedule() preempt? (Some decode needs a new block and there are too few free.) The
        engine settles its in-flight step first then, so that no preempted sequence has a token in flight."""
        bs = self.bm.block_size
        need = sum(1 for s in self.running if s.num_computed_tokens >= len(s.block_table) * bs)
        return need > self.bm.num_free_blocks or (not need and self.bm.num_free_blocks == 0 and bool(self.running))

    def _preempt(self, seq: Sequence) -> None:
        if seq.pending:
            raise RuntimeError(f"{seq.request_id}: cannot preempt a sequence whose sampled token is in flight")
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of seq's uncomputed part that fit in the budget and in the free blocks."""
        n = min(seq.num_uncomputed_tokens, budget)
        room = len(seq.block_table) * self.bm.block_size - seq.num_computed_tokens
        n = min(n, room + self.bm.num_free_blocks * self.bm.block_size)
        if not self.chunked_prefill and n < seq.num_uncomputed_tokens:
            return 0
        return max(n, 0)

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule()
        # Running prompts whose chunks cannot continue because others hold every block: preempt the newest
        # until something runs (a lone sequence always fits, so this ends).
        # (Not while a running sequence waits for its token in flight: then nothing is stuck, the next step will
        # have work.)
        while not len(batch) and self.running and not any(s.pending for s in self.running):
            victim = self.running[-1]
            self._preempt(victim)
            batch = self._schedule()
            batch.preempted.append(victim)
        return batch

    def _schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()

        bs = self.bm.block_size
        running = SequenceStatus.RUNNING
        for seq in list(self.running):  # 1. decodes, oldest first
            if budget == 0:
                break
            n_tok = len(seq.token_ids) + seq.pending
            if seq.status is not running or n_tok - seq.num_computed_tokens != 1 \
                    or n_tok == len(seq.prompt_token_ids):
                continue  # not a decode (a prompt chunk, or preempted by an earlier iteration)
            if seq.pending and n_tok - len(seq.prompt_token_ids) >= seq.max_tokens:
                continue  # its in-flight token is its last: it finishes when that token arrives
            if seq.num_computed_tokens < len(seq.block_table) * bs:  # room in its last block: the common case
                batch.seqs.append(seq)
                batch.num_tokens.append(1)
                scheduled.add(id(seq))
                budget -= 1
                continue
            while not self.bm.can_allocate(seq, 1):
                victims = [s for s in self.running if id(s) not in scheduled and s is not seq and not s.pending]
                victim = victims[-1] if victims else seq
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.bm.allocate(seq, 1)
            batch.seqs.append(seq)
            batch.num_tokens.append(1)
            scheduled.add(id(seq))
            budget -= 1

        n_decode = len(batch.seqs)
        for seq in self.running:  # 2. chunked prefills in progress
            if budget == 0 or len(scheduled) == len(self.running):
                break
            if id(seq) in scheduled or seq.is_decode:
                continue
            n = self._chunk(seq, budget)
            if n == 0:
                break
            self.bm.allocate(seq, n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            scheduled.add(id(seq))
            budget -= n

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:  # 3. admissions
            seq = self.waiting[0]
            n = self._chunk(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.bm.allocate(seq, n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            scheduled.add(id(seq))
            budget -= n
        batch.all_decode = len(batch.seqs) == n_decode > 0
        return batch

    def finish(self, seq: Sequence) -> None:
        """Release a finished (or aborted) sequence wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
