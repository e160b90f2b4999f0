"""Sequence: one request's state inside the engine (tokens, KV blocks, progress, timestamps).

Progress is `num_computed_tokens`, the tokens whose K/V are in the cache. A step feeds tokens
[num_computed_tokens, num_computed_tokens + n) and, when that reaches the last token, samples the next one.
With overlapped steps the sampled token may still be on the device when the next step is planned: it counts
in num_tokens (`pending`), and the next step reads it from the device.
Preemption by recompute resets num_computed_tokens to 0 and frees the blocks; prompt and output so far are
fed again as one longer prompt.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from moelab.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity, not field equality: the scheduler looks sequences up in lists
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens capped by max_model_len
    arrival_time: float = field(default_factory=time.perf_counter)
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" (stop_reason says why)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    first_scheduled_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token was sampled
    finished_time: float | None = None
    num_preemptions: int = 0
    text: str = ""  # the output up to the stop string that ended it (finish "stop" on a string only)
    detok: Any = None  # IncrementalDetokenizer of the output, when stop strings are searched
    stop_searched: int = 0  # characters of detok.text already searched for stop strings
    pending: int = 0  # sampled tokens not on the host yet (0 or 1; overlapped steps)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) + self.pending - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.pending - self.num_computed_tokens

    @property
    def is_decode(self) -> bool:
        """Only the last sampled token is missing from the cache."""
        return self.num_output_tokens > 0 and self.num_uncomputed_tokens == 1

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason = SequenceStatus.FINISHED, reason, stop_reason
        self.finished_time = time.perf_counter()
