"""What the route chooser reads from a request body to route it, and which requests a
replica runs under the cluster's admin lease, without Ray."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from ragtune.config import Settings
from ragtune.launcher import free_settled_port
from server.deploy.front import is_admin_change
from server.deploy.launch import router_buffer_bytes
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


def test_the_chooser_sees_every_accepted_body_whole() -> None:
    """HAProxy hands the chooser one buffer of the request: it must hold the largest body a
    replica accepts (OpenAI's SDK writes `model` after `messages`) and its headers."""
    settings = Settings.model_validate({"limits": {"max_body_bytes": 300_000}})
    largest = body(messages=[{"role": "user", "content": "x" * 299_900}], model="legal")
    assert len(largest) <= 300_000
    assert router_buffer_bytes(settings) >= len(largest) + 16_384
    assert adapter_of(largest, BASE) == "legal"


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


def test_cluster_ports_are_outside_the_ephemeral_range() -> None:
    """HAProxy binds its ports seconds after they are chosen, while the cluster opens hundreds
    of connections: a port from the kernel's ephemeral range could be taken meanwhile."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    low, high = (int(n) for n in ephemeral)
    ports = {free_settled_port() for _ in range(20)}
    assert all(port < low or port > high for port in ports)
    assert not ports & set(range(10002, 20000)) and not ports & set(range(30000, 31001))
    for port in ports:  # free on every interface, where HAProxy's stats page binds
        with socket.socket() as sock:
            sock.bind(("0.0.0.0", port))
