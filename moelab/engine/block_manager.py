"""The paged KV cache's bookkeeping: which blocks are free and who holds each (CPU only, no tensors).

Block 0 is reserved: CUDA-graph padding rows point their writes and reads at it, so it is never handed
out. Every other block is either on the free list with ref count 0, or referenced by `ref_count` block
tables. Ref counts let several sequences share full blocks (forking, prefix sharing) later without a
change here; `check_invariants` states the rules and the tests call it after every operation.
"""

from __future__ import annotations

from collections import deque

from moelab.engine.sequence import Sequence

NULL_BLOCK = 0


class KVCacheLeakError(RuntimeError):
    """The engine went idle with KV blocks still held: a finished, aborted or preempted sequence kept its blocks."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(1, num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that seq can hold num_computed_tokens + num_new_tokens tokens."""
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"KV cache: {need} blocks needed, {self.num_free_blocks} free")
        for _ in range(need):
            b = self.free_blocks.popleft()
            self.ref_counts[b] = 1
            seq.block_table.append(b)

    def share(self, src: Sequence, dst: Sequence, num_blocks: int) -> None:
        """dst's table starts with src's first num_blocks blocks (which must be full and read-only)."""
        if dst.block_table:
            raise RuntimeError("share() needs an empty destination table")
        for b in src.block_table[:num_blocks]:
            self.ref_counts[b] += 1
            dst.block_table.append(b)

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody references go back to the free list (most recent first)."""
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks.appendleft(b)
        seq.block_table = []

    def check_idle(self) -> None:
        """With no sequence left, every usable block must be free (O(1) when it holds; the engine calls it whenever
        it goes idle, so a leak fails at the request that caused it instead of as a slow shrink of the cache)."""
        if self.num_free_blocks != self.num_usable_blocks:
            held = [b for b in range(1, self.num_blocks) if self.ref_counts[b]]
            raise KVCacheLeakError(
                f"KV cache: no sequence is left but {self.num_usable_blocks - self.num_free_blocks} of "
                f"{self.num_usable_blocks} blocks are not free ({len(held)} with references, e.g. blocks {held[:8]})")

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Raise AssertionError unless the free list and ref counts agree with the given block tables."""
        counts = [0] * self.num_blocks
        for s in seqs:
            assert len(s.block_table) == len(set(s.block_table)), f"{s.request_id}: a block appears twice"
            assert len(s.block_table) * self.block_size >= s.num_computed_tokens, f"{s.request_id}: too few blocks"
            for b in s.block_table:
                counts[b] += 1
        assert counts[NULL_BLOCK] == 0 and self.ref_counts[NULL_BLOCK] == 0, "the reserved block was handed out"
        assert counts == self.ref_counts, "ref counts disagree with the block tables"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        assert NULL_BLOCK not in free, "the reserved block is on the free list"
        for b in range(1, self.num_blocks):
            assert (b in free) == (self.ref_counts[b] == 0), f"block {b}: free-list membership vs ref count"
