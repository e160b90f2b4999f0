"""Soak test of any OpenAI-compatible endpoint (reliability.md P4 / P6): Poisson arrivals for a set time, mixed
prompt and output lengths, a share of the clients hanging up mid-stream. While it runs it samples the server's
resident memory (--pid, from /proc) and its /metrics gauges; at the end it waits for the server to go idle and
checks that nothing is left (no running or waiting request, KV cache empty), and reports the memory slope after
the warm-up, so a leak shows as MB per hour instead of as a crash days later.

    moelab bench soak --base-url http://127.0.0.1:8000 --duration 3600 --rate 4 --hang-up 0.2 --pid <server pid>

Outcome per request: ok (ended with a finish reason), hung_up (the client closed the stream after its first
chunk, on purpose), error (a status other than 200, or the stream broke). Exit 0 when no request failed, the
server went idle and (with --max-rss-slope) its memory grew slower than the bound; 1 otherwise; 2 on bad input.
The last line of stdout is the result as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")


@dataclass
class SoakConfig:
    base_url: str
    model: str | None = None
    duration: float = 60.0
    rate: float = 4.0  # requests per second, Poisson
    hang_up: float = 0.2  # share of clients that close the stream after the first chunk
    min_tokens: int = 1
    max_tokens: int = 128
    max_words: int = 64  # prompt length in words, uniform in [1, max_words]
    pid: int | None = None  # the server's process, for its resident memory
    interval: float = 1.0  # seconds between samples
    warmup: float = 0.2  # share of the duration left out of the memory slope
    idle_timeout: float = 120.0
    request_timeout: float = 600.0
    max_rss_slope: float | None = None  # MB per hour; above it the run fails
    seed: int = 0
    api_key: str | None = None

    def __post_init__(self) -> None:
        checks = [(self.duration > 0, "--duration must be > 0"), (self.rate > 0, "--rate must be > 0"),
                  (0 <= self.hang_up <= 1, "--hang-up is a share in [0, 1]"),
                  (1 <= self.min_tokens <= self.max_tokens, "need 1 <= --min-tokens <= --max-tokens"),
                  (self.max_words >= 1, "--max-words must be >= 1"), (self.interval > 0, "--interval must be > 0"),
                  (0 <= self.warmup < 1, "--warmup is a share in [0, 1)"),
                  (self.idle_timeout > 0, "--idle-timeout must be > 0")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.pid is not None and not Path(f"/proc/{self.pid}/status").exists():
            raise ValueError(f"--pid {self.pid}: no such process (or no /proc on this system)")


@dataclass
class SoakState:
    outcomes: dict[str, int] = field(default_factory=lambda: {"ok": 0, "hung_up": 0, "error": 0})
    errors: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS")


def parse_gauges(text: str) -> dict[str, float]:
    """The scheduler and KV-cache gauges of a /metrics page, under any prefix (moelab:, vllm:)."""
    out = {}
    for name in GAUGES:
        m = re.search(rf"^[a-zA-Z_:]*:{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
        if m:
            out[name] = float(m.group(1))
    return out


def slope_mb_per_hour(samples: list[dict], start: float) -> float | None:
    pts = [(s["t"], s["rss_mb"]) for s in samples if s["t"] >= start and "rss_mb" in s]
    if len(pts) < 3:
        return None
    t, m = np.array(pts).T
    return float(np.polyfit(t, m, 1)[0] * 3600)


async def _one(client: httpx.AsyncClient, cfg: SoakConfig, model: str, rng: random.Random, st: SoakState) -> None:
    hang_up = rng.random() < cfg.hang_up
    body = {"model": model, "prompt": " ".join(rng.choice(("soak", "test", "of", "the", "server", "memory"))
                                               for _ in range(rng.randint(1, cfg.max_words))),
            "max_tokens": rng.randint(cfg.min_tokens, cfg.max_tokens), "stream": True, "temperature": 0,
            "ignore_eos": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            finished = False
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if hang_up:
                    st.outcomes["hung_up"] += 1
                    return
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"error event: {str(chunk['error'])[:200]}")
                finished = finished or any(c.get("finish_reason") for c in chunk.get("choices", []))
            if not finished:
                raise RuntimeError("the stream ended without a finish reason")
            st.outcomes["ok"] += 1
    except Exception as exc:  # noqa: BLE001 (every failure is counted and the soak goes on)
        st.outcomes["error"] += 1
        if len(st.errors) < 20:
            st.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")


async def _sample(client: httpx.AsyncClient, cfg: SoakConfig, t0: float, st: SoakState) -> dict:
    s: dict = {"t": time.perf_counter() - t0}
    if cfg.pid is not None:
        s["rss_mb"] = rss_mb(cfg.pid)
    try:
        s.update(parse_gauges((await client.get("/metrics", timeout=10)).text))
    except httpx.HTTPError:
        pass
    st.samples.append(s)
    return s


async def soak(cfg: SoakConfig, log=print) -> dict:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=cfg.request_timeout) as client:
        try:
            models = (await client.get("/v1/models", timeout=30)).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise ValueError(f"{cfg.base_url} did not answer GET /v1/models: {exc}") from None
        model = cfg.model or models[0]["id"]
        rng, st = random.Random(cfg.seed), SoakState()
        t0 = time.perf_counter()
        await _sample(client, cfg, t0, st)
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), cfg.interval)
                except asyncio.TimeoutError:
                    await _sample(client, cfg, t0, st)

        sampling = asyncio.create_task(sampler())
        tasks, next_log, sent = set(), cfg.duration / 10, 0
        while (now := time.perf_counter() - t0) < cfg.duration:
            task = asyncio.create_task(_one(client, cfg, model, rng, st))
            sent += 1  # counted here: a finished task leaves `tasks` only when its done callback has run
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if now >= next_log:
                log(f"soak: {now:.0f}/{cfg.duration:.0f} s, {st.outcomes}, {len(tasks)} in flight")
                next_log += cfg.duration / 10
            await asyncio.sleep(rng.expovariate(cfg.rate))
        if tasks:
            await asyncio.wait(tasks, timeout=cfg.request_timeout)
        deadline, idle, last = time.perf_counter() + cfg.idle_timeout, False, {}
        while time.perf_counter() < deadline:  # the server drains its hung-up and queued requests
            last = await _sample(client, cfg, t0, st)
            if all(last.get(g, 0) == 0 for g in GAUGES) and any(g in last for g in GAUGES):
                idle = True
                break
            await asyncio.sleep(min(cfg.interval, 0.5))
        stop.set()
        await sampling
    waiting = [s.get("num_requests_waiting", 0) for s in st.samples]
    rss = [s["rss_mb"] for s in st.samples if "rss_mb" in s]
    slope = slope_mb_per_hour(st.samples, cfg.warmup * cfg.duration)
    return {"model": model, "duration_s": cfg.duration, "rate": cfg.rate, "requests": sent, **st.outcomes,
            "errors_seen": st.errors, "peak_waiting": max(waiting, default=0), "idle_at_end": idle,
            "final_gauges": {g: last.get(g) for g in GAUGES}, "rss_first_mb": rss[0] if rss else None,
            "rss_last_mb": rss[-1] if rss else None, "rss_slope_mb_per_hour": slope, "samples": len(st.samples)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelab bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="default: the first model of /v1/models")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    p.add_argument("--hang-up", type=float, default=0.2, help="share of clients closing the stream after one chunk")
    p.add_argument("--min-tokens", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=128, help="output lengths uniform in [min, max]")
    p.add_argument("--max-words", type=int, default=64, help="prompt lengths uniform in [1, max] words")
    p.add_argument("--pid", type=int, help="the server's process id, to sample its resident memory")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.2, help="share of the duration left out of the memory slope")
    p.add_argument("--idle-timeout", type=float, default=120.0, help="seconds to wait for the server to go idle")
    p.add_argument("--max-rss-slope", type=float, help="fail when resident memory grows faster (MB per hour)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key")
    p.add_argument("--result", help="also write the result JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = SoakConfig(a.base_url, a.model, a.duration, a.rate, a.hang_up, a.min_tokens, a.max_tokens, a.max_words,
                         a.pid, a.interval, a.warmup, a.idle_timeout, max_rss_slope=a.max_rss_slope, seed=a.seed,
                         api_key=a.api_key)
        res = asyncio.run(soak(cfg, log=lambda s: print(s, file=sys.stderr)))
    except ValueError as err:
        print(f"moelab bench soak: error: {err}", file=sys.stderr)
        return 2
    slope_ok = cfg.max_rss_slope is None or (res["rss_slope_mb_per_hour"] is not None
                                             and res["rss_slope_mb_per_hour"] <= cfg.max_rss_slope)
    res["passed"] = res["error"] == 0 and res["idle_at_end"] and slope_ok
    if a.result:
        Path(a.result).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return 0 if res["passed"] else 1
