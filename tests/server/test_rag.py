"""Per-request retrieval with cited sources, and /v1/embeddings, on the real server."""

from __future__ import annotations

import base64
import shutil

import httpx
import numpy as np
import pytest

from tests.conftest import API_KEY, BASE_MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}
DOCS = {
    "valves.md": "# Valve maintenance\n\nThe Zorblax valve must be tightened to a torque of "
    "42 newton-metres. Check the Zorblax valve seal every 90 days.\n",
    "holidays.txt": "Company holidays: the office is closed on the first Monday of August "
    "for the summer picnic.\n",
    "shipping.md": "# Shipping\n\nParcels to Osaka leave the warehouse every Thursday at 10:00.\n",
}
QUESTION = "What torque should the Zorblax valve be tightened to?"


@pytest.fixture(scope="module")
def manuals(index_root, tmp_path_factory):
    from retrieval.store import IndexStore

    folder = tmp_path_factory.mktemp("manual-docs")
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    store = IndexStore(index_root)
    store.build("manuals", [folder])
    return store


def sources_of(response) -> list[dict]:
    return response.model_extra["sources"]


def test_rag_object_through_extra_body_returns_cited_sources(client, manuals):
    response = client.chat.completions.create(
        model=BASE_MODEL,
        temperature=0,
        max_tokens=40,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"rag": {"index": "manuals", "top_k": 2, "mode": "hybrid"}},
    )
    sources = sources_of(response)
    assert 1 <= len(sources) <= 2
    assert set(sources[0]) >= {"index", "source", "chunk_id", "score", "text"}
    assert sources[0]["index"] == "manuals" and "Zorblax" in sources[0]["text"]
    assert sources[0]["source"].endswith("valves.md")
    assert "42" in response.choices[0].message.content
    # the same question without retrieval does not know the fact and carries no sources
    plain = client.chat.completions.create(
        model=BASE_MODEL,
        temperature=0,
        max_tokens=40,
        messages=[{"role": "user", "content": QUESTION}],
    )
    assert (plain.model_extra or {}).get("sources") is None


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_each_mode_finds_the_document(client, manuals, mode):
    response = client.completions.create(
        model=BASE_MODEL,
        prompt="When do parcels to Osaka leave?",
        max_tokens=8,
        temperature=0,
        extra_body={"rag": {"index": "manuals", "top_k": 1, "mode": mode}},
    )
    assert sources_of(response)[0]["source"].endswith("shipping.md")


def test_streaming_sends_sources_in_the_first_chunk(client, manuals):
    chunks = list(
        client.chat.completions.create(
            model=BASE_MODEL,
            temperature=0,
            max_tokens=12,
            stream=True,
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"rag": {"index": "manuals", "top_k": 1}},
        )
    )
    first = chunks[0].model_extra.get("sources")
    assert first and "Zorblax" in first[0]["text"]
    assert all(not (c.model_extra or {}).get("sources") for c in chunks[1:])


def test_min_score_can_filter_everything(client, manuals):
    response = client.chat.completions.create(
        model=BASE_MODEL,
        temperature=0,
        max_tokens=8,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"rag": {"index": "manuals", "mode": "dense", "min_score": 1.5}},
    )
    assert sources_of(response) == []


@pytest.mark.parametrize(
    ("rag", "status", "param"),
    [
        (True, 400, "rag"),  # no default index configured
        ({"index": "no-such-index"}, 404, "rag.index"),
        ({"index": "../etc"}, 400, "rag.index"),
        ({"index": "manuals", "top_k": 0}, 400, "rag.top_k"),
        ({"index": "manuals", "mode": "fuzzy"}, 400, "rag.mode"),
        ({"index": "manuals", "unknown": 1}, 400, None),
    ],
)
def test_rag_errors(server, manuals, rag, status, param):
    body = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "rag": rag}
    response = httpx.post(f"{server.v1}/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if param:
        assert error["param"] == param


def test_corrupt_index_is_unavailable_and_the_server_keeps_serving(
    server, manuals, index_root, tmp_path
):
    from retrieval.store import IndexStore

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("A short document about corrupt indexes.", encoding="utf-8")
    IndexStore(index_root).build("fragile", [folder])
    for path in (index_root / "fragile").rglob("*"):
        if path.is_file() and path.suffix in (".faiss", ".npy", ".json", ".jsonl"):
            path.write_bytes(b"\x00garbage")
    body = {
        "model": BASE_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "rag": {"index": "fragile"},
        "max_tokens": 4,
    }
    response = httpx.post(f"{server.v1}/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "index_unavailable"
    body["rag"] = {"index": "manuals"}
    assert (
        httpx.post(f"{server.v1}/chat/completions", json=body, headers=AUTH, timeout=60).status_code
        == 200
    )
    shutil.rmtree(index_root / "fragile", ignore_errors=True)


def test_embeddings_through_the_openai_client(client):
    from retrieval.embedder import Embedder

    texts = ["The valve needs 42 Nm.", "東京は日本の首都です。"]
    response = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    expected = Embedder("bundled").embed(texts)
    assert np.allclose(vectors, expected, atol=1e-4)
    assert response.usage.prompt_tokens > 0
    raw = httpx.post(
        f"{client.base_url}embeddings",
        headers=AUTH,
        timeout=60,
        json={"model": "all-minilm-l6-v2", "input": texts[0], "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
        ({"model": "all-minilm-l6-v2", "input": ""}, 400, "input"),
        ({"model": "all-minilm-l6-v2", "input": []}, 400, "input"),
        ({"model": "all-minilm-l6-v2", "input": [1, 2, 3]}, 400, "input"),
        ({"model": "all-minilm-l6-v2", "input": "x", "dimensions": 12}, 400, "dimensions"),
    ],
)
def test_embedding_errors(server, body, status, param):
    response = httpx.post(f"{server.v1}/embeddings", json=body, headers=AUTH, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_retrieval_leaves_no_worker_thread_behind(server, client, manuals):
    """Retrieval and embedding run torch on threads that end with the call: a thread that
    stays alive keeps an OpenMP team, and more teams than cores slow every engine step
    (server/threads.py). The server's thread count is the same after RAG and embedding
    requests as before (the engine and uvicorn threads are there from the start)."""
    import os

    def threads() -> set[str]:
        tasks = f"/proc/{server.process.pid}/task"
        found = set()
        for tid in os.listdir(tasks):
            try:
                with open(f"{tasks}/{tid}/comm") as comm:
                    found.add(f"{comm.read().strip()}#{tid}")
            except FileNotFoundError:  # a thread that ended meanwhile
                pass
        return found

    client.chat.completions.create(  # warm: first request paths
        model=BASE_MODEL,
        max_tokens=2,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"rag": {"index": "manuals", "top_k": 2}},
    )
    before = threads()
    for _ in range(3):
        client.chat.completions.create(
            model=BASE_MODEL,
            max_tokens=2,
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"rag": {"index": "manuals", "top_k": 2}},
        )
        client.embeddings.create(model="all-minilm-l6-v2", input=["valve torque"] * 40)
    import time

    deadline = time.monotonic() + 5  # a call's thread ends just after its answer is sent
    while (left := threads() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == set()
