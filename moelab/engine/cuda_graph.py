"""CUDA graphs of the decode step (model forward + LM head) for a ladder of batch sizes.

A decode step of a small MoE model is hundreds of short kernels; replaying them as one graph removes the
launch and Python time between them. Each bucket is captured once, largest first so the smaller ones reuse
its memory pool, over static input buffers; a step pads its batch up to the next bucket with rows that
read and write only the reserved block 0 (slot 0, one token of context) and copies its inputs into the
buffers before the replay. Everything inside must be free of host syncs: the triton attention and MoE
paths are; the reference paths are not, so graphs are used only with attention "triton".
"""

from __future__ import annotations

import torch

from moelab.context import ForwardContext, forward_context
from moelab.models.decoder import MoECausalLM


def graph_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16: padding waste stays under ~12 % above 8."""
    sizes = [b for b in (1, 2, 4) if b < max_bs] + list(range(8, min(max_bs, 64) + 1, 8)) + \
        list(range(80, max_bs + 1, 16))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: MoECausalLM, max_bs: int, max_blocks_per_seq: int, block_size: int,
                 max_model_len: int, device: torch.device) -> None:
        self.model, self.block_size, self.max_model_len = model, block_size, max_model_len
        self.buckets = graph_buckets(max_bs)
        self.max_bs = self.buckets[-1]
        B = self.max_bs
        self.input_ids = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(B, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(B, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(B, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _context(self, bs: int) -> ForwardContext:
        return ForwardContext(cu_seqlens_q=self.cu_seqlens[:bs + 1], query_lens=[1] * bs, seq_lens=[1] * bs,
                              slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
                              block_size=self.block_size, seq_lens_t=self.seq_lens[:bs], max_query_len=1,
                              max_seq_len=self.max_model_len)

    def _forward(self, bs: int) -> torch.Tensor:
        with forward_context(self._context(bs)):
            hidden = self.model(self.input_ids[:bs], self.positions[:bs])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        for bs in reversed(self.buckets):
            self._forward(bs)  # compile and warm every kernel of this shape outside the graph
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[bs] = g
        torch.cuda.synchronize()

    def bucket(self, bs: int) -> int | None:
        for b in self.buckets:
            if b >= bs:
                return b
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Replay for a decode batch of n rows, already padded by the caller to a bucket size (padding rows: token
        0 at position 0, slot 0 of the reserved block, one token of context). Returns logits [bucket, V], valid
        until the next run."""
        n = input_ids.shape[0]
        bs = self.bucket(n)
        if bs != n:
            raise ValueError(f"decode batch of {n} rows: pad it to the bucket size {bs}")
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.block_tables[:n, :block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[bs]
