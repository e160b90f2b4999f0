"""Prometheus metrics in the text exposition format (0.0.4), written by hand, with vLLM's names under `moelab:`
(`prefix="vllm:"`, `moelab serve --metrics-prefix vllm:`, gives vLLM's exact names, so its dashboards work).

Every sample carries a model_name label. Latencies come from the engine's own perf_counter timestamps (one
process, one monotonic clock), with arrival = when the HTTP request was received:
  time_to_first_token_seconds        first token time - arrival                           (histogram)
  inter_token_latency_seconds        token_times[i] - token_times[i-1], every output token  (histogram)
  request_time_per_output_token_seconds  (last token - first token) / (output tokens - 1)   (histogram)
  e2e_request_latency_seconds        finished time - arrival                                (histogram)
  request_queue_time_seconds         first scheduled - arrival                              (histogram)
  prompt_tokens_total / generation_tokens_total                                              (counters)
  request_success_total{finished_reason=stop|length|abort}                                   (counter)
  num_requests_running / num_requests_waiting / kv_cache_usage_perc (0-1) / num_preemptions_total
                                                                    (read from engine.stats() at scrape)
  http_requests_client_disconnected_total                           (counter)
  http_requests_rejected_total (the admission cap's 503s)            (counter)
Writers are the engine thread and the event loop; a lock keeps each update whole.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Callable
from typing import Any

PREFIX = "moelab:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                         0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
FINISH_REASONS = ("stop", "length", "abort")
_PREFIX_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def check_prefix(prefix: str) -> str:
    """A metric-name prefix Prometheus accepts (letters, digits, _ and :, not starting with a digit), or ValueError."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"metrics prefix {prefix!r}: Prometheus metric names take letters, digits, '_' and ':' and "
                         f"do not start with a digit (e.g. 'moelab:', 'vllm:')")
    return prefix


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.sum += x
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, cum = [], 0
        for le, c in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            cum += c
            out.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cum}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], dict[str, float]] | None = None,
                 prefix: str = PREFIX) -> None:
        self.prefix = check_prefix(prefix)
        self.labels = {"model_name": model_name}
        self.stats = stats or dict
        self.lock = threading.Lock()
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(TOKEN_LATENCY_BUCKETS)
        self.tpot = Histogram(TOKEN_LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue = Histogram(LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self.disconnected = 0
        self.errors = 0
        self.rejected = 0  # generation requests turned away by the admission cap

    # ----- updates (engine thread) -----
    def on_tokens(self, seq: Any, num_new: int) -> None:
        """seq: an engine Sequence right after it received num_new tokens."""
        times = seq.token_times
        if num_new == 0:  # a final update without a token (a failed request)
            return
        with self.lock:
            self.generation_tokens += num_new
            if len(times) == num_new:  # its first tokens: the prompt is done
                self.prompt_tokens += seq.num_prompt_tokens
                self.ttft.observe(times[0] - seq.arrival_time)
                if seq.first_scheduled_time is not None:
                    self.queue.observe(seq.first_scheduled_time - seq.arrival_time)
            for j in range(max(1, len(times) - num_new), len(times)):
                self.itl.observe(times[j] - times[j - 1])

    def on_finished(self, seq: Any) -> None:
        times = seq.token_times
        with self.lock:
            if seq.finish_reason == "error":  # the request failed (non-finite logits); the engine goes on
                self.errors += 1
                return
            self.success[seq.finish_reason] = self.success.get(seq.finish_reason, 0) + 1
            if seq.finished_time is not None:
                self.e2e.observe(seq.finished_time - seq.arrival_time)
            if len(times) > 1:
                self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))

    def on_aborted(self, count: int = 1) -> None:
        with self.lock:
            self.success["abort"] += count

    def on_disconnect(self) -> None:
        with self.lock:
            self.disconnected += 1

    def on_rejected(self) -> None:
        with self.lock:
            self.rejected += 1

    # ----- exposition -----
    def render(self) -> str:
        s = self.stats()
        L, P = self.labels, self.prefix
        out: list[str] = []

        def family(name: str, kind: str, help_: str, lines: list[str]) -> None:
            out.extend([f"# HELP {P}{name} {help_}", f"# TYPE {P}{name} {kind}", *lines])

        def sample(name: str, value: float, labels: dict[str, str] = L) -> str:
            return f"{P}{name}{_labels(labels)} {_num(value)}"

        with self.lock:
            family("num_requests_running", "gauge", "Requests in the running batch.",
                   [sample("num_requests_running", s.get("num_running", 0))])
            family("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
                   [sample("num_requests_waiting", s.get("num_waiting", 0))])
            family("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (0-1).",
                   [sample("kv_cache_usage_perc", s.get("kv_cache_usage", 0.0))])
            family("num_preemptions_total", "counter", "Preemptions by recompute.",
                   [sample("num_preemptions_total", s.get("num_preemptions", 0))])
            family("prompt_tokens_total", "counter", "Prefilled prompt tokens.",
                   [sample("prompt_tokens_total", self.prompt_tokens)])
            family("generation_tokens_total", "counter", "Generated tokens.",
                   [sample("generation_tokens_total", self.generation_tokens)])
            family("request_success_total", "counter", "Finished requests by finish reason.",
                   [sample("request_success_total", v, {**L, "finished_reason": k}) for k, v in self.success.items()])
            family("request_errors_total", "counter", "Requests that failed in the engine (non-finite logits).",
                   [sample("request_errors_total", self.errors)])
            family("http_requests_client_disconnected_total", "counter", "Clients that hung up before the end.",
                   [sample("http_requests_client_disconnected_total", self.disconnected)])
            family("http_requests_rejected_total", "counter", "Requests refused with 503 by the admission cap.",
                   [sample("http_requests_rejected_total", self.rejected)])
            for name, hist, help_ in (
                ("time_to_first_token_seconds", self.ttft, "Time to first token, from HTTP arrival."),
                ("inter_token_latency_seconds", self.itl, "Time between consecutive output tokens."),
                ("request_time_per_output_token_seconds", self.tpot, "Per request: (last - first token) / (n - 1)."),
                ("e2e_request_latency_seconds", self.e2e, "From HTTP arrival to the last token."),
                ("request_queue_time_seconds", self.queue, "From HTTP arrival to first scheduled."),
            ):
                family(name, "histogram", help_, hist.lines(P + name, L))
        return "\n".join(out) + "\n"
