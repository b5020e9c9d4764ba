"""Nothing is silently ignored: every field of a generation request is honoured or answered 400
naming it, harmless metadata is accepted, and the served OpenAPI schema lists every field."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import API_KEY, BASE_MODEL
from tests.server.test_errors import assert_error

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
BIG_ID = 10**7  # beyond the vocabulary


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60, headers=AUTH) as session:
        yield session


def chat(**fields):
    return {"model": BASE_MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}


def completion(**fields):
    return {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 2, **fields}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, chat(n=9), "n"),
        (CHAT, chat(top_logprobs=21, logprobs=True), "top_logprobs"),
        (CHAT, chat(top_logprobs=2), "top_logprobs"),  # without logprobs: true
        (CHAT, chat(logit_bias={"10": 101}), "logit_bias"),
        (CHAT, chat(logit_bias={"10": -100.5}), "logit_bias"),
        (CHAT, chat(logit_bias={"ten": 1}), "logit_bias"),
        (CHAT, chat(logit_bias={str(BIG_ID): 1}), "logit_bias"),
        (CHAT, chat(stop_token_ids=[BIG_ID]), "stop_token_ids"),
        (CHAT, chat(stop_token_ids=[-1]), "stop_token_ids"),
        (CHAT, chat(presence_penalty=2.5), "presence_penalty"),
        (CHAT, chat(frequency_penalty=-3), "frequency_penalty"),
        (CHAT, chat(repetition_penalty=0), "repetition_penalty"),
        (CHAT, chat(top_k=-2), "top_k"),
        (CHAT, chat(min_p=1.5), "min_p"),
        (CHAT, chat(min_tokens=-1), "min_tokens"),
        (CHAT, chat(min_tokens=5), "min_tokens"),  # above max_tokens
        (CHAT, chat(ignore_eos="maybe"), "ignore_eos"),
        (
            CHAT,
            chat(tools=[{"type": "function", "function": {"name": "bad name"}}]),
            "tools.0.function.name",
        ),
        (CHAT, chat(tool_choice="required"), "tool_choice"),  # without tools
        (CHAT, chat(parallel_tool_calls=True), "parallel_tool_calls"),
        (CHAT, chat(response_format={"type": "yaml"}), "response_format.type"),
        (CHAT, chat(functions=[{"name": "f"}]), "functions"),
        (CHAT, chat(echo=True), "echo"),  # vLLM's chat echo: not a field here
        (CHAT, chat(frobnicate=1), "frobnicate"),
        (CHAT, chat(stream_options={"include_usage": True, "x": 1}), "stream_options.x"),
        (
            CHAT,
            chat(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]),
            "messages.0.tool_calls.0.function",
        ),
        (
            CHAT,
            chat(messages=[{"role": "user", "content": "hi", "audio": {"id": 1}}]),
            "messages.0.audio",
        ),
        (COMPLETIONS, completion(n=9), "n"),
        (COMPLETIONS, completion(logprobs=21), "logprobs"),
        (COMPLETIONS, completion(logprobs=-1), "logprobs"),
        (COMPLETIONS, completion(suffix="!"), "suffix"),
        (COMPLETIONS, completion(best_of=3), "best_of"),
        (COMPLETIONS, completion(logit_bias={"1": 300}), "logit_bias"),
        (COMPLETIONS, completion(stop_token_ids=[BIG_ID]), "stop_token_ids"),
        (COMPLETIONS, completion(top_logprobs=2), "top_logprobs"),  # chat's field
    ],
)
def test_invalid_or_unsupported_fields_are_400_naming_them(http, path, body, param):
    error = assert_error(http.post(path, json=body), 400, param)
    assert param.split(".")[-1] in error["message"]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True])
def test_metadata_fields_are_accepted(http, path, stream):
    metadata = {"user": "u1", "metadata": {"team": "qa"}, "store": False, "service_tier": "auto"}
    body = (chat if path == CHAT else completion)(stream=stream, temperature=0, **metadata)
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text


def test_harmless_echoed_message_keys_are_accepted(http):
    """The SDK sends a response message back as history with these keys empty."""
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!", "refusal": None, "tool_calls": None},
        {"role": "user", "content": "again", "name": "sam"},
    ]
    assert http.post(CHAT, json=chat(messages=history)).status_code == 200


def test_best_of_equal_to_n_is_accepted(http):
    body = completion(n=2, best_of=2, temperature=1.0, seed=1)
    response = http.post(COMPLETIONS, json=body)
    assert response.status_code == 200 and len(response.json()["choices"]) == 2


def test_openapi_lists_every_generation_field(http):
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    shared = {
        "model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
        "stream_options", "n", "presence_penalty", "frequency_penalty", "logit_bias", "top_k",
        "min_p", "repetition_penalty", "stop_token_ids", "min_tokens", "ignore_eos", "user",
        "metadata", "store", "service_tier", "rag", "cache_salt",
    }  # fmt: skip
    chat_fields = set(schemas["ChatCompletionRequest"]["properties"])
    assert shared | {
        "messages", "max_completion_tokens", "logprobs", "top_logprobs", "prompt_logprobs",
        "tools", "tool_choice", "parallel_tool_calls", "response_format",
    } == chat_fields  # fmt: skip
    completion_fields = set(schemas["CompletionRequest"]["properties"])
    assert shared | {"prompt", "logprobs", "echo", "suffix", "best_of"} == completion_fields
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        assert schemas[name].get("additionalProperties") is False
