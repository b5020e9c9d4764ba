"""Closed-loop load against any OpenAI-compatible server; prints one JSON line.

Each of `--concurrency` workers sends a chat completion, waits for it to finish, and sends the
next, until `--requests` are done. Streaming (the default) measures time to first token too.

    python bench/serve_load.py --url http://127.0.0.1:8000/v1 --concurrency 16 \\
        --requests 64 --max-tokens 128 --models smollm2-135m-instruct

`--lengths-out F` writes each request's completion tokens (by job index); `--lengths-in F`
gives job i exactly that many (`max_tokens` = F[i], `ignore_eos`): a run with another run's
output lengths, e.g. plain requests as long as the JSON-schema ones (bench/constrained.py).

The client is aiohttp, as vLLM's serving benchmark uses: on a 2-core machine the load
generator shares the cores with the server, and httpx spent ~130 µs of CPU a streamed event
against aiohttp's ~50 (Gemma 3 at c=16: 1.0 against 0.5 s of a 7 s run, taken from whichever
server streams the most events). Every event is still parsed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path

import aiohttp

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a refrigerator works, step by step.",
    "Describe a walk through a busy market in a large city, with many details.",
    "Write a detailed guide to planting and caring for a vegetable garden.",
    "Tell a long adventure story about a cat who sails around the world.",
    "Explain the history of the bicycle and how it changed over time, in detail.",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# a connection the server dropped as the request went out: sent again once, as the openai
# SDK does (counted in `retried`)
DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


async def one_request(
    http: aiohttp.ClientSession,
    url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    stream: bool,
    headers: dict,
    lora_id: int | None = None,
    extra: dict | None = None,
) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **(extra or {}),
    }
    if lora_id is not None:  # llama.cpp's llama-server: adapters loaded at start, by id
        body["lora"] = [{"id": lora_id, "scale": 1.0}]
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    ttft = None
    tokens = 0
    chunks = 0
    async with http.post(f"{url}/chat/completions", json=body, headers=headers) as response:
        if response.status != 200:
            await response.read()
            return {"ok": False, "status": response.status}
        if not stream:
            tokens = (await response.json())["usage"]["completion_tokens"]
            return {"ok": True, "latency": time.perf_counter() - started, "tokens": tokens}
        async for raw in response.content:  # one line at a time
            line = raw.decode()
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return {"ok": False, "status": "stream-error"}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
    return {
        "ok": True,
        "latency": time.perf_counter() - started,
        "ttft": ttft,
        "tokens": tokens or chunks,
    }


async def run(args: argparse.Namespace) -> dict:
    models = itertools.cycle(args.models.split(","))
    prompts = itertools.cycle(PROMPTS)
    loras = itertools.cycle(args.lora_ids or [None])
    jobs = [(next(models), next(prompts), next(loras)) for _ in range(args.requests)]
    lengths = json.loads(Path(args.lengths_in).read_text()) if args.lengths_in else None
    queue: asyncio.Queue = asyncio.Queue()
    for index, job in enumerate(jobs):
        queue.put_nowait((index, *job))
    results: list[dict] = []
    retried: list[int] = []  # requests sent again after a dropped connection
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    # a connection a request, as independent clients: cpp-httplib (llama-server) closes a
    # keep-alive connection after 5 requests, and a pooled one found closed fails the request
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        if args.warmup:
            model, prompt, lora_id = jobs[0]
            await one_request(
                http, args.url, model, prompt, 8, args.stream, headers, lora_id, args.extra
            )

        async def worker() -> None:
            while not queue.empty():
                index, model, prompt, lora_id = queue.get_nowait()
                max_tokens, extra = args.max_tokens, args.extra
                if lengths is not None:
                    max_tokens, extra = lengths[index], {**(extra or {}), "ignore_eos": True}
                for attempt in range(2):
                    try:
                        result = await one_request(
                            http, args.url, model, prompt, max_tokens, args.stream, headers,
                            lora_id, extra,
                        )  # fmt: skip
                    except DROPPED as exc:
                        result = {"ok": False, "status": type(exc).__name__}
                        if attempt == 0:
                            retried.append(index)
                        continue
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        result = {"ok": False, "status": type(exc).__name__}
                    break
                results.append({**result, "index": index})

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(args.concurrency)])
        elapsed = time.perf_counter() - started
    ok = [r for r in results if r["ok"]]
    if args.lengths_out:
        by_index = {r["index"]: r.get("tokens", 0) for r in results}
        Path(args.lengths_out).write_text(json.dumps([by_index[i] for i in range(len(jobs))]))
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "label": args.label,
        "url": args.url,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "models": args.models,
        "max_tokens": args.max_tokens,
        "stream": args.stream,
        "errors": len(results) - len(ok),
        "retried": len(retried),
        "error_statuses": sorted({str(r["status"]) for r in results if not r["ok"]}),
        "completion_tokens": tokens,
        "mean_tokens_per_request": round(tokens / max(len(ok), 1), 1),
        "elapsed_s": round(elapsed, 2),
        "tok_per_s": round(tokens / elapsed, 1),
        "req_per_s": round(len(ok) / elapsed, 3),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p95_s": round(percentile(latencies, 95), 3),
        "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
        "ttft_mean_s": round(statistics.mean(ttfts), 3) if ttfts else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--models",
        default="smollm2-135m-instruct",
        help="comma-separated model names, used round-robin",
    )
    parser.add_argument(
        "--lora-ids",
        type=lambda v: [int(i) for i in v.split(",")],
        default=None,
        help="llama-server adapter ids, used round-robin (sent as `lora: [{id, scale: 1}]`)",
    )
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--extra",
        type=json.loads,
        default=None,
        help='JSON merged into every request body, e.g. \'{"logprobs": true, "top_logprobs": 5}\'',
    )
    parser.add_argument("--lengths-out", help="write each request's completion tokens here")
    parser.add_argument("--lengths-in", help="give each request the tokens this file lists")
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
