"""Continuous batching on the real model over HTTP: outputs independent of batch neighbours,
per-row sampling parameters, multi-byte streaming, cancellation and backpressure."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from ragtune.launcher import start_server
from tests.conftest import API_KEY, BASE_MODEL, SERVER_ENV

PROMPTS = [  # different lengths on purpose
    "Hi",
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name.",
    "List three fruits.",
    "Write one sentence about the ocean, the moon and the tides, using the word 'gravity'.",
    "Count from one to five.",
]
MODELS = [BASE_MODEL, "alpha", "beta", "gamma"]


async def chat(client, model: str, prompt: str, **kwargs) -> tuple[str, str]:
    response = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        **{"max_tokens": 24, **kwargs},
    )
    return response.choices[0].message.content, response.choices[0].finish_reason


async def test_greedy_output_is_the_same_alone_and_in_a_mixed_adapter_batch(async_client):
    jobs = [(MODELS[i % len(MODELS)], prompt) for i, prompt in enumerate(PROMPTS + PROMPTS[:4])]
    # Alone, a model's first request computes the chat template's system prompt and later
    # ones restore it from the prefix cache; together, the prompts also share prefill
    # forwards: neither may change a token.
    alone = [await chat(async_client, model, prompt) for model, prompt in jobs]
    together = await asyncio.gather(*[chat(async_client, m, p) for m, p in jobs])
    assert list(together) == alone
    # the adapters really change the output (so the test would notice a wrong adapter)
    per_model = {m: t for (m, p), (t, _) in zip(jobs, alone, strict=True) if p == PROMPTS[1]}
    assert len(set(per_model.values())) == len(per_model)


async def test_stop_strings_and_max_tokens_apply_per_row_in_a_mixed_batch(async_client):
    base_text, _ = await chat(async_client, BASE_MODEL, PROMPTS[1], max_tokens=40)
    cut = base_text.split()[3]
    jobs = [
        dict(model=BASE_MODEL, prompt=PROMPTS[1], max_tokens=40, stop=[cut]),
        dict(model="alpha", prompt=PROMPTS[2], max_tokens=3),
        dict(model="beta", prompt=PROMPTS[3], max_tokens=9),
        dict(model=BASE_MODEL, prompt=PROMPTS[1], max_tokens=5),
        dict(model="gamma", prompt=PROMPTS[4], max_tokens=17),
    ]
    results = await asyncio.gather(
        *[
            async_client.chat.completions.create(
                model=j["model"],
                messages=[{"role": "user", "content": j["prompt"]}],
                temperature=0,
                max_tokens=j["max_tokens"],
                stop=j.get("stop"),
            )
            for j in jobs
        ]
    )
    stopped = results[0].choices[0]
    assert stopped.finish_reason == "stop" and cut not in stopped.message.content
    assert stopped.message.content == base_text[: base_text.index(cut)]
    for job, result in zip(jobs[1:], results[1:], strict=True):
        assert result.usage.completion_tokens <= job["max_tokens"]
        if result.choices[0].finish_reason == "length":
            assert result.usage.completion_tokens == job["max_tokens"]


async def test_japanese_streams_without_broken_characters(async_client):
    prompt = "東京は日本の首都です。大阪は"
    full = await async_client.completions.create(
        model=BASE_MODEL, prompt=prompt, temperature=0, max_tokens=40
    )
    pieces = [
        c.choices[0].text
        async for c in await async_client.completions.create(
            model=BASE_MODEL, prompt=prompt, temperature=0, max_tokens=40, stream=True
        )
        if c.choices
    ]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == full.choices[0].text
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", full.choices[0].text)


def running_sequences(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return float(re.search(r"^ragtune_sequences_running (\S+)$", text, re.M)[1])


def test_client_disconnect_frees_the_slot(server):
    body = {
        "model": BASE_MODEL,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 128,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        for _ in range(3):
            with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                # the role chunk can come before the engine admits the request: wait for a
                # token, then see the sequence among the running ones
                lines = r.iter_lines()
                for line in lines:
                    if (
                        line.startswith("data:")
                        and '"content":"' in line
                        and '"content":""' not in line
                    ):
                        break
                deadline = time.monotonic() + 1
                while running_sequences(server.base_url) < 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                if running_sequences(server.base_url) < 1:  # seen in ~1 of 6 runs: diagnose
                    rest = list(lines)
                    log = server.log_path.read_text()[-3000:]
                    raise AssertionError(f"not running after {line}; then {rest[-3:]}; {log}")
            # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 10
        while running_sequences(server.base_url) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running_sequences(server.base_url) == 0


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """One slot and a one-request queue, so backpressure is easy to reach."""
    env = {**SERVER_ENV, "RAGTUNE_ENGINE__MAX_BATCH_SIZE": "1", "RAGTUNE_LIMITS__MAX_QUEUE": "1"}
    running = start_server(env, tmp_path_factory.mktemp("tiny") / "server.log")
    yield running
    running.stop()


async def test_full_queue_gets_429_with_retry_after_and_others_succeed(tiny_server):
    body = {
        "model": BASE_MODEL,
        "messages": [{"role": "user", "content": "Tell a story."}],
        # the first request still runs when the last one arrives, however fast the engine
        # (64 tokens that may end early at 0.2 s apart let every request through once decode
        # steps got faster)
        "max_tokens": 128,
        "ignore_eos": True,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=120) as http:

        async def post(delay: float) -> httpx.Response:
            await asyncio.sleep(delay)
            return await http.post("/v1/chat/completions", json=body, headers=headers)

        responses = await asyncio.gather(*[post(0.02 * i) for i in range(5)])
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    limited = next(r for r in responses if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert "max_queue" in limited.json()["error"]["message"]
