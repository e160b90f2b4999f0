"""ForwardContext: per-step attention metadata (sequence boundaries, KV slots, block tables).

The runner sets it around a model forward with `forward_context(ctx)`; attention layers read it with
`get_forward_context()`. It is the one global of the engine, and nesting is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    cu_seqlens_q: torch.Tensor  # [B+1] int32, token offsets of each sequence in this step
    query_lens: list[int]  # [B] new tokens per sequence (host copy: no device sync to read it)
    seq_lens: list[int]  # [B] KV length per sequence after this step (cached + new)
    slot_mapping: torch.Tensor | None = None  # [T] int64, cache slot of each new token; None = no cache
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    block_size: int = 0
    # device twins of the host lists, for kernels that must not sync (CUDA graphs)
    seq_lens_t: torch.Tensor | None = None  # [B] int32
    max_query_len: int = 0
    max_seq_len: int = 0  # an upper bound of seq_lens (under CUDA graphs: max_model_len)

    @classmethod
    def for_prompts(cls, lengths: list[int], device: torch.device | str = "cpu") -> ForwardContext:
        """Prefill of whole prompts with no KV cache (a plain batched forward)."""
        cu = torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
        return cls(cu_seqlens_q=cu, query_lens=list(lengths), seq_lens=list(lengths),
                   seq_lens_t=torch.tensor(lengths, dtype=torch.int32, device=device),
                   max_query_len=max(lengths, default=0), max_seq_len=max(lengths, default=0))

    @property
    def has_cache(self) -> bool:
        return self.slot_mapping is not None


_CONTEXT: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CONTEXT
    assert _CONTEXT is None, "forward_context does not nest"
    _CONTEXT = ctx
    try:
        yield ctx
    finally:
        _CONTEXT = None


def get_forward_context() -> ForwardContext:
    assert _CONTEXT is not None, "model forward called outside forward_context()"
    return _CONTEXT
