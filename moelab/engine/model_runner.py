"""ModelRunner: turns a scheduled batch into device tensors, runs the model and samples.

It owns the model, the KV pool (one tensor per attention module, shaped by the module's cache_shape) and
the decode CUDA graphs. Inputs are built on the host from the sequences' block tables and copied in one
go; logits are computed only for the rows that sample (the last token of a finished prompt chunk or a
decode), then the sampler runs on the device and one copy brings the token ids back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from moelab.context import ForwardContext, forward_context
from moelab.engine.config import EngineConfig
from moelab.engine.cuda_graph import DecodeGraphs
from moelab.engine.sampler import SamplingBatch, greedy, sample
from moelab.engine.sampling_params import SamplingParams
from moelab.engine.scheduler import ScheduledBatch
from moelab.engine.sequence import Sequence
from moelab.models.decoder import MoECausalLM


def cache_bytes_per_block(model: MoECausalLM, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    total = 0
    for m in model.attention_modules():
        n = 1
        for d in m.cache_shape(1, block_size):
            n *= d
        total += n * elem
    return total


def padded_tables(seqs: list[Sequence], width: int, rows: int) -> list[int]:
    """The block tables of seqs flattened to rows x width ints: each padded with block 0, then rows of block 0."""
    flat: list[int] = []
    for s in seqs:
        flat += s.block_table
        flat += [0] * (width - len(s.block_table))
    return flat + [0] * (width * (rows - len(seqs)))


class ModelRunner:
    def __init__(self, config: EngineConfig, model: MoECausalLM, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.config, self.model, self.device, self.dtype = config, model, device, dtype
        self.max_model_len, self.eos_token_ids = max_model_len, tuple(eos_token_ids)
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.seq_generators: dict[int, torch.Generator] = {}
        self.graphs: DecodeGraphs | None = None
        self.num_blocks = 0
        self.recorder = None
        if config.record_routing:
            from moelab.engine.routing_recorder import RoutingRecorder

            self.recorder = RoutingRecorder(model, max(config.max_num_batched_tokens, config.cuda_graph_max_bs,
                                                       config.max_num_seqs), device)

    # ----- KV pool -----
    def profile_peak_bytes(self) -> int:
        """Activation peak of the largest step (max_num_batched_tokens prompt tokens), measured on the GPU."""
        if self.device.type != "cuda":
            return 0
        n = min(self.config.max_num_batched_tokens, self.max_model_len * self.config.max_num_seqs)
        lens = []
        while n > 0:
            lens.append(min(n, self.max_model_len))
            n -= lens[-1]
        blocks = sum(-(-m // self.block_size) for m in lens) + 1
        self._allocate(blocks)
        tables = []
        nxt = 1
        for m in lens:
            k = -(-m // self.block_size)
            tables.append(list(range(nxt, nxt + k)))
            nxt += k
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seqs = []
        for i, m in enumerate(lens):
            s = Sequence(f"profile-{i}", [1] * m, params=SamplingParams(temperature=0.0), max_tokens=1)
            s.block_table = tables[i]
            seqs.append(s)
        self.execute(ScheduledBatch(seqs=seqs, num_tokens=list(lens)))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        self._free_cache()
        return peak

    def _allocate(self, num_blocks: int) -> None:
        for m in self.model.attention_modules():
            m.kv_cache = torch.zeros(m.cache_shape(num_blocks, self.block_size), dtype=self.dtype, device=self.device)
        self.num_blocks = num_blocks

    def _free_cache(self) -> None:
        for m in self.model.attention_modules():
            m.kv_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def init_kv_cache(self) -> int:
        """Size and allocate the KV pool; returns the number of blocks (block 0 reserved)."""
        per_block = cache_bytes_per_block(self.model, self.block_size, self.dtype)
        needed = self.max_blocks_per_seq + 1
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            peak = self.profile_peak_bytes()
            free, total = torch.cuda.mem_get_info()
            graph_reserve = 256 << 20 if not self.config.enforce_eager else 0
            budget = total * self.config.gpu_memory_utilization - (total - free) - peak - graph_reserve
            num_blocks = int(budget // per_block)
        else:
            full = self.config.max_num_seqs * self.max_blocks_per_seq + 1
            num_blocks = min(full, int(self.config.cpu_kv_cache_gib * (1 << 30) // per_block))
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {max(num_blocks - 1, 0) * self.block_size} tokens "
                f"({num_blocks} blocks of {self.block_size}, {per_block} bytes each), less than one sequence of "
                f"max_model_len={self.max_model_len}; lower max_model_len, or raise gpu_memory_utilization / "
                f"num_kv_blocks")
        self._allocate(num_blocks)
        return num_blocks

    @torch.inference_mode()
    def warmup_token_counts(self) -> list[int]:
        """Token counts whose prefill compiles every kernel variant a step can meet: 16, 64, 256, ... and, per
        MoE layer shape, one count for each distinct tile config the fused MoE kernel picks for 1..budget tokens
        (a tuned table switches config at many counts; a mixed step of 15 decodes and a 340-token chunk would
        otherwise compile in a user's request: seen as 2.4 s TTFTs in a serving run)."""
        from moelab.kernels.fused_moe import _device_name
        from moelab.kernels.fused_moe_config import get_config, use_naive_blocks
        from moelab.layers.moe.layer import SparseMoE

        budget = min(self.config.max_num_batched_tokens, self.max_model_len)
        counts = {n for n in (2, 4, 8, 16, 32, 64, 256, 1024, 4096) if n <= budget}  # attention's query tiles
        if self.device.type != "cuda":
            return sorted(counts)
        name = _device_name(self.device.index or 0)
        quant = None
        shapes = set()
        for m in self.model.modules():
            if isinstance(m, SparseMoE):
                scales = getattr(m.experts, "scales", None)
                quant = getattr(scales, "format", None) if scales is not None else None
                E, two_i, D = m.experts.w13.shape
                shapes.add((E, m.router_config.top_k, two_i // 2, D, quant))
        dtype = str(self.dtype).removeprefix("torch.")
        for E, K, I, D, q in shapes:
            last = None
            for t in range(1, budget + 1):
                key = (use_naive_blocks(t, K, E), get_config(t, E, K, I, D, q or dtype, "cuda", name))
                if key != last:
                    counts.add(t)
                    last = key
        return sorted(counts)

    def warmup_prefill(self, force: bool = False) -> None:
        """Compile the prefill kernels of every token count that selects a new kernel variant now rather than in a
        user's first request (Triton compiles per tile config, and the MoE configs change with the number of
        tokens). Each warm-up step is one sequence whose tokens all write slot 0 and read block 0, the reserved
        block."""
        if self.device.type != "cuda" and not force:  # force: the CPU test of these steps
            return
        dev = self.device
        for n in self.warmup_token_counts():
            # one sequence of n tokens, then the same with a decode row beside it (a serving step's mixed shape)
            for lens in ([n], [n, 1]) if n + 1 <= self.config.max_num_batched_tokens else ([n],):
                T = sum(lens)
                cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)
                ctx = ForwardContext(
                    cu_seqlens_q=cu, query_lens=lens, seq_lens=lens,
                    slot_mapping=torch.zeros(T, dtype=torch.long, device=dev),
                    block_tables=torch.zeros(len(lens), self.max_blocks_per_seq, dtype=torch.int32, device=dev),
                    block_size=self.block_size, seq_lens_t=torch.tensor(lens, dtype=torch.int32, device=dev),
                    max_query_len=n, max_seq_len=self.max_model_len)
                with forward_context(ctx):
                    hidden = self.model(torch.zeros(T, dtype=torch.long, device=dev),
                                        torch.cat([torch.arange(x, device=dev) for x in lens]))
                self.model.compute_logits(hidden[cu[1:].long() - 1])
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def capture_graphs(self) -> None:
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        self.graphs = DecodeGraphs(self.model, min(self.config.cuda_graph_max_bs, self.config.max_num_seqs),
                                   self.max_blocks_per_seq, self.block_size, self.max_model_len, self.device,
                                   max_rows=self.config.max_num_seqs)
        self.graphs.capture()

    # ----- one step -----
    def _prepare(self, batch: ScheduledBatch, prev: InFlight | None = None, sampling: list[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext, list[int], torch.Tensor | None]:
        """Device inputs of a step without a CUDA graph. A sequence whose last token is still in flight (prev's
        sampled ids, on the device) gets it copied in on the device. sampling: indices of
        the sequences that sample; their last rows come back as a device tensor too (else None), from the same
        pinned buffer and asynchronous copy as the rest (a torch.tensor(..., device=cuda) of its own would be a
        synchronous copy: the host would wait for the step's forward before preparing the next one)."""
        bs = self.block_size
        seqs = batch.seqs
        fix_at: list[int] = []  # positions in ids whose token comes from prev's device ids
        fix_from: list[int] = []
        if batch.all_decode:
            pos = [s.num_computed_tokens for s in seqs]
            ids = [s.token_ids[-1] if not s.pending else 0 for s in seqs]
            if prev is not None:
                for i, s in enumerate(seqs):
                    if s.pending:
                        fix_at.append(i)
                        fix_from.append(prev.rows[id(s)])
            slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
            seq_lens = [p + 1 for p in pos]
            query_lens = [1] * len(seqs)
            last = list(range(len(seqs)))
            max_blocks = max(len(s.block_table) for s in seqs)
        else:
            ids, pos, slots = [], [], []
            query_lens, seq_lens, last = [], [], []
            max_blocks = 1
            for seq, n in zip(seqs, batch.num_tokens):
                c = seq.num_computed_tokens
                if seq.pending:  # a decode of the token in flight
                    fix_at.append(len(ids))
                    fix_from.append(prev.rows[id(seq)])
                    ids.append(0)
                else:
                    ids += seq.token_ids[c:c + n]
                r = range(c, c + n)
                pos += r
                table = seq.block_table
                slots += [table[p // bs] * bs + p % bs for p in r]
                query_lens.append(n)
                seq_lens.append(c + n)
                max_blocks = max(max_blocks, len(table))
                last.append(len(ids) - 1)
        flat_tables = padded_tables(seqs, max_blocks, len(seqs))
        cu = list(range(len(query_lens) + 1)) if batch.all_decode else [0]
        if not batch.all_decode:
            for n in query_lens:
                cu.append(cu[-1] + n)
        # one host buffer and one copy for the 1-D inputs, one for the block tables
        T, B = len(ids), len(seq_lens)
        pin = self.device.type == "cuda"
        C = len(cu)
        rows = [last[i] for i in sampling] if sampling is not None else []
        flat = torch.tensor(ids + pos + slots + seq_lens + cu + fix_at + fix_from + rows, dtype=torch.long,
                            pin_memory=pin)
        flat = flat.to(self.device, non_blocking=True)
        rows_t = flat[flat.numel() - len(rows):] if sampling is not None else None
        ids_t, pos_t, slots_t = flat[:T], flat[T:2 * T], flat[2 * T:3 * T]
        seq_lens_t = flat[3 * T:3 * T + B].to(torch.int32)
        cu_t = flat[3 * T + B:3 * T + B + C].to(torch.int32)
        if fix_at:
            k = 3 * T + B + C
            ids_t = ids_t.clone()
            ids_t[flat[k:k + len(fix_at)]] = prev.tokens_dev[flat[k + len(fix_at):k + 2 * len(fix_at)]]
        tables_t = torch.tensor(flat_tables, dtype=torch.int32, pin_memory=pin).view(-1, max_blocks)
        tables_t = tables_t.to(self.device, non_blocking=True)
        ctx = ForwardContext(cu_seqlens_q=cu_t, query_lens=query_lens, seq_lens=seq_lens[:len(query_lens)],
                             slot_mapping=slots_t, block_tables=tables_t, block_size=bs, seq_lens_t=seq_lens_t,
                             max_query_len=max(query_lens), max_seq_len=self.max_model_len)
        return ids_t, pos_t, ctx, last, rows_t

    def _stage_decode(self, batch: ScheduledBatch, bucket: int, prev: InFlight | None) -> None:
        """Inputs of a decode step under the CUDA graph of `bucket` rows, enqueued into its static buffers
        (DecodeGraphs.upload). Padding rows feed token 0 at position 0 of the reserved block 0 with one token of
        context. A sequence whose last token is still in flight is fed inside the graph from prev's sampled ids,
        which are in the graph's token buffer already unless prev ran without a graph or sampled."""
        graphs, bs = self.graphs, self.block_size
        seqs = batch.seqs
        ids, pos, slots, feed, lens = [], [], [], [], []
        for s in seqs:
            p = s.num_computed_tokens
            pos.append(p)
            slots.append(s.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            if s.pending:
                ids.append(0)
                feed.append(prev.rows[id(s)])
            else:
                ids.append(s.token_ids[-1])
                feed.append(-1)
        width = max(len(s.block_table) for s in seqs)
        tables = padded_tables(seqs, width, bucket)
        extra = bucket - len(seqs)
        inputs = ids + [0] * extra + pos + [0] * extra + slots + [0] * extra + feed + [-1] * extra + lens + \
            [1] * extra
        if prev is not None and not prev.in_graph_tokens and any(f >= 0 for f in feed):
            graphs.set_tokens(prev.tokens_dev)
        graphs.upload(bucket, inputs, tables, width)

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        temps, ks, ps, gens, banned = [], [], [], [], []
        for s in seqs:
            p = s.params
            temps.append(p.temperature)
            ks.append(p.top_k if p.top_k > 0 else 0)
            ps.append(p.top_p)
            g = None
            if p.seed is not None and not p.greedy:
                g = self.seq_generators.get(id(s))
                if g is None:
                    g = self.seq_generators[id(s)] = torch.Generator(device=self.device).manual_seed(p.seed)
            gens.append(g)
            ban: list[int] = []
            if s.num_output_tokens < p.min_tokens:
                ban = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
            banned.append(ban)
        dev, pin = self.device, self.device.type == "cuda"  # pinned: the copies do not wait for the device
        return SamplingBatch(
            temperature=torch.tensor(temps, dtype=torch.float32, pin_memory=pin).to(dev, non_blocking=True),
            top_k=torch.tensor(ks, dtype=torch.long, pin_memory=pin).to(dev, non_blocking=True),
            top_p=torch.tensor(ps, dtype=torch.float32, pin_memory=pin).to(dev, non_blocking=True),
            generators=gens, banned=banned, all_greedy=all(x == 0 for x in temps),
            any_top_k=any(k > 0 for k in ks), any_top_p=any(p < 1 for p in ps))

    def forget(self, seq: Sequence) -> None:
        self.seq_generators.pop(id(seq), None)

    def execute(self, batch: ScheduledBatch) -> list[int | None]:
        """Run one step to the end; returns, per scheduled sequence, the sampled token id or None."""
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: InFlight | None = None) -> InFlight:
        """Enqueue one step on the device (inputs, forward or graph replay, sampling, the copy of the sampled ids
        to the host) without waiting for it. prev: the step still in flight, whose sampled ids some of this
        step's sequences feed (they are read on the device)."""
        n = len(batch)
        sampling = list(range(n)) if batch.all_decode else [i for i in range(n) if batch.samples(i)]
        rec = self.recorder
        graphs = self.graphs if batch.all_decode and self.graphs is not None and n <= self.graphs.max_bs else None
        bucket = graphs.bucket(n) if graphs is not None else 0
        flight = InFlight(batch, sampling, {id(batch.seqs[i]): r for r, i in enumerate(sampling)})
        if graphs is not None:
            self._stage_decode(batch, bucket, prev)
            if rec is not None:
                rec.set_valid(n, bucket)
            logits = graphs.replay(bucket)[:n]
            flight.in_graph_tokens = True
        else:
            input_ids, positions, ctx, _, sample_rows = self._prepare(batch, prev=prev, sampling=sampling)
            if rec is not None:
                rec.set_valid(input_ids.shape[0], input_ids.shape[0])
            with forward_context(ctx):
                hidden = self.model(input_ids, positions)
            if not sampling:
                if rec is not None:
                    flight.routing = rec.snapshot(input_ids.shape[0])
                return flight
            logits = self.model.compute_logits(hidden[sample_rows])
        if rec is not None:
            flight.routing = rec.snapshot(bucket if graphs is not None else input_ids.shape[0])
        seqs = [batch.seqs[i] for i in sampling]
        if all(s.params.greedy and s.num_output_tokens >= s.params.min_tokens for s in seqs):
            # the common benchmark case: no sampling tensors at all (-1: unusable row); a graph computed them
            tokens = graphs.tokens[:, :n] if graphs is not None else greedy(logits)
        else:
            tokens = sample(logits, self._sampling_batch(seqs), self.generator,
                            greedy_ids=graphs.tokens[:, :n] if graphs is not None else None)
            if graphs is not None:  # where the next step's fed rows read them
                tokens = graphs.set_tokens(tokens)
        tokens, flight.tokens_dev = tokens[0], tokens[1]  # -1 for an unusable row / 0 there, fed back as input
        if self.device.type == "cuda":
            flight.tokens_host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            flight.tokens_host.copy_(tokens, non_blocking=True)
            flight.event = torch.cuda.Event()
            flight.event.record()
        else:  # the graph's token buffer is overwritten by the next step: keep this step's own copy
            flight.tokens_host = tokens.clone() if flight.in_graph_tokens else tokens
        return flight

    def collect(self, flight: InFlight) -> list[int | None]:
        """Wait for a launched step; per scheduled sequence, its sampled token id or None."""
        if flight.event is not None:
            flight.event.synchronize()
        elif flight.routing is not None and self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # a prompt-chunk step: only the routing copy to wait for
        if flight.routing is not None:
            self.recorder.collect(flight.routing)
        out: list[int | None] = [None] * len(flight.batch)
        if flight.tokens_host is not None:
            for i, tok in zip(flight.sampling, flight.tokens_host.tolist()):
                out[i] = tok
        return out


@dataclass(eq=False)
class InFlight:
    """A launched step: its batch, which rows sample, their ids on the device and (after an event) the host."""

    batch: ScheduledBatch
    sampling: list[int]
    rows: dict[int, int]  # id(sequence) -> row of tokens_dev
    tokens_dev: torch.Tensor | None = None
    tokens_host: torch.Tensor | None = None
    event: torch.cuda.Event | None = None
    routing: tuple | None = None  # the routing recorder's snapshot of this step
    in_graph_tokens: bool = False  # tokens_dev is a view of the decode graphs' token buffer
