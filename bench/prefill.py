"""Long RAG-shaped prompts against any OpenAI-compatible server: time to first token and
prefill tok/s; prints one JSON line per (prompt length, concurrency) and a markdown table.

Each request is a distinct prompt (numbered PubMedQA abstracts, then a question), so no
prefix cache can serve one from another; `max_tokens: 1`, streaming. TTFT is the time to the
first chunk that carries text or a finish reason. Prefill tok/s: at c=1 the median of
prompt tokens / TTFT; at c>1 all prompt tokens of the level / its wall time.

    python bench/prefill.py --url http://127.0.0.1:8000/v1 --tokens 256,1024,1157,1480 \\
        --concurrency 1,4

`--rag-index NAME --home DIR` instead times a RAG request (`rag: {index, top_k}`) end to end
against the very prompt retrieval built for it sent without retrieval (same prompt tokens,
checked), c=1, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

DATA = Path(__file__).resolve().parent.parent / "data" / "pubmedqa" / "pqal_dev.jsonl"
BASE = "smollm2-135m-instruct"


def load_items() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().split("\n") if line.strip()]


def rag_shaped_prompts(
    count: int, tokens: int, count_tokens, offset: int = 0, shared: bool = False
) -> list[str]:
    """`count` distinct prompts of about `tokens` tokens (of the model's tokenizer): numbered
    sources (abstracts), then the question of the first one, as retrieval.prompt lays out.
    `shared`: the first prompt's sources in every prompt, each with another question (the
    prefix cache's case: one manual, many questions)."""
    items = load_items()
    if shared:
        from retrieval.prompt import RAG_PROMPT_TEMPLATE

        head = rag_shaped_prompts(1, tokens, count_tokens, offset)[0].rpartition("\nQuestion: ")[0]
        tail = RAG_PROMPT_TEMPLATE.rpartition("{question}")[2]
        questions = [items[(offset + 1 + i * 7) % len(items)]["question"] for i in range(count)]
        return [f"{head}\nQuestion: {question}{tail}" for question in questions]
    prompts = []
    for i in range(count):
        start = (offset + i * 7) % len(items)
        question = items[start]["question"]
        sources: list[str] = []
        j = start
        while True:
            text = " ".join(items[j % len(items)]["contexts"])
            candidate = [*sources, f"[{len(sources) + 1}] {text}"]
            if count_tokens(format_prompt(candidate, question)) > tokens:
                # the last source cut by words to fill up to `tokens`
                words = text.split()
                while words:
                    candidate = [*sources, f"[{len(sources) + 1}] {' '.join(words)}"]
                    if count_tokens(format_prompt(candidate, question)) <= tokens:
                        sources = candidate
                        break
                    words = words[: int(len(words) * 0.95)]
                break
            sources = candidate
            j += 1
        prompts.append(format_prompt(sources, question))
    return prompts


def format_prompt(sources: list[str], question: str) -> str:
    from retrieval.prompt import RAG_PROMPT_TEMPLATE

    return RAG_PROMPT_TEMPLATE.format(sources="\n\n".join(sources), question=question)


def tokenizer_counter():
    """Token counter of the bundled model (both ragtune and llama.cpp serve its GGUF)."""
    from transformers import AutoTokenizer

    from ragtune.config import default_home
    from ragtune.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("bundled", default_home()))
    return lambda text: len(tokenizer(text)["input_ids"])


async def first_token(http: httpx.AsyncClient, url: str, body: dict, headers: dict) -> dict:
    """Stream one chat completion; time to the first text (or finish), prompt tokens, end."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, prompt_tokens = None, None
    async with http.stream("POST", f"{url}/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "status": r.status_code, "body": r.text[:200]}
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return {"ok": False, "status": "stream-error", "body": str(event)[:200]}
            if event.get("usage"):
                prompt_tokens = event["usage"].get("prompt_tokens")
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if ttft is None and (text or choice.get("finish_reason")):
                    ttft = time.perf_counter() - started
    return {
        "ok": ttft is not None,
        "ttft": ttft,
        "latency": time.perf_counter() - started,
        "prompt_tokens": prompt_tokens,
    }


async def level(args, prompts: list[str], concurrency: int, tokens: int, headers: dict) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[dict] = []

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {
                "model": args.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 1,
                "temperature": 0,
            }
            try:
                result = await first_token(http, args.url, body, headers)
            except httpx.HTTPError as exc:  # e.g. a server that drops a kept-alive connection
                result = {"ok": False, "status": type(exc).__name__}
            if result["ok"] and result["prompt_tokens"] is None:
                result["prompt_tokens"] = args.count_tokens(prompt)
            results.append(result)

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*[worker(http) for _ in range(concurrency)])
        elapsed = time.perf_counter() - started
    ok = [r for r in results if r["ok"]]
    if not ok:
        raise SystemExit(f"every request failed: {results[:3]}")
    ttfts = [r["ttft"] for r in ok]
    prompt_tokens = [r["prompt_tokens"] for r in ok]
    if concurrency == 1:
        rate = statistics.median(p / t for p, t in zip(prompt_tokens, ttfts, strict=True))
    else:
        rate = sum(prompt_tokens) / elapsed
    return {
        "label": args.label,
        "url": args.url,
        "target_tokens": tokens,
        "concurrency": concurrency,
        "requests": len(prompts),
        "errors": len(results) - len(ok),
        "error_details": [r.get("body") or r.get("status") for r in results if not r["ok"]][:3],
        "prompt_tokens_mean": round(statistics.mean(prompt_tokens), 1) if ok else None,
        "ttft_p50_s": round(statistics.median(ttfts), 3) if ok else None,
        "ttft_max_s": round(max(ttfts), 3) if ok else None,
        "prefill_tok_per_s": round(rate, 1) if ok else None,
        "elapsed_s": round(elapsed, 2),
    }


async def run_levels(args, headers: dict) -> list[dict]:
    out = []
    offset = 0
    for tokens in args.tokens:
        for concurrency in args.concurrency:
            count = args.requests or max(3, 2 * concurrency)
            prompts = rag_shaped_prompts(
                count, tokens, args.count_tokens, offset, args.shared_prefix
            )
            offset += count * 7 + 1
            result = await level(args, prompts, concurrency, tokens, headers)
            print(json.dumps(result), flush=True)
            out.append(result)
    return out


async def run_rag(args, headers: dict) -> list[dict]:
    """RAG request end to end vs the same prompt without retrieval (c=1, alternating)."""
    from ragtune.config import load_settings
    from server.protocol import RagOptions
    from server.rag import RetrievalService

    settings = load_settings(overrides={"home": args.home} if args.home else None)
    service = RetrievalService(settings.retrieval, settings.home)
    questions = [json.loads(line)["question"] for line in args.questions.read_text().splitlines()]
    rows: dict[str, list[dict]] = {"rag": [], "plain": []}
    options = RagOptions(index=args.rag_index, top_k=args.top_k)
    async with httpx.AsyncClient(timeout=args.timeout) as http:
        for index, question in enumerate(questions[: args.requests or 10]):
            prompt, _ = service.retrieve(options, question, None)
            message = {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0}
            # the two requests carry the same prompt: each its own cache_salt, so the second
            # does not find the first's K/V in the prefix cache (both prefill cold)
            salts = {"rag": f"rag-{index}", "plain": f"plain-{index}"}
            rag = await first_token(
                http,
                args.url,
                {
                    **message,
                    "messages": [{"role": "user", "content": question}],
                    "rag": {"index": args.rag_index, "top_k": args.top_k},
                    "cache_salt": salts["rag"],
                },
                headers,
            )
            plain_body = {
                **message,
                "messages": [{"role": "user", "content": prompt}],
                "cache_salt": salts["plain"],
            }
            plain = await first_token(http, args.url, plain_body, headers)
            if rag.get("prompt_tokens") != plain.get("prompt_tokens"):
                raise SystemExit(f"prompts differ: {rag} vs {plain}")
            rows["rag"].append(rag)
            rows["plain"].append(plain)
    out = []
    for kind, results in rows.items():
        out.append(
            {
                "label": f"{args.label} {kind}".strip(),
                "requests": len(results),
                "prompt_tokens_mean": round(
                    statistics.mean(r["prompt_tokens"] for r in results), 1
                ),
                "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 3),
                "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
            }
        )
        print(json.dumps(out[-1]), flush=True)
    ratio = out[0]["latency_p50_s"] / out[1]["latency_p50_s"]
    print(json.dumps({"rag_over_plain_latency_p50": round(ratio, 3)}), flush=True)
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| run | target tokens | c | prompt tokens | TTFT p50 s | TTFT max s | prefill tok/s "
        "| errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['target_tokens']} | {r['concurrency']} | "
            f"{r['prompt_tokens_mean']} | {r['ttft_p50_s']} | {r['ttft_max_s']} | "
            f"{r['prefill_tok_per_s']} | {r['errors']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=BASE)
    parser.add_argument(
        "--tokens",
        type=ints,
        default=[256, 1024, 1157, 1480],
        help="prompt lengths (of the text; the chat template adds ~30 tokens): 1157 is a "
        "`top_k: 5` RAG request, 1480 fits limits.max_prompt_tokens (1536)",
    )
    parser.add_argument("--concurrency", type=ints, default=[1, 4])
    parser.add_argument("--requests", type=int, default=0, help="per level (default 2c, >= 3)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--shared-prefix",
        action="store_true",
        help="every prompt of a level: the same sources, another question (the prefix cache)",
    )
    parser.add_argument("--rag-index", default=None, help="time RAG vs the same prompt plain")
    parser.add_argument("--home", default=None, help="RAGTUNE_HOME of the server (RAG mode)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32, help="RAG mode's answer length")
    parser.add_argument(
        "--questions",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "data" / "demo" / "eval_questions.jsonl",
    )
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> list[dict]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.rag_index:
        return await run_rag(args, headers)
    args.count_tokens = tokenizer_counter()
    async with httpx.AsyncClient(timeout=args.timeout) as http:  # warm-up, untimed
        await first_token(
            http,
            args.url,
            {"model": args.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
            headers,
        )
    results = await run_levels(args, headers)
    print(table(results))
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
