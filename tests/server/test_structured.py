"""Structured output through the official client on the bundled model: `parse` with a pydantic
model validates every answer, across base and adapter rows batched together; json_object
gives a JSON object; a schema the grammar library cannot compile is a 400 naming it."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import ADAPTERS, API_KEY, BASE_MODEL


class City(BaseModel):
    name: str = Field(max_length=24)
    country_code: Literal["FR", "DE", "JP", "US", "GB"]
    population_millions: int = Field(ge=0, le=100)
    capital: bool


QUESTIONS = [
    "Describe Paris as JSON.",
    "Describe Tokyo as JSON.",
    "Describe Berlin as JSON.",
    "Describe the city of London as JSON.",
]


def parse_all(async_client, count: int, concurrency: int) -> list[City]:
    """`count` parse calls, `concurrency` at once, round-robin over the base and adapters,
    greedy and sampled alternately; every one must finish and validate."""
    models = [BASE_MODEL, *ADAPTERS]

    async def ask(i: int) -> City:
        completion = await client.chat.completions.parse(
            model=models[i % len(models)],
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            response_format=City,
            max_tokens=96,
            temperature=0.7 if i % 2 else 0,
            seed=i,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        return choice.message.parsed

    async def run() -> list[City]:
        limit = asyncio.Semaphore(concurrency)

        async def bounded(i: int) -> City:
            async with limit:
                return await ask(i)

        async with client:
            return await asyncio.gather(*(bounded(i) for i in range(count)))

    # a client of this asyncio.run's own: a shared one's pooled connections would belong to
    # the loop of an earlier asyncio.run, closed by now
    client = openai.AsyncOpenAI(
        base_url=async_client.base_url, api_key=API_KEY, max_retries=0, timeout=120
    )

    return asyncio.run(run())


def test_parse_validates_every_answer_in_a_mixed_adapter_batch(async_client):
    cities = parse_all(async_client, 12, 8)
    assert len(cities) == 12 and all(isinstance(city, City) for city in cities)


@pytest.mark.slow  # issue #17's full check: 64 requests at c=16
def test_parse_validates_64_answers_at_c16_over_mixed_adapters(async_client):
    cities = parse_all(async_client, 64, 16)
    assert len(cities) == 64 and all(isinstance(city, City) for city in cities)


def test_json_object_gives_a_json_object(client):
    completion = client.chat.completions.create(
        model=BASE_MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"},
        max_tokens=64,
        temperature=0,
    )
    text = completion.choices[0].message.content
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still the start of an object
        assert text.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
            "response_format",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema"),
        ({"type": "yaml"}, "response_format.type"),
    ],
)
def test_schemas_that_cannot_be_followed_are_400_naming_the_field(server, response_format, param):
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={
            "model": BASE_MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": response_format,
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert "bogus" in error["message"] or param != "response_format"
