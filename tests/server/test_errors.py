"""Every bad input gets OpenAI's error shape and the right 4xx; the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

from ragtune.launcher import start_server
from tests.conftest import ADMIN_KEY, API_KEY, BASE_MODEL, SERVER_ENV

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = "/v1/chat/completions"
GOOD_MESSAGES = [{"role": "user", "content": "hi"}]


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as session:
        yield session


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": GOOD_MESSAGES}, "model"),
        ({"model": BASE_MODEL}, "messages"),
        ({"model": BASE_MODEL, "messages": []}, "messages"),
        ({"model": BASE_MODEL, "messages": "hello"}, "messages"),
        ({"model": BASE_MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None),
        (
            {
                "model": BASE_MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            },
            None,
        ),
        ({"model": BASE_MODEL, "messages": GOOD_MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": BASE_MODEL, "messages": GOOD_MESSAGES, "max_tokens": "many"}, "max_tokens"),
        (
            {"model": BASE_MODEL, "messages": GOOD_MESSAGES, "max_completion_tokens": -3},
            "max_completion_tokens",
        ),
        ({"model": BASE_MODEL, "messages": GOOD_MESSAGES, "temperature": 5}, "temperature"),
        ({"model": BASE_MODEL, "messages": GOOD_MESSAGES, "top_p": 0}, "top_p"),
        ({"model": BASE_MODEL, "messages": GOOD_MESSAGES, "n": 9}, "n"),
        ({"model": BASE_MODEL, "messages": GOOD_MESSAGES, "n": 0}, "n"),
        (
            {"model": BASE_MODEL, "messages": GOOD_MESSAGES, "stop": [str(i) for i in range(17)]},
            "stop",
        ),
        ({"model": BASE_MODEL, "messages": GOOD_MESSAGES, "logprobs": 3}, "logprobs"),
        ({"model": BASE_MODEL, "messages": GOOD_MESSAGES, "max_tokens": 100000}, "max_tokens"),
        (
            {
                "model": BASE_MODEL,
                "messages": GOOD_MESSAGES,
                "stream_options": {"include_usage": True},
            },
            "stream_options",
        ),
    ],
)
def test_invalid_chat_requests_are_400(http, body, param):
    assert_error(http.post(CHAT, json=body, headers=AUTH), 400, param)


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_json_is_400(http, stream):
    raw = b'{"model": "smollm2-135m-instruct", "messages": [' + (
        b'"stream": true' if stream else b""
    )
    error = assert_error(
        http.post(CHAT, content=raw, headers={**AUTH, "Content-Type": "application/json"}), 400
    )
    assert "JSON" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_limit_is_400_naming_the_limit(http, stream):
    long_text = "word " * 2000
    body = {
        "model": BASE_MODEL,
        "messages": [{"role": "user", "content": long_text}],
        "stream": stream,
    }
    error = assert_error(http.post(CHAT, json=body, headers=AUTH), 400, "messages")
    assert "512" in error["message"] and "max_prompt_tokens" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_max_tokens_above_server_limit_names_it(http):
    body = {"model": BASE_MODEL, "messages": GOOD_MESSAGES, "max_tokens": 129}
    error = assert_error(http.post(CHAT, json=body, headers=AUTH), 400, "max_tokens")
    assert "128" in error["message"] and "max_new_tokens" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "fields"), [(CHAT, {"messages": GOOD_MESSAGES}), ("/v1/completions", {"prompt": "hi"})]
)
def test_unknown_model_is_404_never_the_base_model(http, path, fields, stream):
    body = {"model": "no-such-adapter", **fields, "stream": stream}
    error = assert_error(http.post(path, json=body, headers=AUTH), 404, "model")
    assert error["code"] == "model_not_found"
    assert "no-such-adapter" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": BASE_MODEL}, "prompt"),
        ({"model": BASE_MODEL, "prompt": ""}, "prompt"),
        ({"model": BASE_MODEL, "prompt": [10**9]}, "prompt"),
        ({"model": BASE_MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_invalid_completion_requests_are_400(http, body, param):
    assert_error(http.post("/v1/completions", json=body, headers=AUTH), 400, param)


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/v1/models"), ("post", CHAT), ("post", "/v1/completions")],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": API_KEY},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
def test_missing_or_invalid_key_is_401(http, method, path, headers):
    response = http.request(
        method, path, headers=headers, json={"model": BASE_MODEL, "messages": GOOD_MESSAGES}
    )
    error = assert_error(response, 401)
    assert error["type"] == "authentication_error"


def test_admin_key_also_works_as_client_key(http):
    response = http.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200


def test_health_and_ready_need_no_key(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code == 200


def test_body_over_limit_is_413(http):
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}
    error = assert_error(http.post(CHAT, json=body, headers=AUTH), 413)
    assert "max_body_bytes" in error["message"]


def test_chunked_body_over_limit_is_413(http):
    def chunks():
        yield b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}]}'

    response = http.post(
        CHAT, content=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_error(response, 413)


def test_unknown_route_and_wrong_method_use_error_shape(http):
    assert_error(http.get("/v1/nothing-here", headers=AUTH), 404)
    assert_error(http.get(CHAT, headers=AUTH), 405)


def test_server_still_serves_after_bad_input(http):
    response = http.post(
        CHAT,
        headers=AUTH,
        json={"model": BASE_MODEL, "messages": GOOD_MESSAGES, "max_tokens": 3, "temperature": 0},
    )
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] <= 3


def test_request_id_is_returned_and_a_client_one_is_kept(http):
    generated = http.get("/health").headers["X-Request-ID"]
    assert len(generated) == 32
    kept = http.get("/v1/models", headers={**AUTH, "X-Request-ID": "trace-123"})
    assert kept.headers["X-Request-ID"] == "trace-123"
    error = http.get("/v1/models", headers={"X-Request-ID": "trace-456"})
    assert error.status_code == 401 and error.headers["X-Request-ID"] == "trace-456"


# Regressions found by the schemathesis fuzz run (tests/fuzz): each was a 500.
LONE = "valve \ud800"  # JSON may escape a lone UTF-16 surrogate; UTF-8 cannot encode it
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.mark.parametrize(
    ("path", "body", "param", "headers"),
    [
        (
            CHAT,
            {"model": BASE_MODEL, "messages": [{"role": "user", "content": LONE}]},
            "messages.0.content",
            AUTH,
        ),
        (CHAT, {"model": BASE_MODEL, "messages": GOOD_MESSAGES, "stop": [LONE]}, "stop", AUTH),
        ("/v1/completions", {"model": BASE_MODEL, "prompt": LONE}, "prompt", AUTH),
        ("/v1/embeddings", {"model": "all-minilm-l6-v2", "input": [LONE]}, "input", AUTH),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": LONE}, "lora_path", ADMIN),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(http, path, body, param, headers):
    raw = json.dumps(body).encode()  # ASCII-escaped, as any JSON client may send it
    response = http.post(path, content=raw, headers={**headers, "Content-Type": "application/json"})
    error = assert_error(response, 400, param)
    assert "surrogate" in error["message"]


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seed_outside_the_generator_range_is_400(http, seed):
    body = {"model": BASE_MODEL, "messages": GOOD_MESSAGES, "max_tokens": 1, "seed": seed}
    assert_error(http.post(CHAT, json=body, headers=AUTH), 400, "seed")


def test_largest_seed_is_accepted(http):
    body = {"model": BASE_MODEL, "messages": GOOD_MESSAGES, "max_tokens": 1, "seed": 2**64 - 1}
    assert http.post(CHAT, json=body, headers=AUTH).status_code == 200


def test_invalid_index_name_in_the_path_is_400(http):
    error = assert_error(http.delete("/v1/indexes/%C3%9ER%C3%BF", headers=ADMIN), 400, "name")
    assert error["code"] == "invalid_index_name"


def test_body_that_is_not_utf8_is_400_with_a_code(http):
    raw = b'{"model": "' + BASE_MODEL.encode() + b'", "prompt": "\xff\xfe"}'
    response = http.post(
        "/v1/completions", content=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert assert_error(response, 400)["code"] in ("invalid_body", "invalid_json")


@pytest.fixture(scope="module")
def tiny_limit_server(tmp_path_factory):
    """A server whose limits.max_new_tokens (4) is below /v1/completions' default of 16."""
    log = tmp_path_factory.mktemp("tiny-limit") / "server.log"
    running = start_server({**SERVER_ENV, "RAGTUNE_LIMITS__MAX_NEW_TOKENS": "4"}, log)
    yield running.base_url, AUTH
    running.stop()


def test_completions_default_max_tokens_never_exceeds_the_server_limit(tiny_limit_server):
    """OpenAI's default of 16 for /v1/completions is capped by limits.max_new_tokens; only a
    client-sent max_tokens above the limit is an error."""
    url, headers = tiny_limit_server
    body = {"model": BASE_MODEL, "prompt": "One, two,", "temperature": 0}
    ok = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] <= 4
    too_many = httpx.post(
        f"{url}/v1/completions", json={**body, "max_tokens": 16}, headers=headers, timeout=60
    )
    assert_error(too_many, 400, "max_tokens")
