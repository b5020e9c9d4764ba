"""Index changes over HTTP: admin scope, paths confined to the source roots, audited; the
CLI's index changes land in the same audit log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ADMIN_KEY, API_KEY, BASE_MODEL

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"Authorization": f"Bearer {API_KEY}"}
NAME = "http-built"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as session:
        yield session
        session.delete(f"/v1/indexes/{NAME}", headers=ADMIN)


@pytest.fixture(scope="module")
def docs(document_root):
    folder = document_root / "handbook"
    folder.mkdir()
    (folder / "badges.md").write_text(
        "# Badges\n\nLost visitor badges are replaced at the Quillmere front desk for 7 euros.\n"
    )
    (folder / "parking.txt").write_text("Bicycle parking is behind building C, level -1.\n")
    return folder


def entries(audit_log) -> list[dict]:
    return [json.loads(line) for line in audit_log.read_text().splitlines()]


def ask(http, question: str) -> httpx.Response:
    body = {
        "model": BASE_MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 2,
        "rag": {"index": NAME, "top_k": 1, "mode": "bm25"},
    }
    return http.post("/v1/chat/completions", json=body, headers=CLIENT)


def test_build_add_search_delete_over_http(http, docs, audit_log):
    built = http.post(f"/v1/indexes/{NAME}/build", json={"sources": ["handbook"]}, headers=ADMIN)
    assert built.status_code == 200, built.text
    assert built.json()["documents"] == 2

    answer = ask(http, "Where are lost visitor badges replaced?")
    assert answer.status_code == 200
    assert answer.json()["sources"][0]["source"].endswith("badges.md")

    (docs / "canteen.md").write_text("# Canteen\n\nThe Quillmere canteen serves soup at 11:45.\n")
    added = http.post(
        f"/v1/indexes/{NAME}/add", json={"sources": [str(docs / "canteen.md")]}, headers=ADMIN
    )
    assert added.status_code == 200, added.text
    assert added.json()["documents"] == 3 and len(added.json()["added"]) == 1
    assert ask(http, "When is soup served?").json()["sources"][0]["source"].endswith("canteen.md")

    listed = http.get("/v1/indexes", headers=CLIENT).json()["data"]
    mine = next(e for e in listed if e.get("name") == NAME)
    assert mine["status"] == "ready" and mine["documents"] == 3 and "path" not in mine

    assert http.delete(f"/v1/indexes/{NAME}", headers=ADMIN).status_code == 200
    gone = ask(http, "Where are lost visitor badges replaced?")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "index_not_found"

    mine = [e for e in entries(audit_log) if e.get("index") == NAME]
    assert [(e["action"], e["result"]) for e in mine] == [
        ("build_index", "ok"),
        ("add_to_index", "ok"),
        ("delete_index", "ok"),
    ]
    assert all(ADMIN_KEY not in json.dumps(e) for e in mine)


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", f"/v1/indexes/{NAME}/build"), ("post", f"/v1/indexes/{NAME}/add")],
)
def test_index_changes_need_the_admin_scope(http, docs, method, path):
    body = {"sources": ["handbook"]}
    assert http.request(method, path, json=body).status_code == 401
    denied = http.request(method, path, json=body, headers=CLIENT)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
    assert http.delete(f"/v1/indexes/{NAME}", headers=CLIENT).status_code == 403


def test_sources_outside_the_roots_are_refused_and_audited(http, docs, tmp_path, audit_log):
    secret = tmp_path / "secret.txt"
    secret.write_text("payroll")
    (docs.parent / "escape").symlink_to(tmp_path, target_is_directory=True)
    for source in (str(secret), "../secret.txt", "escape", "/etc/passwd"):
        refused = http.post("/v1/indexes/leaky/build", json={"sources": [source]}, headers=ADMIN)
        assert refused.status_code == 403, (source, refused.text)
        assert refused.json()["error"]["code"] == "path_not_allowed"
    failures = [e for e in entries(audit_log) if e.get("index") == "leaky"]
    assert len(failures) == 4 and all(e["result"] == "error" for e in failures)
    assert "leaky" not in [
        e.get("name") for e in http.get("/v1/indexes", headers=CLIENT).json()["data"]
    ]


@pytest.mark.parametrize(
    ("name", "body", "status"),
    [
        (NAME, {"sources": []}, 400),
        (NAME, {"sources": ["handbook"], "extra": 1}, 400),
        (NAME, {"sources": ["no-such-folder"]}, 400),
        ("bad name!", {"sources": ["handbook"]}, 400),
        ("never-built", {"sources": ["handbook"]}, 404),  # add needs an existing index
    ],
)
def test_bad_index_requests_are_4xx(http, docs, name, body, status):
    verb = "add" if name == "never-built" else "build"
    response = http.post(f"/v1/indexes/{name}/{verb}", json=body, headers=ADMIN)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_cli_index_changes_are_audited(tmp_path, document_root):
    log = tmp_path / "audit.log"
    env = {
        **os.environ,
        "RAGTUNE_HOME": str(tmp_path / "home"),
        "RAGTUNE_AUDIT_LOG": str(log),
    }
    (tmp_path / "doc.md").write_text("# Doc\n\nOne paragraph.\n")
    base = [sys.executable, "-m", "ragtune.cli", "index"]
    for args in (
        ["build", "--name", "cli-idx", "--source", str(tmp_path / "doc.md"), "--quiet"],
        ["delete", "cli-idx"],
        ["delete", "cli-idx"],  # already gone: an audited error
    ):
        subprocess.run([*base, *args], env=env, capture_output=True, check=False, timeout=300)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["action"], r["result"], r["index"]) for r in records] == [
        ("build_index", "ok", "cli-idx"),
        ("delete_index", "ok", "cli-idx"),
        ("delete_index", "error", "cli-idx"),
    ]
    assert all(r["key_id"].startswith("cli:") for r in records)
