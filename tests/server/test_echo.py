"""`/v1/completions` echo on the bundled model through the official client: the prompt comes
back before the completion, with logprobs over prompt and generated tokens (vLLM's shape),
streamed too; several prompts give several choices; max_tokens 0 only scores. And vLLM's
chat extension `prompt_logprobs`: the same prompt scores from a chat request."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import API_KEY, BASE_MODEL

PROMPT = "The capital of France is"


def test_echo_returns_the_prompt_and_logprobs_for_prompt_and_completion(client):
    completion = client.completions.create(
        model=BASE_MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=4, temperature=0
    )
    [choice] = completion.choices
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    logprobs = choice.logprobs
    total = completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == total
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    plain = client.completions.create(
        model=BASE_MODEL, prompt=PROMPT, logprobs=2, max_tokens=4, temperature=0
    )
    assert choice.text == PROMPT + plain.choices[0].text
    generated = logprobs.token_logprobs[completion.usage.prompt_tokens :]
    assert generated == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)


def test_streamed_echo_sends_the_prompt_first(client):
    stream = client.completions.create(
        model=BASE_MODEL,
        prompt=PROMPT,
        echo=True,
        logprobs=0,
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    whole = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens) == whole


def test_several_prompts_give_choices_in_order_and_usage_counts_each(client):
    prompts = [PROMPT, "Water boils at"]
    completion = client.completions.create(
        model=BASE_MODEL, prompt=prompts, echo=True, max_tokens=0, n=2
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert [c.text for c in completion.choices] == [prompts[0]] * 2 + [prompts[1]] * 2
    single = [
        client.completions.create(model=BASE_MODEL, prompt=p, echo=True, max_tokens=0)
        for p in prompts
    ]
    assert completion.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)
    assert completion.usage.completion_tokens == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": [PROMPT, [1, 2]]}, "prompt"),
        ({"prompt": [[]], "echo": True, "max_tokens": 0}, "prompt"),
        ({"prompt": PROMPT, "echo": True, "logprobs": 21}, "logprobs"),
    ],
)
def test_bad_echo_requests_are_400_naming_the_field(server, body, param):
    response = httpx.post(
        f"{server.v1}/completions",
        json={"model": BASE_MODEL, **body},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == param


def test_chat_prompt_logprobs_are_the_echoed_prompts(client, server):
    """vLLM's `prompt_logprobs` on a chat request: one entry per prompt token (None for the
    first), each holding the token's own logprob and rank and its top alternatives; the
    same numbers as echoing the rendered prompt through /v1/completions."""
    messages = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    chat = client.chat.completions.create(
        model=BASE_MODEL,
        messages=messages,
        max_tokens=2,
        temperature=0,
        extra_body={"prompt_logprobs": 2},
    )
    entries = chat.model_extra["prompt_logprobs"]
    assert len(entries) == chat.usage.prompt_tokens and entries[0] is None
    ids = httpx.post(
        f"{server.base_url}/tokenize",
        json={"model": BASE_MODEL, "messages": messages},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ).json()["tokens"]
    echo = client.completions.create(
        model=BASE_MODEL, prompt=ids, echo=True, logprobs=2, max_tokens=0, temperature=0
    )
    echoed = echo.choices[0].logprobs
    for token, entry, logprob, top in zip(
        ids[1:], entries[1:], echoed.token_logprobs[1:], echoed.top_logprobs[1:], strict=True
    ):
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(logprob, abs=1e-5)
        alternatives = sorted(entry.values(), key=lambda e: -e["logprob"])[:2]
        assert {a["decoded_token"] for a in alternatives} <= set(top)
        # rank: 1 + how many tokens are more likely; the top alternatives are ranks 1 and 2
        best = max(a["logprob"] for a in entry.values())
        assert (own["rank"] == 1) == (own["logprob"] >= best)
        assert own["rank"] >= 1 and len(entry) in (2, 3)
    plain = client.chat.completions.create(
        model=BASE_MODEL, messages=messages, max_tokens=2, temperature=0
    )
    assert plain.model_extra.get("prompt_logprobs") is None
    assert plain.choices[0].message.content == chat.choices[0].message.content


QUESTIONS = [
    "Is the sky blue?",
    "Do tailored interventions increase mammography use among HMO women?",
    "Is a temperature of 39 degrees Celsius a fever in adults?",
    "Can regular exercise lower resting blood pressure in people with hypertension?",
]


def test_first_token_logprobs_equal_an_echo_of_the_prompt_and_that_token(client, server):
    """What the bench's likelihood route reads (`--likelihood-from generation`): a chat
    request's first generated token's top alternatives, exactly the numbers an echo of the
    rendered prompt plus that token gives (lm-eval's local-completions route), for prompts of
    several lengths: a prompt's rows do not change when a token is appended after them."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    system = "Answer the question. Begin with yes, no or maybe."
    for question in QUESTIONS:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        chat = client.chat.completions.create(
            model=BASE_MODEL,
            messages=messages,
            max_tokens=1,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
        )
        [first] = chat.choices[0].logprobs.content
        ids = httpx.post(
            f"{server.base_url}/tokenize",
            json={"model": BASE_MODEL, "messages": messages},
            headers=headers,
            timeout=60,
        ).json()["tokens"]
        for alternative in first.top_logprobs[:3]:
            appended = httpx.post(
                f"{server.base_url}/tokenize",
                json={
                    "model": BASE_MODEL,
                    "prompt": alternative.token,
                    "add_special_tokens": False,
                },
                headers=headers,
                timeout=60,
            ).json()["tokens"]
            if len(appended) != 1:  # a token text that re-tokenizes otherwise
                continue
            echo = client.completions.create(
                model=BASE_MODEL,
                prompt=ids + appended,
                echo=True,
                logprobs=1,
                max_tokens=0,
                temperature=0,
            )
            assert echo.choices[0].logprobs.token_logprobs[-1] == alternative.logprob


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ],
)
def test_bad_chat_prompt_logprobs_are_400_naming_the_field(server, extra, param):
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], **extra},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == param
