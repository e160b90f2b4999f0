"""What the engine hands back per request: tokens, text, finish reason and every timestamp (vLLM's shape).

Times are time.perf_counter() seconds on the engine's host. TTFT = first_token_time - arrival_time;
ITL_i = token_times[i] - token_times[i-1]; E2E = finished_time - arrival_time. A token's time is when its id
reached the host after sampling, i.e. when a streaming server could send it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moelab.engine.sequence import Sequence


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    token_times: list[float]
    finished_time: float | None
    num_preemptions: int

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    new_token_ids: list[int] = field(default_factory=list)  # tokens added by the last step (streaming)

    @classmethod
    def from_seq(cls, seq: Sequence, prompt: str | None, text: str, new_token_ids: list[int] | None = None
                 ) -> RequestOutput:
        metrics = RequestMetrics(seq.arrival_time, seq.first_scheduled_time,
                                 seq.token_times[0] if seq.token_times else None, list(seq.token_times),
                                 seq.finished_time, seq.num_preemptions)
        out = CompletionOutput(0, text, seq.output_token_ids, seq.finish_reason, seq.stop_reason)
        return cls(seq.request_id, prompt, list(seq.prompt_token_ids), [out], seq.finished, metrics,
                   list(new_token_ids or []))
