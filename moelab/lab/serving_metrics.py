"""The serving benchmark's arithmetic on plain numbers: arrival schedules and the per-point summary with
`vllm bench serve`'s field names. No I/O, no engine.

Per request (client clock, time.perf_counter seconds; send = when the request left the client):
  TTFT  = first non-empty content chunk - send (a request with no content: TTFT = E2EL)
  ITL   = every gap between consecutive content chunks, pooled over all requests (a chunk may carry >1 token)
  TPOT  = (E2EL - TTFT) / (output_tokens - 1), requests with output_tokens > 1 only
  E2EL  = end of the stream ([DONE]) - send
  output_tokens = usage.completion_tokens when the server reports it, else the number of content chunks
Per point (duration = first send to last response, wall seconds; failed requests count only in `failed`):
  request_throughput = completed / duration          output_throughput = sum(output_tokens) / duration
  total_token_throughput = (sum(input) + sum(output)) / duration
  request_goodput = requests meeting every SLO / duration (TTFT <= ttft, TPOT <= tpot, E2EL <= e2el, in ms;
                    a one-token request has TPOT 0 for this test)
  max_output_tokens_per_s = most content chunks in one 1-second bucket (since the first send)
  max_concurrent_requests = most requests in flight at once
Statistics (in ms): mean, median, std (population, ddof=0), pP (numpy's linear interpolation, as vLLM); 0.0 for an
empty sample, as vLLM. GuideLLM and AIPerf call our TPOT "ITL"; see docs/serving.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    send_time: float = 0.0  # perf_counter
    input_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of each content chunk
    text: str = ""
    tokens_from_usage: bool = False

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def arrival_times(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets in seconds from the start. rate inf: all at 0. Otherwise the n-1 gaps are drawn from
    Gamma(shape=k, scale=1/(rate*k)) (mean 1/rate; k = burstiness: 1 is Poisson, < 1 burstier, inf constant),
    t_0 = 0, t_i = sum of the first i gaps, rescaled so t_{n-1} = (n-1)/rate: the mean rate is exactly the one
    asked for, only its spread is random."""
    if n < 1:
        raise ValueError(f"the number of requests must be >= 1, got {n}")
    if not request_rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 = Poisson, inf = constant), got {burstiness}")
    if math.isinf(request_rate) or n == 1:
        return [0.0] * n
    if math.isinf(burstiness):
        gaps = np.full(n - 1, 1.0 / request_rate)
    else:
        gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (request_rate * burstiness), n - 1)
    t = np.concatenate([[0.0], np.cumsum(gaps)])
    return (t * ((n - 1) / request_rate / t[-1])).tolist() if t[-1] > 0 else t.tolist()


def _stats(values: Sequence[float], percentiles: Sequence[float], name: str) -> dict[str, float | None]:
    """Mean, median, std and percentiles in ms; None when there is no sample (e.g. TPOT and ITL when every output
    has one token), never a 0 that reads as measured (vLLM prints 0 there)."""
    a = np.asarray(values, dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(a.mean()) if a.size else None,
           f"median_{name}_ms": float(np.median(a)) if a.size else None,
           f"std_{name}_ms": float(a.std()) if a.size else None}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(a, p)) if a.size else None
    return out


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput item {item!r}: expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput item {item!r}: {value!r} is not a number of milliseconds") from None
        if not slos[key] > 0:
            raise ValueError(f"--goodput item {item!r}: the SLO must be > 0 ms")
    return slos


def is_good(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2el}
    return all(values[k] * 1000.0 <= v for k, v in slos.items())


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    events = sorted([(r.send_time, 1) for r in results] + [(r.send_time + r.e2el, -1) for r in results],
                    key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def peak_output_rate(results: Sequence[RequestResult], start: float) -> float:
    buckets: dict[int, int] = {}
    for r in results:
        for t in r.chunk_times:
            b = int(t - start)
            buckets[b] = buckets.get(b, 0) + 1
    return float(max(buckets.values(), default=0))


def summarize(results: Sequence[RequestResult], duration: float, start: float, slos: dict[str, float] | None = None,
              percentiles: Sequence[float] = (90, 95, 99)) -> dict:
    """The point's numbers under vLLM's keys (see the module docstring for every formula)."""
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    reasons: dict[str, int] = {}
    for r in failed:
        reasons[r.error or "unknown"] = reasons.get(r.error or "unknown", 0) + 1
    tin, tout = sum(r.input_tokens for r in ok), sum(r.output_tokens for r in ok)
    out = {"duration": duration, "completed": len(ok), "failed": len(failed), "failed_reasons": reasons,
           "total_input_tokens": tin, "total_output_tokens": tout,
           "request_throughput": len(ok) / duration,
           "request_goodput": sum(is_good(r, slos) for r in ok) / duration if slos else None,
           "output_throughput": tout / duration, "total_token_throughput": (tin + tout) / duration,
           "max_output_tokens_per_s": peak_output_rate(ok, start), "max_concurrent_requests": peak_concurrency(ok),
           "token_counts_from_usage": all(r.tokens_from_usage for r in ok) if ok else None}
    samples = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
               "itl": [x for r in ok for x in r.itl], "e2el": [r.e2el for r in ok]}
    for m in METRICS:
        out.update(_stats(samples[m], percentiles, m))
    return out
