"""Sampling controls, `n` and generated-token logprobs through the official `openai` client
against the real server on the bundled model (vLLM's extensions go in `extra_body`)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import API_KEY, BASE_MODEL

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def token_id(server):
    """The id of a text that is one token (through the server's own /tokenize)."""

    def find(text: str) -> int:
        body = {"prompt": text, "add_special_tokens": False}
        tokens = httpx.post(f"{server.base_url}/tokenize", json=body, headers=AUTH).json()
        assert len(tokens["tokens"]) == 1, tokens
        return tokens["tokens"][0]

    return find


def chat(client, messages=CAPITAL, **kwargs):
    return client.chat.completions.create(model=BASE_MODEL, messages=messages, **kwargs)


def greedy_text(client, max_tokens: int = 40, **kwargs) -> str:
    return chat(client, temperature=0, max_tokens=max_tokens, **kwargs).choices[0].message.content


# -------------------------------------------------------------------------------------- n
def test_n_gives_distinct_indexed_choices_counted_in_usage(client):
    response = chat(client, messages=POEM, n=3, temperature=1.0, seed=11, max_tokens=16)
    assert [c.index for c in response.choices] == [0, 1, 2]
    texts = [c.message.content for c in response.choices]
    assert len(set(texts)) == 3, texts
    with_logprobs = chat(
        client, messages=POEM, n=3, temperature=1.0, seed=11, max_tokens=16, logprobs=True
    )
    assert [c.message.content for c in with_logprobs.choices] == texts  # seeded: reproducible
    per_choice = [len(c.logprobs.content) for c in with_logprobs.choices]
    assert with_logprobs.usage.completion_tokens == sum(per_choice)
    assert with_logprobs.usage.prompt_tokens == response.usage.prompt_tokens  # counted once


def test_choice_i_is_seeded_with_seed_plus_i(client):
    both = chat(client, messages=POEM, n=2, temperature=1.0, seed=40, max_tokens=12)
    second = chat(client, messages=POEM, temperature=1.0, seed=41, max_tokens=12)
    assert both.choices[1].message.content == second.choices[0].message.content


def test_streamed_choices_carry_their_index(client):
    kwargs = dict(messages=POEM, n=2, temperature=1.0, seed=5, max_tokens=10)
    whole = chat(client, **kwargs)
    chunks = list(chat(client, **kwargs, stream=True, stream_options={"include_usage": True}))
    texts, finishes = ["", ""], [None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    assert chunks[-1].usage == whole.usage


def test_completions_n(client):
    response = client.completions.create(
        model=BASE_MODEL, prompt="Once upon a time", n=2, temperature=1.0, seed=3, max_tokens=8
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens == 16
    streamed = ["", ""]
    for chunk in client.completions.create(
        model=BASE_MODEL,
        prompt="Once upon a time",
        n=2,
        temperature=1.0,
        seed=3,
        max_tokens=8,
        stream=True,
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in response.choices]


# -------------------------------------------------------------------------- sampling controls
def test_logit_bias_plus_100_forces_a_token_and_minus_100_bans_one(client, token_id):
    bang = token_id("!")
    forced = chat(client, temperature=1.0, seed=1, max_tokens=5, logit_bias={str(bang): 100})
    assert forced.choices[0].message.content == "!!!!!"
    base = greedy_text(client)
    paris = token_id(" Paris")
    assert " Paris" in base
    banned = greedy_text(client, logit_bias={str(paris): -100})
    assert " Paris" not in banned


def test_top_k_one_equals_greedy(client):
    sampled = chat(client, temperature=1.0, seed=9, max_tokens=24, extra_body={"top_k": 1}).choices[
        0
    ]
    assert sampled.message.content == greedy_text(client, max_tokens=24)


def test_stop_token_ids_stop_before_the_token(client, token_id):
    base = greedy_text(client)
    choice = chat(
        client, temperature=0, max_tokens=40, extra_body={"stop_token_ids": [token_id(" Paris")]}
    ).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == base[: base.index(" Paris")]


def test_min_tokens_suppresses_eos(client):
    short = chat(client, messages=[{"role": "user", "content": "Say hi."}], temperature=0)
    assert short.choices[0].finish_reason == "stop"
    wanted = short.usage.completion_tokens + 5
    longer = chat(
        client,
        messages=[{"role": "user", "content": "Say hi."}],
        temperature=0,
        max_tokens=wanted + 20,
        extra_body={"min_tokens": wanted},
    )
    assert longer.usage.completion_tokens >= wanted
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)


def test_ignore_eos_runs_to_max_tokens(client):
    messages = [{"role": "user", "content": "Say hi."}]
    assert chat(client, messages=messages, temperature=0).choices[0].finish_reason == "stop"
    response = chat(
        client, messages=messages, temperature=0, max_tokens=48, extra_body={"ignore_eos": True}
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 48


@pytest.mark.parametrize(
    "controls",
    [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 2.0}},
    ],
)
def test_penalties_break_a_repetition(client, controls):
    def text(**kwargs) -> str:
        prompt = "red red red red red red red"
        return (
            client.completions.create(
                model=BASE_MODEL, prompt=prompt, temperature=0, max_tokens=12, **kwargs
            )
            .choices[0]
            .text
        )

    assert text().count("red") >= 8
    assert text(**controls).count("red") <= 2


def test_more_than_four_stop_strings(client):
    base = greedy_text(client)
    stops = [f"never{i}" for i in range(15)] + ["Paris"]
    assert greedy_text(client, stop=stops) == base[: base.index("Paris")]


# ------------------------------------------------------------------------------------ logprobs
def assert_chat_logprobs(content, top: int) -> None:
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace") == entry.token
        assert len(entry.top_logprobs) == top
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_chat_logprobs_of_greedy_tokens_are_the_top_ones(client):
    response = chat(client, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert "".join(e.token for e in content) == choice.message.content
    assert_chat_logprobs(content, 3)
    for entry in content:
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
    plain = chat(client, temperature=0, max_tokens=12, logprobs=True).choices[0]
    assert [e.top_logprobs for e in plain.logprobs.content] == [[]] * len(content)
    assert chat(client, temperature=0, max_tokens=4).choices[0].logprobs is None


def test_streamed_chat_logprobs_match_the_whole_response(client):
    kwargs = dict(temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    whole = chat(client, **kwargs).choices[0].logprobs.content
    streamed = []
    for chunk in chat(client, **kwargs, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed.extend(choice.logprobs.content)
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]
    assert_chat_logprobs(streamed, 2)


def test_completions_logprobs_shape(client):
    response = client.completions.create(
        model=BASE_MODEL, prompt="The sky is", temperature=0, max_tokens=6, logprobs=3
    )
    choice = response.choices[0]
    lp = choice.logprobs
    count = response.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == count
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(count)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == logprob == max(top.values())  # greedy: the chosen is the best
        assert 1 <= len(top) <= 4
    streamed = []
    for chunk in client.completions.create(
        model=BASE_MODEL, prompt="The sky is", temperature=0, max_tokens=6, logprobs=3, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == lp.token_logprobs


async def test_logprobs_do_not_depend_on_batch_neighbours(client, async_client):
    kwargs = dict(temperature=0, max_tokens=10, logprobs=True, top_logprobs=4)
    alone = chat(client, **kwargs).choices[0].logprobs.content
    crowd = [
        async_client.chat.completions.create(
            model=BASE_MODEL,
            messages=[{"role": "user", "content": f"Count to {i} in French."}],
            temperature=0.8,
            seed=i,
            max_tokens=16,
        )
        for i in range(3)
    ]
    together, *_ = await asyncio.gather(
        async_client.chat.completions.create(model=BASE_MODEL, messages=CAPITAL, **kwargs),
        *crowd,
    )
    assert together.choices[0].logprobs.content == alone
