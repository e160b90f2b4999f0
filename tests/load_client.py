"""Load-test client, run as its own process (so its CPU time does not compete with the server's for one GIL):

    python tests/load_client.py URL NUM_REQUESTS NUM_PROMPTS MAX_TOKENS

Sends NUM_REQUESTS streaming /v1/completions requests at once (request i uses prompt i % NUM_PROMPTS, greedy,
ignore_eos), checks each stream's framing (`data: ` events, one [DONE], last; exactly one finish_reason, on the
last content chunk; a usage chunk) and prints one JSON line: {"seconds", "results": [{"i", "text", "tokens",
"finish", "error"}]}. httpx's connection pool does O(connections) work per request, so requests are spread over
many small clients.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx


def prompt(p: int) -> str:
    return f"request number {p} says"


def check_stream(text: str) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of a one-choice completions stream; AssertionError if malformed."""
    assert text.endswith("\n\n"), "the stream does not end with a blank line"
    blocks = text.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks), "an event is not `data: ...`"
    payloads = [b[6:] for b in blocks]
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1, "[DONE] is not the single last event"
    events = [json.loads(p) for p in payloads[:-1]]
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"], "no usage chunk before [DONE]"
    out, finishes = "", []
    for e in events[:-1]:
        (c,) = e["choices"]
        assert c["index"] == 0 and not finishes, "a chunk after the finish"
        out += c["text"]
        if c["finish_reason"] is not None:
            finishes.append(c["finish_reason"])
    assert len(finishes) == 1, f"finish reasons {finishes}"
    return out, usage["usage"]["completion_tokens"], finishes[0]


async def one(client: httpx.AsyncClient, i: int, num_prompts: int, max_tokens: int) -> dict:
    body = {"prompt": prompt(i % num_prompts), "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
        text, tokens, finish = check_stream(r.text)
        return {"i": i, "text": text, "tokens": tokens, "finish": finish, "error": None}
    except Exception as err:  # reported, not raised: every request must be accounted for
        return {"i": i, "error": f"{type(err).__name__}: {err}"}


async def run(url: str, n: int, num_prompts: int, max_tokens: int, per_client: int = 20) -> list[dict]:
    clients = [httpx.AsyncClient(base_url=url, timeout=300, verify=False, limits=httpx.Limits(max_connections=None))
               for _ in range(-(-n // per_client))]
    try:
        return await asyncio.gather(*(one(clients[i % len(clients)], i, num_prompts, max_tokens) for i in range(n)))
    finally:
        for c in clients:
            await c.aclose()


def main() -> None:
    url, n, num_prompts, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    t0 = time.perf_counter()
    results = asyncio.run(run(url, n, num_prompts, max_tokens))
    print(json.dumps({"seconds": time.perf_counter() - t0, "results": results}))


if __name__ == "__main__":
    main()
