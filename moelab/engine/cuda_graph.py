"""CUDA graphs of the decode step (input fix-up, model forward, LM head, greedy ids) for a ladder of batch sizes.

A decode step of a small MoE model is hundreds of short kernels; replaying them as one graph removes the
launch and Python time between them. Each bucket is captured once, largest first so the smaller ones reuse
its memory pool, over static input buffers; a step pads its batch up to the next bucket with rows that
read and write only the reserved block 0 (slot 0, one token of context) and copies its inputs into the
buffers before the replay: one copy, plus one for the block tables when they changed. What used to run
between those copies and the replay (the int32 lengths, the ids of tokens still in flight) and the argmax
after it are inside the graph, so a greedy step is three device operations (copy in, replay, copy out), plus
the tables' copy when they changed and, after a step without a graph, one copy of its ids into the token buffer.
Everything inside must be free of host syncs: the triton attention and MoE paths are; the reference paths are
not, so graphs are used only with attention "triton".
"""

from __future__ import annotations

import torch

from moelab.context import ForwardContext, forward_context
from moelab.engine.sampler import greedy
from moelab.kernels.decode_inputs import feed_decode_inputs, feed_decode_inputs_ref
from moelab.models.decoder import MoECausalLM


def graph_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16: padding waste stays under ~12 % above 8."""
    sizes = [b for b in (1, 2, 4) if b < max_bs] + list(range(8, min(max_bs, 64) + 1, 8)) + \
        list(range(80, max_bs + 1, 16))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sorted(set(sizes))


class DecodeGraphs:
    """One captured decode step per bucket: input fix-up (moelab.kernels.decode_inputs), forward, LM head and the
    greedy ids, over static buffers.

    Per step the host fills one staging buffer [5, bucket] (ids, positions, slots, feed, context lengths) with a
    single copy, and the block tables only when they changed since the last upload; the greedy ids land in
    `tokens` [2, max_rows], where the next step's fed rows read them. A step that samples instead, or a step before
    it that ran without a graph, copies its ids into `tokens` (`set_tokens`). eager=True runs the same function
    without capturing it (tests of the buffers' plumbing on the CPU)."""

    def __init__(self, model: MoECausalLM, max_bs: int, max_blocks_per_seq: int, block_size: int,
                 max_model_len: int, device: torch.device, max_rows: int = 0, eager: bool = False) -> None:
        self.model, self.block_size, self.max_model_len, self.device = model, block_size, max_model_len, device
        self.eager = eager
        self.buckets = graph_buckets(max_bs)
        self.max_bs = self.buckets[-1]
        B = self.max_bs
        self.staging: dict[int, torch.Tensor] = {}
        for b in self.buckets:  # contiguous per bucket: one host-to-device copy fills it
            st = torch.zeros(5, b, dtype=torch.long, device=device)
            st[3] = -1  # no row fed from the previous step
            st[4] = 1  # one token of context
            self.staging[b] = st
        self.block_tables = torch.zeros(B, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(B, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=device)
        # the last step's sampled ids ([0] with -1 for an unusable row, [1] with 0 there): rows of any step's
        # sampling order, so as many as a step samples (max_num_seqs), not only a bucket's
        self.tokens = torch.zeros(2, max(B, max_rows), dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None
        self._tables_key: tuple[int, list[int]] | None = None
        self.num_table_uploads = 0  # how often the block tables were copied (the rest of the steps skip it)

    def _context(self, bs: int) -> ForwardContext:
        return ForwardContext(cu_seqlens_q=self.cu_seqlens[:bs + 1], query_lens=[1] * bs, seq_lens=[1] * bs,
                              slot_mapping=self.staging[bs][2], block_tables=self.block_tables[:bs],
                              block_size=self.block_size, seq_lens_t=self.seq_lens[:bs], max_query_len=1,
                              max_seq_len=self.max_model_len)

    def _step(self, bs: int) -> torch.Tensor:
        st = self.staging[bs]
        if st.is_cuda:
            feed_decode_inputs(st, self.tokens[1], self.seq_lens[:bs])
        else:
            feed_decode_inputs_ref(st, self.tokens[1], self.seq_lens[:bs])
        with forward_context(self._context(bs)):
            hidden = self.model(st[0], st[1])
        logits = self.model.compute_logits(hidden)
        greedy(logits, out=self.tokens[:, :bs])
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        if self.eager:
            return
        for bs in reversed(self.buckets):
            self._step(bs)  # compile and warm every kernel of this shape outside the graph
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.logits[bs] = self._step(bs)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[bs] = g
        self.tokens.zero_()
        torch.cuda.synchronize()

    def bucket(self, bs: int) -> int | None:
        for b in self.buckets:
            if b >= bs:
                return b
        return None

    def upload(self, bs: int, inputs: list[int], tables: list[int], width: int) -> None:
        """Enqueue the copies of one step's inputs for bucket bs: inputs = ids + positions + slots + feed + context
        lengths (bs each, padded); tables = the block tables, bs rows of width entries, copied only when they
        differ from the last upload's (a sequence gains a block every block_size steps)."""
        if bs not in self.staging:
            raise ValueError(f"no graph for a batch of {bs} rows; buckets are {self.buckets}")
        if len(inputs) != 5 * bs or len(tables) != bs * width:
            raise ValueError(f"bucket {bs}: want {5 * bs} inputs and {bs} x {width} table entries, got "
                             f"{len(inputs)} and {len(tables)}")
        pin = self.device.type == "cuda"  # pinned: the copies do not wait for the device
        self.staging[bs].copy_(torch.tensor(inputs, dtype=torch.long, pin_memory=pin).view(5, bs), non_blocking=True)
        key = (width, tables)
        if key != self._tables_key:
            t = torch.tensor(tables, dtype=torch.int32, pin_memory=pin).view(bs, width)
            self.block_tables[:bs, :width].copy_(t, non_blocking=True)
            self._tables_key = key
            self.num_table_uploads += 1

    def set_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids copied into `tokens`, where the next graph step's fed rows read them: a sampled step's [2, n], or the
        fed row [n] (ids with 0 for unusable rows) of a step that ran without a graph. Returns the view written."""
        n = ids.shape[-1]
        if n > self.tokens.shape[1]:
            raise ValueError(f"{n} sampled rows, room for {self.tokens.shape[1]}")
        dst = self.tokens[:, :n] if ids.dim() == 2 else self.tokens[1, :n]
        if ids.data_ptr() == dst.data_ptr() and ids.stride() == dst.stride():
            return dst  # already there (an all-greedy batch that sampled nothing)
        return dst.copy_(ids)

    def replay(self, bs: int) -> torch.Tensor:
        """Run the step of bucket bs over what upload() staged. Returns logits [bs, V] (valid until the next
        replay); the greedy ids are in tokens[:, :bs]."""
        if self.eager:
            with torch.inference_mode():
                return self._step(bs)
        self.graphs[bs].replay()
        return self.logits[bs]
