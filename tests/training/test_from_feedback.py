"""Feedback -> training data: with `feedback.store_conversations` on, a real server keeps
each conversation PII-masked, and `ragtune prepare --from-feedback` turns corrections and
up-rated answers into a split, de-duplicated dataset; the record store's retention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from ragtune.feedback_store import FeedbackStore
from ragtune.launcher import RunningServer, start_server
from tests.conftest import API_KEY, BASE_MODEL, SERVER_ENV
from tests.server.test_feedback import bundled_model_env
from training.dataset import SPLIT_FILES, read_split, write_jsonl
from training.from_feedback import FeedbackOptions, feedback_examples, prepare_from_feedback

EMAIL = "jane.doe@example.com"
PHONE = "090-1234-5678"
QUESTIONS = [
    f"I am Jane ({EMAIL}, {PHONE}). Which colour is the sky?",
    "What do bees make?",
    "Name a large animal.",
    "Say hello in French.",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feedback-on") / "home"


@pytest.fixture(scope="module")
def kept_server(tmp_path_factory, home: Path) -> RunningServer:
    env = {
        **SERVER_ENV,
        **bundled_model_env(),
        "RAGTUNE_HOME": str(home),
        "RAGTUNE_FEEDBACK__STORE_CONVERSATIONS": "true",
    }
    log = tmp_path_factory.mktemp("feedback-on-log") / "server.log"
    running = start_server(env, log)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def rated(kept_server: RunningServer) -> dict[str, str]:
    """Four answers (the last streamed) and their ratings: question -> response id."""
    import openai

    client = openai.OpenAI(base_url=kept_server.v1, api_key=API_KEY, max_retries=0, timeout=120)
    ids = {}
    for number, question in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": question}]
        if number == 3:
            stream = client.chat.completions.create(
                model=BASE_MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
            )
            chunks = list(stream)  # read to the end: the answer is then complete
            ids[question] = chunks[0].id
        else:
            ids[question] = client.chat.completions.create(
                model=BASE_MODEL, messages=messages, max_tokens=16, temperature=0
            ).id
    bodies = [
        {"rating": "up"},
        {"rating": "down", "correction": f"Bees make honey. Write to {EMAIL} for more."},
        {"rating": "down"},  # no correction: nothing to learn
        {"rating": "up", "comment": "nice"},
    ]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=kept_server.base_url, timeout=60) as http:
        for question, body in zip(QUESTIONS, bodies, strict=True):
            response = http.post(
                "/v1/feedback", json={"id": ids[question], **body}, headers=headers
            )
            assert response.status_code == 200, response.text
            kept = response.json()
            assert kept["correction_kept"] == ("correction" in body)
            assert kept["comment_kept"] == ("comment" in body)
    return ids


def records(home: Path, kind: str) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted((home / "feedback").glob(f"{kind}-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_conversations_are_kept_pii_masked(rated, home):
    conversations = {record["id"]: record for record in records(home, "conversations")}
    assert set(conversations) == set(rated.values())  # streamed ones too
    first = conversations[rated[QUESTIONS[0]]]
    assert first["messages"][0]["role"] == "user"
    assert "[EMAIL]" in first["messages"][0]["content"]
    assert "[PHONE]" in first["messages"][0]["content"]
    assert all(answer for answer in conversations[rated[QUESTIONS[3]]]["answers"])
    corrections = [r["correction"] for r in records(home, "ratings") if "correction" in r]
    assert corrections == ["Bees make honey. Write to [EMAIL] for more."]
    for path in (home / "feedback").iterdir():
        text = path.read_text()
        assert EMAIL not in text and PHONE not in text, path
    assert oct((home / "feedback").stat().st_mode & 0o777) == "0o700"


def test_prepare_from_feedback_makes_a_dataset(rated, home, tmp_path):
    # an existing dataset already holding the fourth (up-rated) answer: not repeated
    conversations = {record["id"]: record for record in records(home, "conversations")}
    fourth = conversations[rated[QUESTIONS[3]]]
    existing = tmp_path / "existing"
    existing.mkdir()
    duplicate = {
        "messages": [*fourth["messages"], {"role": "assistant", "content": fourth["answers"][0]}],
        "doc_id": "docs/french.md",
        "recipe": "qa",
    }
    write_jsonl(existing / SPLIT_FILES["train"], [duplicate])
    out = tmp_path / "from-feedback"
    env = {**os.environ, "RAGTUNE_HOME": str(home)}
    command = [sys.executable, "-m", "ragtune.cli", "prepare", "--from-feedback"]
    command += ["--out", str(out), "--against", str(existing)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["feedback"]["from_up_ratings"] == 2
    assert stats["feedback"]["from_corrections"] == 1
    assert stats["feedback"]["skipped_down_without_correction"] == 1
    assert stats["examples_removed_existing_duplicates"] == 1
    rows = [row for split in SPLIT_FILES for row in read_split(out, split)]
    assert sorted(row["doc_id"] for row in rows) == sorted(
        f"feedback:{rated[q]}" for q in QUESTIONS[:2]
    )
    by_id = {row["doc_id"]: row for row in rows}
    corrected = by_id[f"feedback:{rated[QUESTIONS[1]]}"]["messages"]
    assert corrected[-1] == {
        "role": "assistant",
        "content": "Bees make honey. Write to [EMAIL] for more.",
    }
    assert all(row["recipe"] == "feedback" for row in rows)
    assert EMAIL not in json.dumps(rows)
    audit = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    entry = next(e for e in audit if e["action"] == "prepare_from_feedback")
    assert entry["result"] == "ok" and sum(entry["examples"].values()) == 2
    assert all("honey" not in line for line in (home / "audit.log").read_text().splitlines())


# --------------------------------------------------------------------- without a server
def store_with(tmp_path: Path, ratings: list[dict], conversations: list[dict]) -> FeedbackStore:
    store = FeedbackStore(tmp_path / "feedback", retention_days=30)
    for record in conversations:
        store.append("conversations", record)
    for record in ratings:
        store.append("ratings", record)
    return store


def conversation(response_id: str, question: str, answer: str, role: str = "user") -> dict:
    return {
        "id": response_id,
        "messages": [{"role": role, "content": question}],
        "answers": [answer],
    }


def test_examples_come_from_corrections_and_up_ratings_only(tmp_path):
    store = store_with(
        tmp_path,
        ratings=[
            {"id": "a", "rating": "up", "choice": 0},
            {"id": "b", "rating": "down", "choice": 0},
            {"id": "c", "rating": "down", "choice": 0, "correction": "Better."},
            {"id": "d", "rating": "up", "choice": 0},  # no conversation kept
            {"id": "e", "rating": "up", "choice": 0},  # a tool turn
        ],
        conversations=[
            conversation("a", "Q a", "A a"),
            conversation("b", "Q b", "A b"),
            conversation("c", "Q c", "A c"),
            conversation("e", "Q e", "A e", role="tool"),
        ],
    )
    stats: Counter[str] = Counter()
    examples = feedback_examples(store, stats)
    assert [(e.doc_id, e.messages[-1]["content"]) for e in examples] == [
        ("feedback:a", "A a"),
        ("feedback:c", "Better."),
    ]
    assert stats["skipped_down_without_correction"] == 1
    assert stats["skipped_without_conversation"] == 1
    assert stats["skipped_tool_or_empty_conversation"] == 1


def test_near_copies_of_existing_examples_are_dropped(tmp_path):
    answer = "Forklifts are charged only in the ventilated battery bay on the east side."
    store_with(
        tmp_path,
        ratings=[{"id": n, "rating": "up", "choice": 0} for n in ("x", "y")],
        conversations=[
            conversation("x", "Where are forklifts charged?", answer),
            conversation("y", "Who signs the night log?", "The night lead signs it at six."),
        ],
    )
    existing = tmp_path / "existing"
    existing.mkdir()
    near = answer.replace("east", "east-facing")
    row = {
        "messages": [
            {"role": "user", "content": "Where are forklifts charged?"},
            {"role": "assistant", "content": near},
        ],
        "doc_id": "d",
        "recipe": "qa",
    }
    write_jsonl(existing / SPLIT_FILES["val"], [row])
    stats = prepare_from_feedback(
        FeedbackOptions(tmp_path / "feedback", tmp_path / "out", against=[existing])
    )
    assert stats["examples_removed_near_duplicates"] == 1
    assert sum(stats["examples"].values()) == 1


def test_no_usable_feedback_is_an_error(tmp_path):
    store_with(tmp_path, ratings=[{"id": "a", "rating": "up", "choice": 0}], conversations=[])
    with pytest.raises(ValueError, match="store_conversations"):
        prepare_from_feedback(FeedbackOptions(tmp_path / "feedback", tmp_path / "out"))


def test_expired_records_are_dropped_and_torn_lines_skipped(tmp_path):
    store = FeedbackStore(tmp_path / "feedback", retention_days=7)
    now = datetime.now(timezone.utc)
    store.append("ratings", {"id": "old"}, now=now - timedelta(days=9))
    store.append("ratings", {"id": "edge"}, now=now - timedelta(days=7, hours=1))
    store.append("ratings", {"id": "new"}, now=now)
    today = next((tmp_path / "feedback").glob(f"ratings-{now:%Y-%m-%d}.jsonl"))
    with open(today, "a") as handle:
        handle.write('{"time": "2026-')  # a crash mid-write
    assert [r["id"] for r in store.read("ratings")] == ["new"]  # "edge" is 1 h past
    # the first write of a day prunes: the 9-day-old file is gone
    assert not (
        tmp_path / "feedback" / f"ratings-{now - timedelta(days=9):%Y-%m-%d}.jsonl"
    ).exists()
    assert store.prune() == []
    assert today.stat().st_mode & 0o777 == 0o600
