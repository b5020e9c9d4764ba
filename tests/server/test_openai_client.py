"""The official `openai` SDK against the real server on the bundled model."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import BASE_MODEL

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_base_model(client):
    ids = [m.id for m in client.models.list().data]
    assert BASE_MODEL in ids


def test_chat_answers_paris_at_temperature_zero(client):
    response = client.chat.completions.create(
        model=BASE_MODEL, messages=CAPITAL, temperature=0, max_tokens=40
    )
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 10
    assert 0 < usage.completion_tokens <= 40
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert response.system_fingerprint.startswith("fp_")


def test_max_tokens_gives_length_finish_and_exact_count(client):
    response = client.chat.completions.create(
        model=BASE_MODEL, messages=CAPITAL, temperature=0, max_completion_tokens=5
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5


def test_message_content_as_text_parts_matches_plain_string(client):
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the capital "},
                {"type": "text", "text": "of France?"},
            ],
        }
    ]
    a = client.chat.completions.create(
        model=BASE_MODEL, messages=parts, temperature=0, max_tokens=12
    )
    b = client.chat.completions.create(
        model=BASE_MODEL, messages=CAPITAL, temperature=0, max_tokens=12
    )
    assert a.choices[0].message.content == b.choices[0].message.content


def test_streaming_chat_equals_non_streaming(client):
    response = client.chat.completions.create(
        model=BASE_MODEL, messages=CAPITAL, temperature=0, max_tokens=24
    )
    whole, full = response.choices[0], response.choices[0].message.content
    stream = client.chat.completions.create(
        model=BASE_MODEL,
        messages=CAPITAL,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == response.usage


def test_streaming_without_usage_has_no_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model=BASE_MODEL, messages=CAPITAL, temperature=0, max_tokens=4, stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_completions_plain_and_streaming(client):
    prompt = "The three primary colors are"
    full = client.completions.create(model=BASE_MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert full.choices[0].text.strip()
    assert full.usage.completion_tokens <= 12
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=BASE_MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True
        )
        if c.choices
    )
    assert streamed == full.choices[0].text


def test_completions_accepts_token_ids(client):
    by_text = client.completions.create(
        model=BASE_MODEL, prompt="Hello, my name is", temperature=0, max_tokens=6
    )
    ids = by_text.usage.prompt_tokens
    assert ids > 0
    from transformers import AutoTokenizer

    from ragtune.config import default_home
    from ragtune.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("bundled", default_home()))
    token_ids = tokenizer("Hello, my name is", add_special_tokens=False)["input_ids"]
    by_ids = client.completions.create(
        model=BASE_MODEL, prompt=token_ids, temperature=0, max_tokens=6
    )
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_same_seed_same_output_and_different_seed_differs(client):
    def sample(seed: int) -> str:
        return (
            client.chat.completions.create(
                model=BASE_MODEL,
                temperature=1.0,
                top_p=0.95,
                seed=seed,
                max_tokens=24,
                messages=[{"role": "user", "content": "Write a short poem about the sea."}],
            )
            .choices[0]
            .message.content
        )

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_is_never_in_output(client, stream):
    base = (
        client.chat.completions.create(
            model=BASE_MODEL, messages=CAPITAL, temperature=0, max_tokens=40
        )
        .choices[0]
        .message.content
    )
    assert "Paris" in base
    kwargs = dict(model=BASE_MODEL, messages=CAPITAL, temperature=0, max_tokens=40, stop=["Paris"])
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert text == base[: base.index("Paris")]
    assert finish == "stop"


async def test_async_client_concurrent_requests_match_sequential(async_client, client):
    questions = [
        f"Name a fruit that is {color}."
        for color in ("red", "yellow", "green", "orange", "purple", "blue")
    ]

    def one(q: str) -> str:
        return (
            client.chat.completions.create(
                model=BASE_MODEL,
                messages=[{"role": "user", "content": q}],
                temperature=0,
                max_tokens=10,
            )
            .choices[0]
            .message.content
        )

    expected = [one(q) for q in questions]
    responses = await asyncio.gather(
        *[
            async_client.chat.completions.create(
                model=BASE_MODEL,
                messages=[{"role": "user", "content": q}],
                temperature=0,
                max_tokens=10,
            )
            for q in questions
        ]
    )
    assert [r.choices[0].message.content for r in responses] == expected


async def test_async_streaming(async_client):
    stream = await async_client.chat.completions.create(
        model=BASE_MODEL, messages=CAPITAL, temperature=0, max_tokens=16, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert "Paris" in text
