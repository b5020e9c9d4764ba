"""limits.request_timeout_s: a request still running past it is aborted with a 504 (an SSE
error event when streaming) and its slot is freed for the next request."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from ragtune.launcher import start_server
from tests.conftest import API_KEY, BASE_MODEL, SERVER_ENV

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {
    "model": BASE_MODEL,
    "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
    "max_tokens": 128,
    "temperature": 0.9,
    "seed": 1,
}


@pytest.fixture(scope="module")
def quick_timeout_server(tmp_path_factory):
    env = {**SERVER_ENV, "RAGTUNE_LIMITS__REQUEST_TIMEOUT_S": "0.4"}
    running = start_server(env, tmp_path_factory.mktemp("timeout") / "server.log")
    yield running
    running.stop()


def running_sequences(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", headers=AUTH, timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("ragtune_sequences_running "))
    return float(line.split()[1])


def test_a_request_past_the_timeout_gets_504_and_frees_its_slot(quick_timeout_server):
    url = quick_timeout_server.base_url
    response = httpx.post(f"{url}/v1/chat/completions", json=LONG, headers=AUTH, timeout=60)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "request_timeout" and "request_timeout_s" in error["message"]
    deadline = time.monotonic() + 5
    while running_sequences(url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running_sequences(url) == 0


def test_a_stream_past_the_timeout_ends_with_an_error_event(quick_timeout_server):
    events = []
    with httpx.stream(
        "POST",
        f"{quick_timeout_server.base_url}/v1/chat/completions",
        json={**LONG, "stream": True},
        headers=AUTH,
        timeout=60,
    ) as response:
        assert response.status_code == 200  # the stream had started
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "request_timeout"
