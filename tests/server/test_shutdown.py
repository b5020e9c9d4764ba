"""Graceful shutdown on SIGTERM: in-flight requests finish, new ones are refused, the
process exits cleanly."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from ragtune.launcher import start_server
from tests.conftest import API_KEY, BASE_MODEL, SERVER_ENV

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def own_server(tmp_path):
    running = start_server(
        {**SERVER_ENV, "RAGTUNE_AUDIT_LOG": str(tmp_path / "audit.log")}, tmp_path / "log"
    )
    yield running
    running.stop()


def stream_chat(base_url: str, first_token: threading.Event, events: list[dict]) -> None:
    body = {
        "model": BASE_MODEL,
        "messages": [{"role": "user", "content": "Count from one to fifty in words."}],
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=120
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append({**json.loads(line[6:]), "at": time.monotonic()})
                first_token.set()
            elif line == "data: [DONE]":
                events.append({"done": True})


def test_sigterm_finishes_in_flight_refuses_new_and_exits_zero(own_server):
    first_token, events = threading.Event(), []
    worker = threading.Thread(target=stream_chat, args=(own_server.base_url, first_token, events))
    worker.start()
    assert first_token.wait(60), "the stream never started"

    own_server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.5)
    try:
        refused = httpx.get(f"{own_server.base_url}/v1/models", headers=AUTH, timeout=5)
    except httpx.TransportError:
        pass  # listener closed: the connection is refused
    else:
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"

    worker.join(120)
    assert own_server.process.wait(60) == 0
    finished = [c for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    assert [c["finish_reason"] for c in finished] in (["stop"], ["length"])  # ran to its end
    assert any(e["at"] > signalled for e in events if e.get("choices"))  # tokens after SIGTERM
    assert [e for e in events if e.get("usage")]
    assert events[-1] == {"done": True}
    assert not [e for e in events if "error" in e]
    assert "Traceback" not in own_server.log()
