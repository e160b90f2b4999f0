"""`moelab bench serve`: a serving benchmark of any OpenAI-compatible endpoint (moelab, vLLM, SGLang, ...).

It speaks HTTP only (httpx, streaming SSE) and imports no engine code, so every server is measured the same way.
A point = a workload sent at a fixed concurrency (closed loop: at most C requests in flight) and/or a request
rate (open loop: Poisson, gamma-bursty or constant arrivals, see serving_metrics.arrival_times); sweeps run
one point per --concurrency / --request-rate value. Before each point: a ready check (GET /v1/models, which
must list the model) and --num-warmups requests that are not measured.
Workloads (fixed seed): random (input_len random words, lengths drawn with vLLM's range-ratio rule),
fixed (one prompt for all), file (one prompt per line, cycled). Word prompts are about one token per word for
large BPE vocabularies; the token counts reported are the server's (usage), not estimates, when it sends usage.
Output: vLLM's printed report and result JSON fields (serving_metrics.py has every formula), one store run per
point (kind "serve"), and as the last stdout line one JSON object with every point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from moelab.argtypes import nonneg_float, nonneg_int, positive_float, positive_int, writable_dir
from moelab.lab.serving_metrics import RequestResult, arrival_times, parse_goodput, summarize
from moelab.lab.serving_report import format_report, save_results, store_point

DATASETS = ("random", "fixed", "file", "sharegpt")
# vLLM's ShareGPT sampling (benchmarks/benchmark_dataset.py): first human turn and the reply that follows; pairs
# with a prompt or reply under 4 tokens, a prompt over 1024 or both over 2048 are dropped
SHAREGPT_MIN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048
BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
CONNECTIONS_PER_CLIENT, MAX_CLIENTS = 16, 64
WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be or has had it "
         "not but first one their also its new after who they have two been other when there all during into "
         "school time may years more most only over city some world would where later up such used many can "
         "state about national out known university united then made game team american between three while "
         "however under film well since season war both south north river life being high people part until "
         "music album series these than held around house early through place work number").split()


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    input_len: int  # words: the estimate used when the server reports no usage
    output_len: int


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    backend: str = "openai"
    endpoint: str | None = None  # None: the backend's
    dataset: str = "random"
    dataset_path: str | None = None
    prompt: str | None = None  # fixed dataset
    tokenizer_path: str | None = None  # sharegpt: tokenizer.json that counts the tokens (else words x 4/3)
    sharegpt_output_len: int | None = None  # sharegpt: max_tokens for every request instead of the reply's length
    num_prompts: int = 200
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    seed: int = 0
    request_rates: list[float] = field(default_factory=lambda: [math.inf])
    concurrencies: list[int | None] = field(default_factory=lambda: [None])
    burstiness: float = 1.0
    num_warmups: int = 1
    ignore_eos: bool | None = None  # None: on for random, off otherwise
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    timeout: float = 600.0
    ready_timeout: float = 600.0
    goodput: dict[str, float] = field(default_factory=dict)
    percentiles: list[float] = field(default_factory=lambda: [90.0, 95.0, 99.0])
    label: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.backend in BACKENDS, f"backend {self.backend!r}; allowed: {', '.join(BACKENDS)}"),
            (self.dataset in DATASETS, f"dataset {self.dataset!r}; allowed: {', '.join(DATASETS)}"),
            (self.dataset not in ("file", "sharegpt") or bool(self.dataset_path),
             f"the {self.dataset} dataset needs --dataset-path FILE"),
            (self.sharegpt_output_len is None or self.sharegpt_output_len >= 1,
             f"--sharegpt-output-len must be >= 1, got {self.sharegpt_output_len}"),
            (self.num_prompts >= 1, f"--num-prompts must be >= 1, got {self.num_prompts}"),
            (self.input_len >= 1 and self.output_len >= 1, "--input-len and --output-len must be >= 1"),
            (0 <= self.range_ratio < 1, f"--range-ratio must be in [0, 1), got {self.range_ratio}"),
            (all(r > 0 for r in self.request_rates), f"--request-rate values must be > 0 (or inf), got "
                                                     f"{self.request_rates}"),
            (all(c is None or c >= 1 for c in self.concurrencies), f"--concurrency values must be >= 1, got "
                                                                    f"{self.concurrencies}"),
            (self.burstiness > 0, f"--burstiness must be > 0, got {self.burstiness}"),
            (self.num_warmups >= 0, f"--num-warmups must be >= 0, got {self.num_warmups}"),
            (all(0 < p < 100 for p in self.percentiles), f"percentiles must be in (0, 100), got {self.percentiles}"),
            (self.timeout > 0, f"--timeout must be > 0 seconds, got {self.timeout}"),
            (self.ready_timeout >= 0, f"--ready-check-timeout-sec must be >= 0, got {self.ready_timeout}"),
            (self.base_url.startswith(("http://", "https://")) and len(self.base_url.split("://", 1)[1]) > 0,
             f"--base-url {self.base_url!r}: expected http://HOST:PORT or https://HOST:PORT"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def path(self) -> str:
        return self.endpoint or BACKENDS[self.backend]

    @property
    def chat(self) -> bool:
        return self.path.rstrip("/").endswith("chat/completions")


# ----- workload -----
def _length(rng: random.Random, n: int, ratio: float) -> int:
    return max(1, rng.randint(math.floor(n * (1 - ratio)), math.ceil(n * (1 + ratio)))) if ratio else n


def _sharegpt(cfg: BenchConfig, rng: random.Random) -> list[RequestSpec]:
    """cfg.num_prompts (prompt, reply length) pairs of a local ShareGPT JSON file (a list of {"conversations":
    [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}), shuffled by the seed and filtered as
    vLLM's benchmark does. Token counts come from cfg.tokenizer_path (the served model's tokenizer.json, for the
    same workload as vLLM's) or, without one, are estimated as 4/3 tokens a word (then say so with the results)."""
    path = Path(cfg.dataset_path)
    if not path.is_file():
        raise ValueError(f"ShareGPT file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"ShareGPT file {path} is not JSON: {str(err)[:200]}") from None
    if not isinstance(data, list):
        raise ValueError(f"ShareGPT file {path}: want a JSON list of conversations, got {type(data).__name__}")
    if cfg.tokenizer_path:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(cfg.tokenizer_path)

        def count(text: str) -> int:  # as vLLM counts them: tokenizer(text).input_ids, special tokens included
            return len(tok.encode(text).ids)
    else:
        def count(text: str) -> int:
            return math.ceil(len(text.split()) * 4 / 3)
    pairs = [(str(c["conversations"][0].get("value", "")), str(c["conversations"][1].get("value", "")))
             for c in data if isinstance(c, dict) and isinstance(c.get("conversations"), list)
             and len(c["conversations"]) >= 2 and all(isinstance(t, dict) for t in c["conversations"][:2])]
    rng.shuffle(pairs)
    out = []
    for prompt, reply in pairs:
        n_in = count(prompt)
        n_out = cfg.sharegpt_output_len or count(reply)
        short_reply = cfg.sharegpt_output_len is None and n_out < SHAREGPT_MIN  # vLLM: no check at a fixed length
        if n_in < SHAREGPT_MIN or short_reply or n_in > SHAREGPT_MAX_PROMPT or n_in + n_out > SHAREGPT_MAX_TOTAL:
            continue
        out.append(RequestSpec(prompt, n_in, n_out))
        if len(out) == cfg.num_prompts:
            return out
    raise ValueError(f"ShareGPT file {path} has {len(out)} usable conversations (prompt and reply of "
                     f"{SHAREGPT_MIN}+ tokens, prompt <= {SHAREGPT_MAX_PROMPT}, both <= {SHAREGPT_MAX_TOTAL}); "
                     f"--num-prompts asks for {cfg.num_prompts}")


def make_workload(cfg: BenchConfig) -> list[RequestSpec]:
    """cfg.num_prompts requests, the same for the same config and seed."""
    rng = random.Random(cfg.seed)
    if cfg.dataset == "sharegpt":
        return _sharegpt(cfg, rng)
    if cfg.dataset == "file":
        path = Path(cfg.dataset_path)
        if not path.is_file():
            raise ValueError(f"prompt file {path} does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompt file {path} has no non-empty line")
        prompts = [lines[i % len(lines)] for i in range(cfg.num_prompts)]
        return [RequestSpec(p, len(p.split()), _length(rng, cfg.output_len, cfg.range_ratio)) for p in prompts]
    if cfg.dataset == "fixed":
        prompt = cfg.prompt or " ".join(rng.choice(WORDS) for _ in range(cfg.input_len))
        return [RequestSpec(prompt, len(prompt.split()), cfg.output_len)] * cfg.num_prompts
    out = []
    for _ in range(cfg.num_prompts):
        n_in, n_out = _length(rng, cfg.input_len, cfg.range_ratio), _length(rng, cfg.output_len, cfg.range_ratio)
        out.append(RequestSpec(" ".join(rng.choice(WORDS) for _ in range(n_in)), n_in, n_out))
    return out


# ----- one request -----
def payload(cfg: BenchConfig, model: str, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": cfg.temperature}
    if cfg.chat:
        body.update(messages=[{"role": "user", "content": spec.prompt}], max_completion_tokens=spec.output_len)
    else:
        body.update(prompt=spec.prompt, max_tokens=spec.output_len)
    if cfg.top_p is not None:
        body["top_p"] = cfg.top_p
    if cfg.top_k is not None:
        body["top_k"] = cfg.top_k
    if cfg.ignore_eos if cfg.ignore_eos is not None else cfg.dataset == "random":
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


def _content(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return ((c.get("delta") or {}).get("content") if chat else c.get("text")) or ""


async def send_request(client: httpx.AsyncClient, cfg: BenchConfig, model: str, spec: RequestSpec) -> RequestResult:
    r = RequestResult(input_tokens=spec.input_len)
    r.send_time = st = time.perf_counter()
    last, chunks, usage, done = st, 0, None, False
    try:
        async with client.stream("POST", cfg.path, json=payload(cfg, model, spec)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                try:
                    msg = json.loads(body)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    msg = body
                r.error = f"HTTP {resp.status_code}: {str(msg)[:200]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    r.error = f"stream error: {str(obj['error'].get('message', obj['error']))[:200]}"
                    return r
                usage = obj.get("usage") or usage
                text = _content(obj, cfg.chat)
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        r.ttft = now - st
                    else:
                        r.itl.append(now - last)
                    last, chunks = now, chunks + 1
                    r.chunk_times.append(now)
                    r.text += text
        r.e2el = time.perf_counter() - st
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as err:
        r.error = f"{type(err).__name__}: {str(err)[:200]}"
        return r
    if not done:
        r.error = "the stream ended without data: [DONE]"
        return r
    if chunks == 0:
        r.ttft = r.e2el
    r.tokens_from_usage = bool(usage)
    r.output_tokens = int(usage["completion_tokens"]) if usage else chunks
    if usage and usage.get("prompt_tokens") is not None:
        r.input_tokens = int(usage["prompt_tokens"])
    r.success = True
    return r


# ----- a point -----
async def served_model(client: httpx.AsyncClient, cfg: BenchConfig) -> str:
    """Wait until GET /v1/models answers; the model to use (cfg.model, which must be listed, or the first)."""
    deadline = time.monotonic() + cfg.ready_timeout
    while True:
        try:
            resp = await client.get("/v1/models")
            if resp.status_code == 200:
                break
            if resp.status_code in (401, 403, 404):
                raise ValueError(f"{cfg.base_url}/v1/models answered {resp.status_code}: {resp.text[:200]}")
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ValueError(f"{cfg.base_url} did not answer GET /v1/models within {cfg.ready_timeout:g} s")
        await asyncio.sleep(0.5)
    ids = [m.get("id") for m in resp.json().get("data", [])]
    if cfg.model is None:
        if not ids:
            raise ValueError(f"{cfg.base_url} lists no model")
        return ids[0]
    if cfg.model not in ids:
        raise ValueError(f"model {cfg.model!r} is not served at {cfg.base_url}; it serves {ids}")
    return cfg.model


def make_clients(cfg: BenchConfig, parallel: int) -> list[httpx.AsyncClient]:
    """Enough clients that each holds at most CONNECTIONS_PER_CLIENT connections: httpx's pool does work linear in
    its connections for every request, which at hundreds of connections would slow the client, not the server."""
    headers = dict(cfg.headers)
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    k = min(MAX_CLIENTS, max(1, -(-parallel // CONNECTIONS_PER_CLIENT)))
    verify = cfg.base_url.startswith("https")  # plain http: skip loading CA certificates per client
    return [httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=cfg.timeout, verify=verify,
                              limits=httpx.Limits(max_connections=None), trust_env=False) for _ in range(k)]


async def run_point(cfg: BenchConfig, specs: list[RequestSpec], request_rate: float, concurrency: int | None
                    ) -> dict:
    clients = make_clients(cfg, concurrency or len(specs))
    try:
        model = await served_model(clients[0], cfg)
        warm = specs[:cfg.num_warmups]
        warm_results = await asyncio.gather(*(send_request(clients[i % len(clients)], cfg, model, s)
                                              for i, s in enumerate(warm)))
        bad = [w.error for w in warm_results if not w.success]
        if warm and len(bad) == len(warm):
            raise RuntimeError(f"every warm-up request failed, e.g. {bad[0]}")
        sem = asyncio.Semaphore(concurrency) if concurrency else None
        offsets = arrival_times(len(specs), request_rate, cfg.burstiness, cfg.seed)
        start = time.perf_counter()

        async def one(i: int, offset: float, spec: RequestSpec) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            client = clients[i % len(clients)]
            if sem is None:
                return await send_request(client, cfg, model, spec)
            async with sem:
                return await send_request(client, cfg, model, spec)

        results = await asyncio.gather(*(one(i, o, s) for i, (o, s) in enumerate(zip(offsets, specs))))
        duration = time.perf_counter() - start
    finally:
        for c in clients:
            await c.aclose()
    summary = summarize(results, duration, start, cfg.goodput, cfg.percentiles)
    head = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": cfg.backend, "endpoint": cfg.path,
            "base_url": cfg.base_url, "label": cfg.label, "model_id": model, "num_prompts": len(specs),
            "request_rate": "inf" if math.isinf(request_rate) else request_rate, "burstiness": cfg.burstiness,
            "max_concurrency": concurrency, "dataset_name": cfg.dataset,
            **({"dataset_path": Path(cfg.dataset_path).name, "lengths_counted_with": (
                Path(cfg.tokenizer_path).name if cfg.tokenizer_path else "words x 4/3 (no --tokenizer)")}
               if cfg.dataset == "sharegpt" else {}),
            "input_len": cfg.input_len,
            "output_len": cfg.output_len, "range_ratio": cfg.range_ratio, "seed": cfg.seed,
            "num_warmups": len(warm), "goodput_slos_ms": cfg.goodput or None, **cfg.metadata}
    detail = {"input_lens": [r.input_tokens for r in results], "output_lens": [r.output_tokens for r in results],
              "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
              "generated_texts": [r.text for r in results], "errors": [r.error for r in results]}
    return {**head, **summary, "detailed": detail}


# ----- sweep -----
def open_store(path: str | None) -> Any:
    from moelab.lab.store import ResultsStore

    return ResultsStore(path)


def run(cfg: BenchConfig, store: Any = None, log: Any = print) -> list[dict]:
    """Every point of the sweep (rates x concurrencies), in order; each also stored when a store is given."""
    specs = make_workload(cfg)
    results = []
    for rate in cfg.request_rates:
        for conc in cfg.concurrencies:
            log(f"point: request_rate={rate:g}, max_concurrency={conc}, {len(specs)} requests to {cfg.base_url}")
            try:
                res = asyncio.run(run_point(cfg, specs, rate, conc))
            except Exception as err:
                if store is not None:
                    store_point(store, cfg, None, rate, conc, error=f"{type(err).__name__}: {err}")
                raise
            if store is not None:
                res["run_id"] = store_point(store, cfg, res, rate, conc)
            log(format_report(res, cfg.percentiles))
            results.append(res)
    return results


# ----- command line -----
def _kv(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelab bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    p.add_argument("--model", help="served model name (default: the first one GET /v1/models lists)")
    p.add_argument("--backend", default="openai", choices=list(BACKENDS), help="openai = completions, "
                   "openai-chat = chat completions")
    p.add_argument("--endpoint", help="path (default: the backend's)")
    p.add_argument("--api-key")
    p.add_argument("--header", action="append", metavar="K=V", help="extra HTTP header (repeatable)")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset-name", default="random", choices=DATASETS)
    w.add_argument("--dataset-path", help="file dataset: one prompt per line; sharegpt: the ShareGPT JSON file "
                   "(e.g. ShareGPT_V3_unfiltered_cleaned_split.json, downloaded beforehand)")
    w.add_argument("--tokenizer", dest="tokenizer_path", help="sharegpt: the served model's tokenizer.json, to "
                   "count tokens as vLLM's benchmark does (default: 4/3 tokens a word)")
    w.add_argument("--sharegpt-output-len", type=int, help="sharegpt: max_tokens of every request (default: the "
                   "length of the conversation's reply)")
    w.add_argument("--prompt", help="fixed dataset: the prompt (default: input-len seeded random words)")
    w.add_argument("--num-prompts", type=positive_int, default=200)
    w.add_argument("--input-len", type=positive_int, default=128, help="words per prompt (random, fixed)")
    w.add_argument("--output-len", type=positive_int, default=128, help="max_tokens per request")
    w.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths ~ U[L(1-r), L(1+r)]")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="send ignore_eos (vLLM extension) so outputs run to output-len (default: on for random)")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--top-p", type=float)
    w.add_argument("--top-k", type=int)
    w.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    lo = p.add_argument_group("load (every combination is one point)")
    lo.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                    help="requests/s (inf: all at once); several values = a sweep")
    lo.add_argument("--max-concurrency", "--concurrency", dest="concurrency", type=positive_int, nargs="+",
                    help="requests in flight at most; several values = a sweep")
    lo.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, inf constant rate")
    lo.add_argument("--num-warmups", type=nonneg_int, default=1, help="unmeasured requests before each point")
    lo.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per request")
    lo.add_argument("--ready-check-timeout-sec", type=nonneg_float, default=600.0)
    o = p.add_argument_group("results")
    o.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:10000")
    o.add_argument("--metric-percentiles", default="90,95,99")
    o.add_argument("--label")
    o.add_argument("--metadata", nargs="+", metavar="K=V", help="stored with every point")
    o.add_argument("--save-result", action="store_true", help="write one JSON file per point")
    o.add_argument("--save-detailed", action="store_true", help="with per-request arrays")
    o.add_argument("--result-dir", default=".")
    o.add_argument("--result-filename")
    o.add_argument("--append-result", action="store_true",
                   help="add each point as one line to its result file instead of replacing it (newline-delimited "
                        "JSON; with --result-filename every point goes to that file)")
    o.add_argument("--store", help="results store (default: $MOELAB_STORE or ./moelab_results.sqlite)")
    o.add_argument("--no-store", action="store_true", help="do not write to the results store")
    return p


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    if not isinstance(a.extra_body, dict):
        raise ValueError(f"--extra-body must be a JSON object, got {a.extra_body!r}")
    try:
        percentiles = [float(x) for x in a.metric_percentiles.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles {a.metric_percentiles!r}: expected numbers like 90,95,99") from None
    return BenchConfig(
        base_url=a.base_url.rstrip("/"), model=a.model, backend=a.backend, endpoint=a.endpoint,
        dataset=a.dataset_name, dataset_path=a.dataset_path, prompt=a.prompt, tokenizer_path=a.tokenizer_path,
        sharegpt_output_len=a.sharegpt_output_len, num_prompts=a.num_prompts,
        input_len=a.input_len, output_len=a.output_len, range_ratio=a.range_ratio, seed=a.seed,
        request_rates=a.request_rate, concurrencies=a.concurrency or [None], burstiness=a.burstiness,
        num_warmups=a.num_warmups, ignore_eos=a.ignore_eos, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
        extra_body=a.extra_body, headers=_kv(a.header, "--header"), api_key=a.api_key, timeout=a.timeout,
        ready_timeout=a.ready_check_timeout_sec, goodput=parse_goodput(a.goodput), percentiles=percentiles,
        label=a.label, metadata=_kv(a.metadata, "--metadata"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.save_result or args.save_detailed or args.append_result:
            writable_dir(args.result_dir, "--result-dir")  # before the run: its results must not be lost
        store = None if args.no_store else open_store(args.store)
        results = run(cfg, store)
    except (ValueError, RuntimeError) as err:
        print(f"moelab bench serve: error: {err}", file=sys.stderr)
        return 2
    if args.save_result or args.save_detailed or args.append_result:
        for path in save_results(results, args.result_dir, args.result_filename, args.save_detailed,
                                 args.append_result):
            print(f"wrote {path}")
    print(json.dumps({"points": [{k: v for k, v in r.items() if k != "detailed"} for r in results]}))
    return 0 if all(r["completed"] for r in results) else 1
