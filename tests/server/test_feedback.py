"""POST /v1/feedback with `feedback.store_conversations` off (the default): ratings tied to the
adapter version that answered, OpenAI-style 4xx for bad input, counted on /metrics, and
nothing of a prompt, an answer or a correction written anywhere under RAGTUNE_HOME.

A real server on loopback (bundled model, its own RAGTUNE_HOME), the official `openai`
client for the completions, plain HTTP for the feedback route."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ragtune.config import default_home
from ragtune.launcher import RunningServer, start_server
from ragtune.random_adapter import ATTENTION, make_adapter
from server.ledger import ResponseLedger, ServedResponse
from tests.conftest import API_KEY, BASE_MODEL, SERVER_ENV

OTHER_KEY = "test-other-client-key"
PROMPT_MARKER = "QZXV-prompt-marker-4417"
CORRECTION_MARKER = "QZXV-correction-marker-9203"
COMMENT_MARKER = "QZXV-comment-marker-5150"
RATING_FIELDS = {"time", "id", "model", "adapter", "version", "rating", "choice"}


def bundled_model_env() -> dict[str, str]:
    """The already converted bundled model as a plain model directory, so a fresh
    RAGTUNE_HOME holds only what the server itself writes."""
    from ragtune.models.loader import bundled_model_dir

    return {"RAGTUNE_MODEL__SOURCE": str(bundled_model_dir(BASE_MODEL, default_home()))}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feedback-off") / "home"


@pytest.fixture(scope="module")
def feedback_server(tmp_path_factory, home: Path) -> RunningServer:
    root = tmp_path_factory.mktemp("feedback-adapters")
    make_adapter(root / "alpha", 8, ATTENTION, 1, manifest_version="v7")
    env = {
        **SERVER_ENV,
        **bundled_model_env(),
        "RAGTUNE_HOME": str(home),
        "RAGTUNE_API_KEYS": f"{API_KEY},{OTHER_KEY}",
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(root)]),
    }
    log = tmp_path_factory.mktemp("feedback-off-log") / "server.log"
    running = start_server(env, log, ["--adapter", f"alpha={root / 'alpha'}"])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def openai_client(feedback_server: RunningServer):
    import openai

    return openai.OpenAI(base_url=feedback_server.v1, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(feedback_server: RunningServer):
    with httpx.Client(base_url=feedback_server.base_url, timeout=60) as session:
        yield session


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ask(client, model: str = BASE_MODEL, text: str = "Name a colour.", **extra) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=12,
        temperature=0,
        **extra,
    )
    return reply.id


def files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


def test_nothing_of_a_conversation_is_written(openai_client, http, home):
    question = f"Repeat this code word exactly: {PROMPT_MARKER}"
    reply = openai_client.chat.completions.create(
        model=BASE_MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=24,
        temperature=0,
    )
    answer = reply.choices[0].message.content
    assert len(answer.strip()) >= 8, answer
    stream = openai_client.chat.completions.create(
        model=BASE_MODEL,
        messages=[{"role": "user", "content": question + " (streamed)"}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    streamed_id = chunks[0].id
    body = {
        "id": reply.id,
        "rating": "down",
        "correction": f"The code word is {CORRECTION_MARKER}.",
        "comment": f"wrong {COMMENT_MARKER}",
    }
    rated = http.post("/v1/feedback", json=body, headers=bearer(API_KEY))
    assert rated.status_code == 200, rated.text
    assert rated.json() == {
        "object": "feedback",
        "id": reply.id,
        "rating": "down",
        "model": BASE_MODEL,
        "adapter": None,
        "version": None,
        "correction_kept": False,
        "comment_kept": False,
    }
    streamed = http.post(
        "/v1/feedback", json={"id": streamed_id, "rating": "up"}, headers=bearer(API_KEY)
    )
    assert streamed.status_code == 200, streamed.text

    files = files_under(home)
    markers = [PROMPT_MARKER, CORRECTION_MARKER, COMMENT_MARKER, answer.strip()]
    for path in files:
        data = path.read_bytes()
        for marker in markers:
            assert marker.encode() not in data, f"{marker!r} written to {path}"
    ratings = [
        json.loads(line)
        for path in (home / "feedback").glob("ratings-*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert [r["id"] for r in ratings] == [reply.id, streamed_id]
    assert all(set(r) == RATING_FIELDS for r in ratings), ratings
    assert not list((home / "feedback").glob("conversations-*"))


def test_rating_names_the_adapter_version_that_answered(openai_client, http, home):
    response_id = ask(openai_client, "alpha")
    rated = http.post(
        "/v1/feedback", json={"id": response_id, "rating": "down"}, headers=bearer(API_KEY)
    )
    assert rated.status_code == 200, rated.text
    assert (rated.json()["adapter"], rated.json()["version"]) == ("alpha", "v7")
    pinned = ask(openai_client, "alpha@v7")
    rated = http.post("/v1/feedback", json={"id": pinned, "rating": "up"}, headers=bearer(API_KEY))
    assert rated.json()["model"] == "alpha@v7" and rated.json()["version"] == "v7"

    metrics = http.get("/metrics", headers=bearer(API_KEY)).text
    counted = {
        (sample.labels["model"], sample.labels["version"], sample.labels["rating"]): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "ragtune_feedback_total"
    }
    assert counted[("alpha", "v7", "down")] == counted[("alpha", "v7", "up")] == 1

    audit = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    entry = next(e for e in audit if e["action"] == "feedback" and e["adapter"] == "alpha")
    assert entry["version"] == "v7" and entry["rating"] == "down"
    assert entry["key_id"] and entry["correction_chars"] == 0


@pytest.fixture(scope="module")
def unrated_id(openai_client) -> str:
    return ask(openai_client, text="Name an animal.")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"id": "chatcmpl-unknown", "rating": "up"}, 404, "id"),
        ({"id": "{id}", "rating": "meh"}, 400, "rating"),
        ({"id": "{id}"}, 400, "rating"),
        ({"rating": "up"}, 400, "id"),
        ({"id": "{id}", "rating": "up", "extra": 1}, 400, "extra"),
        ({"id": "{id}", "rating": "up", "choice": 1}, 400, "choice"),
        ({"id": "{id}", "rating": "up", "correction": ""}, 400, "correction"),
        ({"id": "{id}", "rating": "up", "correction": "x" * 20_001}, 400, "correction"),
    ],
)
def test_bad_feedback_is_a_4xx(unrated_id, http, body, status, param):
    if body.get("id") == "{id}":  # a real response, never rated: each body is refused
        body = {**body, "id": unrated_id}
    response = http.post("/v1/feedback", json=body, headers=bearer(API_KEY))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param


def test_feedback_needs_the_key_that_got_the_answer(openai_client, http):
    response_id = ask(openai_client, text="Name a fruit.")
    body = {"id": response_id, "rating": "up"}
    assert http.post("/v1/feedback", json=body).status_code == 401
    other = http.post("/v1/feedback", json=body, headers=bearer(OTHER_KEY))
    assert other.status_code == 404 and other.json()["error"]["code"] == "response_not_found"
    assert http.post("/v1/feedback", json=body, headers=bearer(API_KEY)).status_code == 200
    again = http.post("/v1/feedback", json=body, headers=bearer(API_KEY))
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_rated"


def test_completions_ids_are_not_rated(openai_client, http):
    completion = openai_client.completions.create(
        model=BASE_MODEL, prompt="One, two,", max_tokens=2, temperature=0
    )
    body = {"id": completion.id, "rating": "up"}
    assert http.post("/v1/feedback", json=body, headers=bearer(API_KEY)).status_code == 404


# ---------------------------------------------------------------------------- the ledger
def test_ledger_forgets_the_oldest_and_keeps_no_text():
    ledger = ResponseLedger(capacity=2)
    for number in range(3):
        ledger.remember(ServedResponse.of(f"r{number}", "alpha", "alpha@v2#5", "k"))
    assert ledger.get("r0") is None and len(ledger) == 2
    entry = ledger.get("r2")
    assert (entry.adapter, entry.version, entry.key_id) == ("alpha", "v2", "k")
    assert ledger.rate("r2", "up") is None and ledger.rate("r2", "down") == "up"
    base = ServedResponse.of("r3", BASE_MODEL, None, None)
    assert (base.adapter, base.version) == (None, None)
