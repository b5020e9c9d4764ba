"""Shared fixtures: one real server on the bundled model for the whole test session."""

from __future__ import annotations

import pytest

from tests.helpers import RunningServer, start_server

API_KEY = "test-client-key"
ADMIN_KEY = "test-admin-key"
BASE_MODEL = "smollm2-135m-instruct"

# Small limits so every limit can be hit cheaply in tests.
SERVER_ENV = {
    "RAGTUNE_API_KEYS": API_KEY,
    "RAGTUNE_ADMIN_KEYS": ADMIN_KEY,
    "RAGTUNE_LIMITS__MAX_PROMPT_TOKENS": "512",
    "RAGTUNE_LIMITS__MAX_NEW_TOKENS": "128",
    "RAGTUNE_LIMITS__MAX_BODY_BYTES": "65536",
    "RAGTUNE_SERVER__LOG_LEVEL": "warning",
}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    log = tmp_path_factory.mktemp("server") / "server.log"
    running = start_server(SERVER_ENV, log)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server: RunningServer):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(server: RunningServer):
    import openai

    return openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)
