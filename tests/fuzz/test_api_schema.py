"""Property-based fuzzing of every route in the served OpenAPI schema, over real HTTP.

The specification: whatever a client sends, the server never answers 5xx, its responses match
the schema it publishes, and every error is OpenAI's {"error": {message, type, param, code}}
with a 4xx status (streams included: an error event inside an SSE body has the same shape and
is never a server error).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)

from ragtune.launcher import RunningServer
from tests.fuzz.strategies import ADAPTER, FUZZ_ADMIN_KEY, right_key

ERROR_FIELDS = {"message", "type", "param", "code"}

schema = schemathesis.pytest.from_fixture("api_schema")

CHECKS = [
    not_a_server_error,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def assert_openai_error(body: object, where: str) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, f"{where}: not an error object"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, f"{where}: fields {error}"
    assert isinstance(error["message"], str) and error["message"], f"{where}: empty message"
    assert isinstance(error["type"], str), f"{where}: type is not a string"
    assert error["param"] is None or isinstance(error["param"], str), f"{where}: param"
    assert error["code"] is None or isinstance(error["code"], str), f"{where}: code"
    assert "Traceback" not in error["message"], f"{where}: stack trace leaked"


@schemathesis.check
def openai_error_shape(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """Errors are 4xx in OpenAI's shape; an SSE error event is too, and never a server error."""
    status = response.status_code
    if status >= 400:
        assert status < 500, f"server error {status}"
        assert_openai_error(json.loads(response.content), f"HTTP {status}")
        return
    content_type = response.headers.get("content-type", [""])[0]
    if content_type.startswith("text/event-stream"):
        for line in response.content.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    assert_openai_error(event, "SSE event")
                    assert event["error"]["type"] != "server_error", "server error in stream"


def restock_adapter(session: requests.Session, base_url: str, adapter_root: Path) -> None:
    """Activate and rollback need an adapter with a history, which earlier unload cases may
    have removed: load v1 then v2 so these routes can succeed, not only answer 404."""
    for version in ("v1", "v2"):
        response = session.post(
            f"{base_url}/v1/load_lora_adapter",
            headers={"Authorization": f"Bearer {FUZZ_ADMIN_KEY}"},
            json={
                "lora_name": ADAPTER,
                "lora_path": str(adapter_root / ADAPTER),
                "version": version,
                "replace": True,
            },
            timeout=60,
        )
        response.raise_for_status()


@pytest.fixture(scope="session")
def http_session() -> Iterator[requests.Session]:
    """One keep-alive connection for all cases, as a real client holds one."""
    with requests.Session() as session:
        yield session


@pytest.mark.fuzz
@schema.parametrize()
def test_api_never_errors_outside_openai_shape(
    case: schemathesis.Case,
    fuzz_server: RunningServer,
    fuzz_adapter_root: Path,
    http_session: requests.Session,
) -> None:
    """One subtest per operation in the served schema, each a seeded Hypothesis run."""
    if case.operation.path.startswith("/v1/adapters/{name}/"):
        restock_adapter(http_session, fuzz_server.base_url, fuzz_adapter_root)
    # Fuzzed cases carry a drawn key (see strategies.with_key); the coverage phase's
    # boundary cases bypass hooks and get the route's key, so their bodies are what is tested.
    headers = (
        {} if "Authorization" in case.headers else {"Authorization": right_key(case.operation)}
    )
    case.call_and_validate(
        base_url=fuzz_server.base_url,
        session=http_session,
        headers=headers,
        timeout=60,
        checks=[openai_error_shape, *CHECKS],
    )
