"""Reference greedy generation: a whole batch prefilled at once, then one token per sequence per step,
through the paged KV cache with a trivial block allocation (each sequence owns consecutive blocks).

It is the slow, obviously-correct twin of the engine: the engine's greedy output must equal it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from moelab.context import ForwardContext, forward_context
from moelab.models.decoder import MoECausalLM


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each token was ready
    finish_reason: str = "length"


def allocate_kv_cache(model: MoECausalLM, num_blocks: int, block_size: int) -> None:
    p = next(model.parameters())
    for m in model.attention_modules():
        m.kv_cache = torch.zeros(m.cache_shape(num_blocks, block_size), dtype=p.dtype, device=p.device)


def free_kv_cache(model: MoECausalLM) -> None:
    for m in model.attention_modules():
        m.kv_cache = None


def _step_context(block_tables: torch.Tensor, block_size: int, starts: list[int], lens: list[int]
                  ) -> tuple[ForwardContext, torch.Tensor]:
    """Context for a step where sequence b adds lens[b] tokens at positions starts[b]..; returns positions too."""
    device = block_tables.device
    positions = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lens)])
    seq_idx = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
    slots = block_tables[seq_idx, positions // block_size].long() * block_size + positions % block_size
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    ctx = ForwardContext(cu_seqlens_q=cu, query_lens=lens, seq_lens=[s + n for s, n in zip(starts, lens)],
                         slot_mapping=slots, block_tables=block_tables, block_size=block_size)
    return ctx, positions


@torch.inference_mode()
def generate_greedy(model: MoECausalLM, prompts: list[list[int]], max_new_tokens: int,
                    eos_token_id: int | None = None, block_size: int = 16) -> list[Generation]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    max_len = max(len(p) for p in prompts) + max_new_tokens
    per_seq = -(-max_len // block_size)
    block_tables = torch.arange(len(prompts) * per_seq, device=device, dtype=torch.int32).view(len(prompts), -1)
    allocate_kv_cache(model, len(prompts) * per_seq, block_size)
    gens = [Generation(list(p)) for p in prompts]
    try:
        active = list(range(len(prompts)))
        inputs = [list(p) for p in prompts]
        starts = [0] * len(prompts)
        while active and max_new_tokens > 0:
            ctx, positions = _step_context(block_tables[active], block_size, [starts[b] for b in active],
                                           [len(inputs[b]) for b in active])
            ids = torch.tensor([t for b in active for t in inputs[b]], device=device)
            with forward_context(ctx):
                hidden = model(ids, positions)
            last = ctx.cu_seqlens_q[1:].long() - 1
            next_ids = model.compute_logits(hidden[last]).argmax(dim=-1).tolist()
            now = time.perf_counter()
            for b, tok in zip(active, next_ids):
                starts[b] += len(inputs[b])
                inputs[b] = [tok]
                gens[b].token_ids.append(tok)
                gens[b].token_times.append(now)
                if eos_token_id is not None and tok == eos_token_id:
                    gens[b].finish_reason = "stop"
            active = [b for b in active if gens[b].finish_reason != "stop"
                      and len(gens[b].token_ids) < max_new_tokens]
    finally:
        free_kv_cache(model)
    return gens
