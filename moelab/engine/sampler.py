"""Sampling on the device: greedy, temperature, top-k, top-p, min-tokens masking, per-request seeds.

`sampling_probs` turns logits into the distribution each row samples from; `sample` draws from it with the
exponential race (argmax p_i / E_i with E_i ~ Exp(1) is a draw from p), which needs no cumulative sums and
lets a seeded request take its noise from its own generator. Greedy rows take the argmax of the logits.
`sampling_probs_ref` is the row-by-row twin of `sampling_probs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row parameters, as device tensors where the math needs them."""

    temperature: torch.Tensor  # [N] float32; 0 = greedy
    top_k: torch.Tensor  # [N] int64; 0 = off
    top_p: torch.Tensor  # [N] float32; 1 = off
    generators: list[torch.Generator | None]  # per row; None = the engine's generator
    banned: list[list[int]]  # per row: token ids masked this step (EOS before min_tokens)
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool


def _apply_banned(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    V = logits.shape[1]
    flat = [i * V + t for i, ids in enumerate(banned) for t in ids if 0 <= t < V]
    if flat:
        # the flat (row, token) positions reach the device through a pinned buffer and an asynchronous copy, and
        # index_fill_ takes -inf as a kernel argument: indexing with Python lists, or assigning a Python scalar
        # through advanced indexing (a 0-dim tensor copied from pageable memory), waits for the device
        idx = torch.tensor(flat, dtype=torch.long, pin_memory=logits.is_cuda).to(logits.device, non_blocking=True)
        logits = logits.clone(memory_format=torch.contiguous_format)
        logits.view(-1).index_fill_(0, idx, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """logits [N, V] -> probabilities [N, V] float32 after temperature, top-k and top-p (greedy rows: any)."""
    logits = logits.float() / b.temperature.clamp(min=1e-5)[:, None]
    if not (b.any_top_k or b.any_top_p):
        return logits.softmax(dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[1]
    if b.any_top_k:
        k = torch.where(b.top_k > 0, b.top_k, V).clamp(max=V)
        rank = torch.arange(V, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    if b.any_top_p:
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        cut = before >= b.top_p[:, None]
        cut[:, 0] = False  # the top token always stays (a top_p that rounds to 0 in float32 is greedy, not NaN)
        probs = probs.masked_fill(cut, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.empty_like(probs).scatter_(1, order, probs)


def sampling_probs_ref(logits: torch.Tensor, temperature: list[float], top_k: list[int],
                       top_p: list[float]) -> torch.Tensor:
    """One row at a time, the textbook way: keep the k most likely, then the smallest prefix with mass >= p."""
    out = torch.zeros(logits.shape, dtype=torch.float32)
    for i, row in enumerate(logits.float().cpu()):
        p = (row / max(temperature[i], 1e-5)).softmax(-1)
        order = p.argsort(descending=True, stable=True).tolist()
        keep = order[:top_k[i]] if top_k[i] > 0 else order
        kept = p[keep] / p[keep].sum()
        if top_p[i] < 1.0:
            cum, n = 0.0, 0
            while n < len(keep) and cum < top_p[i]:
                cum += kept[n].item()
                n += 1
            keep = keep[:max(n, 1)]  # the top token always stays
        q = torch.zeros_like(p)
        q[keep] = p[keep]
        out[i] = q / q.sum()
    return out


def greedy(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[2, N]: argmax per row, -1 where a row has a NaN or a non-finite maximum; and the same with 0 there (the id
    fed back to the device). moelab.kernels.argmax on CUDA, its torch twin elsewhere. out: an int64 [2, N] to
    write into (a CUDA graph's static buffer), returned."""
    if logits.is_cuda:
        from moelab.kernels.argmax import argmax_rows

        return argmax_rows(logits if logits.stride(-1) == 1 else logits.contiguous(), out=out)
    from moelab.kernels.argmax import argmax_rows_ref

    ids = argmax_rows_ref(logits)
    return ids if out is None else out.copy_(ids)


def sample(logits: torch.Tensor, b: SamplingBatch, generator: torch.Generator | None = None,
           greedy_ids: torch.Tensor | None = None) -> torch.Tensor:
    """logits [N, V] -> [2, N] int64 on the device: the token ids, -1 for a row whose logits are not usable (a NaN,
    or a non-finite maximum) whatever its sampling parameters; and the same with 0 there (fed back to the device).
    greedy_ids: greedy(logits) when already computed (a decode graph ends with it); recomputed if tokens are
    banned."""
    if greedy_ids is None or any(b.banned):
        logits = _apply_banned(logits, b.banned)
        greedy_ids = greedy(logits)
    if b.all_greedy:
        return greedy_ids
    probs = sampling_probs(logits, b)
    # every row from the engine's generator, then the seeded rows from their own (integer row indices: no index
    # tensor, hence no copy from the host that would wait for the device)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for i, g in enumerate(b.generators):
        if g is not None:
            noise[i] = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=g)
    sampled = (probs / noise).argmax(dim=-1)
    ids = torch.where(b.temperature == 0, greedy_ids[1], sampled)
    return torch.stack([torch.where(greedy_ids[0] < 0, -1, ids), torch.where(greedy_ids[0] < 0, 0, ids)])
