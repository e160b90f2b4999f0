"""Benchmark metrics: the formulas, in one place, on plain numbers (no engine, no torch).

Per request (times in seconds, from the engine's perf_counter timestamps, see moelab.engine.outputs):

- TTFT = first_token_time - arrival_time. In an offline batch every request arrives when the batch is queued,
  so TTFT includes waiting for the other prompts' prefill chunks.
- TTFT (one-token run, MoE-Inference-Bench's method) = wall time of generating exactly one output token for
  the whole batch: queue -> every prompt prefilled -> first token of every request on the host.
- ITL = every gap token_times[i] - token_times[i-1] (i >= 1), pooled over all requests (vLLM's ITL).
- TPOT = (E2E - TTFT) / (n_out - 1) per request, only for requests with n_out > 1 (vLLM's TPOT; GuideLLM and
  AIPerf call this "ITL").
- E2E = finished_time - arrival_time.

Per batch (wall = end-to-end seconds of the generate call, host-synchronous: it returns when the last token is on
the host):

- throughput (MoE-Inference-Bench Eq. 2) = sum(input_len + output_len) / wall, which is
  batch x (input + output) / wall for fixed lengths. Counts input tokens.
- output throughput = sum(output_len) / wall.   request throughput = requests / wall.

Statistics over a sample: mean, median, p90, p99 (numpy's linear interpolation between order statistics, as
vLLM), std (population, ddof=0), min, max. Across trials: the spread of a per-trial value is reported as
mean, std (ddof=1), min, max and cv = std / mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

STATS = ("mean", "median", "p90", "p99", "std", "min", "max")


@dataclass(frozen=True)
class RequestTimes:
    """The timestamps of one finished request (perf_counter seconds) and its token counts."""

    arrival: float
    first_token: float
    token_times: Sequence[float]
    finished: float
    num_input: int
    num_output: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finished - self.arrival

    @property
    def itl(self) -> list[float]:
        t = list(self.token_times)
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (n_out - 1); None for a one-token output (no decode step to average)."""
        return None if self.num_output <= 1 else (self.e2e - self.ttft) / (self.num_output - 1)


def summarize(values: Iterable[float]) -> dict[str, float]:
    """mean, median, p90, p99, std (ddof 0), min, max of a sample; NaN for every stat of an empty sample."""
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if a.size == 0:
        return {k: math.nan for k in STATS}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Spread of a per-trial value: n, mean, std (ddof 1; 0 for one trial), min, max, cv = std / mean."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("spread of no trials")
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    mean = float(a.mean())
    return {"n": int(a.size), "mean": mean, "std": std, "min": float(a.min()), "max": float(a.max()),
            "cv": std / mean if mean else math.nan}


def throughput(num_input: Sequence[int], num_output: Sequence[int], wall: float) -> dict[str, float]:
    """Batch rates over one timed generate call: throughput (input + output tok/s, the paper's), output tok/s,
    requests/s."""
    if wall <= 0:
        raise ValueError(f"wall time must be > 0, got {wall}")
    if len(num_input) != len(num_output):
        raise ValueError(f"{len(num_input)} input lengths but {len(num_output)} output lengths")
    return {"throughput": (sum(num_input) + sum(num_output)) / wall, "output_throughput": sum(num_output) / wall,
            "request_throughput": len(num_output) / wall}


def latency_stats(reqs: Sequence[RequestTimes]) -> dict[str, dict[str, float]]:
    """{"ttft" | "tpot" | "itl" | "e2e": summarize(...)}: TTFT, TPOT and E2E one value per request (TPOT only for
    requests with more than one output token), ITL every gap pooled over requests."""
    return {"ttft": summarize(r.ttft for r in reqs), "tpot": summarize(r.tpot for r in reqs if r.tpot is not None),
            "itl": summarize(x for r in reqs for x in r.itl), "e2e": summarize(r.e2e for r in reqs)}
