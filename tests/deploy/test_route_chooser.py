"""What the route chooser reads from a request body to route it, and which requests a
replica runs under the cluster's admin lease, without Ray."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve")

from server.deploy.front import is_admin_change
from server.deploy.route_chooser import adapter_of

BASE = {"smollm2-135m-instruct", "all-minilm-l6-v2"}


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_adapter_from_the_body() -> None:
    assert adapter_of(body(model="legal", stream=True), BASE) == "legal"
    assert adapter_of(body(model="legal@v2"), BASE) == "legal@v2"
    assert adapter_of(body(model="smollm2-135m-instruct"), BASE) == ""
    assert adapter_of(body(model="all-minilm-l6-v2"), BASE) == ""
    assert adapter_of(b"{not json", BASE) == ""  # the replica answers 400
    assert adapter_of(b"[1]", BASE) == ""
    assert adapter_of(body(model=7), BASE) == ""
    assert adapter_of(b"", BASE) == ""
    assert adapter_of(body(model="x" * 500), BASE) == "x" * 200
    # an admin load goes where the adapter's requests will: the router places it
    assert adapter_of(body(lora_name="legal", lora_path="/a/legal"), BASE) == "legal"


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
