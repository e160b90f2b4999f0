"""The floor of a benchmark point: moelab.roofline's step floors composed over the schedule of an offline batch.

Schedule assumed (the engine's, idealized): prefill packs whole prompts, in order, into steps of at most
max_num_batched_tokens tokens (a longer prompt is split into budget-sized chunks; each step's context is the
tokens so far), and every prefill step also samples the first token of the prompts it finishes. Then one
decode step per further output token, over the requests still running: step i (1 <= i < max output) feeds one
token to each request with output_len > i, whose context is input_len + i.

Routing: the uniform expectation of touched experts per step, unless `touched_for(T)` gives the distinct experts
per MoE layer of a step of T tokens (the observed routing: moelab.lab.bench averages the engine's routing
recorder over the recorded steps of each token count; a None answer falls back to uniform). Weights and KV
are counted at the run's dtype size (2 bytes for bf16 and fp16, 4 for float32).

Derived floors of the latency metrics, each only for the statistics it bounds from below:
- TTFT: per rank. When k requests have their first token, k whole prompts were prefilled, at least the k
  shortest: the k-th smallest TTFT >= ttft[k-1], the prefill floor of the k shortest prompts alone (packed as
  above). Every order statistic (min, median, percentiles, max) and the mean of the measured TTFTs is then >= the
  same statistic of `ttft`, so their % of floor is <= 100.
- ITL and TPOT: the mean decode step, for the mean only (a gap in a bigger step counts more often in the pooled
  ITLs, and bigger steps have higher floors).
- E2E: the whole run, for the max only (the last request ends with the run).
- Throughputs: tokens / run floor.
With fixed lengths and input_len <= max_num_batched_tokens the run floor equals moelab.roofline.offline_run_floor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moelab.roofline import Ceilings, Floor, step_floor
from moelab.spec import ModelSpec

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
ZERO = Floor(0.0, 0.0, 0.0, "memory")


@dataclass(frozen=True)
class RunFloors:
    prefill: Floor
    decode: Floor
    decode_steps: int
    ttft: tuple[float, ...] = ()  # seconds, ascending: the floor of the k-th smallest TTFT at index k - 1

    @property
    def total(self) -> Floor:
        return self.prefill + self.decode

    @property
    def decode_step_seconds(self) -> float:
        """Mean decode step floor; 0 when there is no decode step (every output is one token)."""
        return self.decode.seconds / self.decode_steps if self.decode_steps else 0.0


def prefill_steps(in_lens: Sequence[int], budget: int) -> list[tuple[list[int], list[int], int]]:
    """The prefill steps: (new tokens per sequence, context per sequence, rows sampled) for each step."""
    if budget < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {budget}")
    steps: list[tuple[list[int], list[int], int]] = []
    new: list[int] = []
    ctx: list[int] = []
    rows = 0
    for n in in_lens:
        done = 0
        while done < n:
            room = budget - sum(new)
            if room == 0:
                steps.append((new, ctx, rows))
                new, ctx, rows = [], [], 0
                room = budget
            take = min(room, n - done)
            done += take
            new.append(take)
            ctx.append(done)
            rows += done == n
    if new:
        steps.append((new, ctx, rows))
    return steps


def run_floors(spec: ModelSpec, in_lens: Sequence[int], out_lens: Sequence[int], c: Ceilings,
               max_num_batched_tokens: int = 8192, dtype: str = "bfloat16",
               touched_for: Callable[[int], Sequence[float] | None] | None = None) -> RunFloors:
    """Prefill and decode floors of one offline batch (see the module docstring for the schedule)."""
    if len(in_lens) != len(out_lens) or not in_lens:
        raise ValueError(f"need one output length per prompt, got {len(in_lens)} prompts, {len(out_lens)} outputs")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    nb = DTYPE_BYTES[dtype]
    kw = dict(weight_bytes=nb, kv_bytes=nb)
    routed = touched_for or (lambda T: None)

    def prefill_floor(lens: Sequence[int]) -> Floor:
        total = ZERO
        for new, ctx, rows in prefill_steps(lens, max_num_batched_tokens):
            total = total + step_floor(spec, new, ctx, c, logits_rows=rows, touched=routed(sum(new)), **kw)
        return total

    prefill = prefill_floor(in_lens)
    shortest = sorted(in_lens)
    ttft = tuple(prefill_floor(shortest[:k]).seconds for k in range(1, len(shortest) + 1))
    decode = ZERO
    steps = 0
    for i in range(1, max(out_lens)):
        live = [n_in + i for n_in, n_out in zip(in_lens, out_lens) if n_out > i]
        decode = decode + step_floor(spec, [1] * len(live), live, c, touched=routed(len(live)), **kw)
        steps += 1
    return RunFloors(prefill, decode, steps, ttft)
