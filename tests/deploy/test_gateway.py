"""What the gateway reads from a request to route it, without Ray."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve")

from server.deploy.gateway import is_admin_change, routing_facts

BASE = {"smollm2-135m-instruct", "all-minilm-l6-v2"}


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_adapter_and_stream_from_the_body() -> None:
    chat = "/v1/chat/completions"
    assert routing_facts("POST", chat, body(model="legal", stream=True), BASE) == ("legal", True)
    assert routing_facts("POST", chat, body(model="legal@v2"), BASE) == ("legal@v2", False)
    assert routing_facts("POST", chat, body(model="smollm2-135m-instruct"), BASE) == ("", False)
    assert routing_facts("POST", "/v1/embeddings", body(model="all-minilm-l6-v2"), BASE) == (
        "",
        False,
    )
    assert routing_facts("POST", chat, b"{not json", BASE) == ("", False)  # the replica: 400
    assert routing_facts("POST", chat, b"[1]", BASE) == ("", False)
    assert routing_facts("POST", chat, body(model=7, stream="yes"), BASE) == ("", False)
    assert routing_facts("GET", "/v1/models", b"", BASE) == ("", False)


@pytest.mark.parametrize(
    ("method", "path", "admin"),
    [
        ("POST", "/v1/load_lora_adapter", True),
        ("POST", "/v1/unload_lora_adapter", True),
        ("POST", "/v1/adapters/legal/activate", True),
        ("POST", "/v1/adapters/legal/rollback", True),
        ("POST", "/v1/indexes/docs/build", True),
        ("DELETE", "/v1/indexes/docs", True),
        ("GET", "/v1/adapters", False),
        ("GET", "/v1/indexes", False),
        ("POST", "/v1/chat/completions", False),
    ],
)
def test_admin_changes_are_recognised(method: str, path: str, admin: bool) -> None:
    assert is_admin_change(method, path) is admin
