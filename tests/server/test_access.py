"""Access control from the hashed key file, keys kept out of logs, and /metrics contents."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.keys import read_key_file
from tests.conftest import ADMIN_KEY, API_KEY, BASE_MODEL

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as session:
        yield session


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_key_file_holds_only_digests(file_keys):
    path = Path(file_keys["file"])
    text = path.read_text(encoding="utf-8")
    assert file_keys["client"] not in text and file_keys["admin"] not in text
    stored = read_key_file(path)
    assert [(k.scope, k.label) for k in stored] == [
        ("client", "test-client"),
        ("admin", "test-admin"),
    ]


def test_file_keys_have_their_scopes(http, file_keys):
    client, admin = bearer(file_keys["client"]), bearer(file_keys["admin"])
    assert http.get("/v1/models", headers=client).status_code == 200
    assert http.get("/v1/models", headers=admin).status_code == 200
    assert http.get("/v1/adapters", headers=admin).status_code == 200
    denied = http.get("/v1/adapters", headers=client)
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "insufficient_scope"
    wrong = http.get("/v1/models", headers=bearer(file_keys["client"] + "x"))
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("admin sk-plaintext-key", "sha256"),
        ("owner sha256:" + "0" * 64, "client|admin"),
        ("client sha256:" + "0" * 63, "64 hex"),
    ],
)
def test_malformed_key_files_are_refused(tmp_path, line, problem):
    path = tmp_path / "keys.txt"
    path.write_text(f"# ops keys\n{line}\n")
    with pytest.raises(ValueError, match=problem) as info:
        read_key_file(path)
    assert ":2:" in str(info.value)  # names the line


def test_keys_create_command_prints_the_key_once(tmp_path):
    path = tmp_path / "keys.txt"
    command = [sys.executable, "-m", "ragtune.cli", "keys", "create", "--file", str(path)]
    done = subprocess.run([*command, "--scope", "admin"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("rt-admin-") and len(key) > 40
    assert key not in path.read_text()
    refused = subprocess.run([*command, "--scope", "root"], capture_output=True, text=True)
    assert refused.returncode == 2


def test_keys_never_reach_the_log(server, http, file_keys):
    secret = "sk-this-must-never-be-logged"
    for key in (secret, API_KEY, ADMIN_KEY, file_keys["client"], file_keys["admin"]):
        http.get("/v1/models", headers=bearer(key))
        http.post("/v1/chat/completions", headers=bearer(key), json={**CHAT, "model": "nope"})
        http.get("/v1/adapters", headers=bearer(key))
    log = server.log()
    for key in (secret, API_KEY, ADMIN_KEY, file_keys["client"], file_keys["admin"]):
        assert key not in log


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series; 0 when absent."""
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_by_route_model_and_status(http):
    def scrape() -> str:
        response = http.get("/metrics", headers=bearer(API_KEY))
        assert response.status_code == 200
        return response.text

    route = "/v1/chat/completions"
    before = scrape()
    for _ in range(2):  # the second starts from the first's cached prompt prefix
        ok = http.post(route, headers=bearer(API_KEY), json={**CHAT, "model": "alpha"})
        assert ok.status_code == 200
    missing = http.post(route, headers=bearer(API_KEY), json={**CHAT, "model": "no-such-xyz"})
    assert missing.status_code == 404
    after = scrape()

    requests = "ragtune_http_requests_total"
    for labels, count in (
        ({"route": route, "model": "alpha", "status": "200"}, 2),
        ({"route": route, "model": "unknown", "status": "404"}, 1),
    ):
        assert metric(after, requests, **labels) == metric(before, requests, **labels) + count
    assert "no-such-xyz" not in after  # client input never becomes a label
    tokens = "ragtune_tokens_total"
    out_before = metric(before, tokens, model="alpha", kind="completion")
    assert metric(after, tokens, model="alpha", kind="completion") == out_before + 4
    assert metric(after, "ragtune_batch_size_count") >= 1
    # the chat template's system prompt is a cached prefix by the second request, where the
    # prefix cache is on (off on CPUs whose GEMMs depend on the row count, e.g. AMX)
    if metric(after, "ragtune_engine_info", prefix_cache="on"):
        assert metric(after, "ragtune_prefix_cache_hit_tokens") >= 16
    else:
        assert metric(after, "ragtune_engine_info", prefix_cache="off") == 1
        assert metric(after, "ragtune_prefix_cache_hit_tokens") == 0
    assert metric(after, "ragtune_adapter_events_total", event="load", result="ok") >= 3
    for family in (
        "ragtune_request_latency_seconds",
        "ragtune_time_to_first_token_seconds",
        "ragtune_sequences_waiting",
        "ragtune_sequences_running",
        "ragtune_retrieval_latency_seconds",
    ):
        assert f"# TYPE {family} " in after, family


def test_metrics_need_a_key_when_keys_are_set(http):
    assert http.get("/metrics").status_code == 401
    assert http.get("/health").status_code == 200


def test_base_model_is_labelled_by_its_id(http):
    http.post(
        "/v1/completions",
        headers=bearer(API_KEY),
        json={"model": BASE_MODEL, "prompt": "A", "max_tokens": 1},
    )
    text = http.get("/metrics", headers=bearer(API_KEY)).text
    assert (
        metric(
            text,
            "ragtune_http_requests_total",
            route="/v1/completions",
            model=BASE_MODEL,
            status="200",
        )
        >= 1
    )
