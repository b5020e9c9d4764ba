"""Canaries over real HTTP on the bundled model: a 30 % canary takes 3 of every 10
`model=name` requests (counted from the `X-Ragtune-Adapter-Version` header and /metrics), a
canary whose files break on disk and one that collects down-ratings roll back by themselves
with every client request answered, activating the canary's version promotes it, and every
step is in the audit log.

A server of its own (the session server's canary thresholds are the defaults, and its
residency must stay as it is): `adapters.max_cpu_loras: 1`, so a version not used last is
read from disk again at its next request, which is where a version whose files changed fails.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from ragtune.launcher import RunningServer, start_server
from ragtune.random_adapter import ATTENTION, make_adapter
from tests.conftest import ADMIN_KEY, API_KEY, SERVER_ENV

NAME = "cn"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "Name a colour."}]
CANARY_ENV = {
    "RAGTUNE_CANARY__MIN_REQUESTS": "6",
    "RAGTUNE_CANARY__MAX_ERROR_RATE": "0.2",
    "RAGTUNE_CANARY__MIN_RATINGS": "4",
    "RAGTUNE_CANARY__MAX_DOWN_RATE": "0.5",
    "RAGTUNE_ADAPTERS__MAX_CPU_LORAS": "1",
}


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, Path]:
    """v1 (active), v2 (a healthy candidate), v3 (v2's files, to be broken on disk)."""
    root = tmp_path_factory.mktemp("canary-adapters")
    made = {
        "v1": make_adapter(root / "v1", 4, ATTENTION, seed=11),
        "v2": make_adapter(root / "v2", 4, ATTENTION, seed=12),
        "v3": make_adapter(root / "v3", 4, ATTENTION, seed=12),
    }
    return made


@pytest.fixture(scope="module")
def canary_server(tmp_path_factory, versions) -> RunningServer:
    home = tmp_path_factory.mktemp("canary-home")
    env = {
        **SERVER_ENV,
        **CANARY_ENV,
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(versions["v1"].parent)]),
        "RAGTUNE_AUDIT_LOG": str(home / "audit.log"),
    }
    running = start_server(env, home / "server.log")
    with httpx.Client(base_url=running.base_url, timeout=120) as http:
        for version, path in versions.items():
            body = {"lora_name": NAME, "lora_path": str(path), "version": version}
            body["activate"] = version == "v1"
            response = http.post("/v1/load_lora_adapter", json=body, headers=ADMIN)
            assert response.status_code == 200, response.text
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(canary_server) -> httpx.Client:
    with httpx.Client(base_url=canary_server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def oai(canary_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=canary_server.v1, api_key=API_KEY, max_retries=0, timeout=120)


def ask(oai: openai.OpenAI, model: str = NAME) -> tuple[str, str]:
    """(the version that answered, the response id); raises if the request failed."""
    raw = oai.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=2
    )
    response = raw.parse()
    assert response.model == model and response.choices[0].message.content is not None
    return raw.headers["X-Ragtune-Adapter-Version"], response.id


def ask_many(oai: openai.OpenAI, count: int, model: str = NAME) -> list[tuple[str, str]]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: ask(oai, model), range(count)))


def start(http: httpx.Client, version: str, fraction: float) -> dict:
    body = {"version": version, "fraction": fraction}
    response = http.post(f"/v1/adapters/{NAME}/canary", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["canary"]


def canary(http: httpx.Client) -> dict:
    response = http.get(f"/v1/adapters/{NAME}/canary", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["canary"]


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http.get("/metrics", headers=CLIENT).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def audit(canary_server: RunningServer) -> list[dict]:
    """The server's audit log (beside its log file)."""
    path = Path(canary_server.log_path).parent / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def active(http: httpx.Client) -> str:
    listed = http.get("/v1/adapters", headers=ADMIN).json()["data"]
    return next(a for a in listed if a["name"] == NAME)["active_version"]


# ------------------------------------------------------------------------------------ tests
def test_canary_at_30_percent_takes_3_of_every_10_requests(canary_server, http, oai):
    before = metric(http, "ragtune_adapter_requests_total", version="v2", outcome="ok")
    start(http, "v2", 0.3)
    assert metric(http, "ragtune_canary_fraction", adapter=NAME, version="v2") == 0.3
    served = [version for version, _ in ask_many(oai, 20)]
    assert served.count(f"{NAME}@v2") == 6 and served.count(f"{NAME}@v1") == 14
    assert ask(oai, f"{NAME}@v1")[0] == f"{NAME}@v1"  # a pinned version is never split
    after = metric(http, "ragtune_adapter_requests_total", version="v2", outcome="ok")
    assert after - before == 6
    described = canary(http)
    assert described["state"] == "running" and described["routed"] == 6
    assert described["versions"]["v2"]["requests"] == 6

    stopped = http.delete(f"/v1/adapters/{NAME}/canary", headers=ADMIN)
    assert stopped.status_code == 200, stopped.text
    assert {version for version, _ in ask_many(oai, 6)} == {f"{NAME}@v1"}
    assert metric(http, "ragtune_canary_state", adapter=NAME, ragtune_canary_state="stopped")
    actions = [e["action"] for e in audit(canary_server)]
    assert "start_canary" in actions and "stop_canary" in actions


def test_canary_on_the_active_version_or_an_unknown_one_is_refused(http):
    for version, status in (("v1", 400), ("v9", 404)):
        body = {"version": version, "fraction": 0.3}
        response = http.post(f"/v1/adapters/{NAME}/canary", json=body, headers=ADMIN)
        assert response.status_code == status, response.text
    body = {"version": "v2", "fraction": 1.5}
    assert http.post(f"/v1/adapters/{NAME}/canary", json=body, headers=ADMIN).status_code == 400
    response = http.post(f"/v1/adapters/{NAME}/canary", json=body, headers=CLIENT)
    assert response.status_code == 403


def test_a_canary_whose_files_broke_rolls_back_with_no_failed_request(
    canary_server, http, oai, versions
):
    start(http, "v3", 0.5)
    weights = versions["v3"] / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)  # same bytes, another file: a version never changes on disk
    ask(oai, f"{NAME}@v1")  # v1 in memory, v3 evicted (one resident version)
    served = [version for version, _ in ask_many(oai, 16)]  # every request answered
    assert set(served) == {f"{NAME}@v1"}
    described = canary(http)
    assert described["state"] == "rolled_back" and described["reason"] == "error_rate"
    assert described["versions"]["v3"]["errors"] == 6  # judged at min_requests, then ended
    assert metric(http, "ragtune_canary_rollbacks_total", adapter=NAME, reason="error_rate") == 1
    # a request routed to it in parallel just before the end still failed over (and counts)
    assert 6 <= metric(http, "ragtune_adapter_requests_total", version="v3", outcome="error") <= 8
    rollback = [e for e in audit(canary_server) if e["action"] == "canary_rollback"][-1]
    assert rollback["version"] == "v3" and rollback["trigger"] == "automatic"
    assert rollback["errors"] == 6 and rollback["threshold"] == 0.2
    assert active(http) == "v1"


def test_down_ratings_roll_the_canary_back_with_no_failed_request(canary_server, http, oai):
    if http.post("/v1/feedback", json={}, headers=CLIENT).status_code == 404:
        pytest.skip("POST /v1/feedback is not mounted in this tree yet")
    start(http, "v2", 0.5)
    downs = 0
    for _ in range(6):
        for version, response_id in ask_many(oai, 2):
            if version == f"{NAME}@v2":
                body = {"id": response_id, "rating": "down"}
                rated = http.post("/v1/feedback", json=body, headers=CLIENT)
                assert rated.status_code == 200, rated.text
                downs += 1
        if canary(http)["state"] != "running":
            break
    described = canary(http)
    assert described["state"] == "rolled_back" and described["reason"] == "down_rate"
    assert downs == 4  # judged at min_ratings
    assert {version for version, _ in ask_many(oai, 4)} == {f"{NAME}@v1"}
    rollback = [e for e in audit(canary_server) if e["action"] == "canary_rollback"][-1]
    assert rollback["reason"] == "down_rate" and rollback["downs"] == 4


def test_activating_the_canary_version_promotes_it(canary_server, http, oai):
    start(http, "v2", 0.3)
    response = http.post(f"/v1/adapters/{NAME}/activate", json={"version": "v2"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["canary"]["state"] == "promoted"
    assert canary(http)["state"] == "promoted"
    assert {version for version, _ in ask_many(oai, 4)} == {f"{NAME}@v2"}
    entry = [e for e in audit(canary_server) if e["action"] == "activate_adapter"][-1]
    assert entry["canary"] == "promoted"
    rolled = http.post(f"/v1/adapters/{NAME}/rollback", headers=ADMIN)
    assert rolled.status_code == 200 and active(http) == "v1"
